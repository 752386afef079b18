"""onnxruntime's CPU inference against vitlab's own (eager, bf16 and fp32), side by side in one process.

    python benchmarks/onnx_speed.py                           # ViT-S/16 and R26+ViT-S/32 at 224 px, batches 1 and 16
    python benchmarks/onnx_speed.py --models s16 --batches 1 --rounds 5 --threads 1

For each model (random weights: the speed does not depend on them) it writes the ONNX graph that `vitlab export
CKPT model.onnx` writes (vitlab.onnx_export, float32, opset 18) and times three ways of computing the logits of the
same batch:

- vitlab fp32 and vitlab bf16: vitlab.runtime.Predictor, the path of `vitlab eval`, `predict` and `serve` (eval
  mode, inference_mode, uint8 images normalised on the way in; in bf16 the weights of the linear maps cast once);
- onnxruntime: the exported graph on the CPU execution provider, all graph optimisations, as many intra-op threads
  as torch uses, fed the normalised float32 batch (the normalisation, one pass over the pixels, is left out).

The timings run in rounds, interleaved (each round runs every variant in a rotating order), so that the machine's
noise falls on all alike; each row gives the median over rounds (and the best round) of one call, and images/s
at the median. The last column is each variant's largest logit difference from vitlab fp32 on that batch, what a
faster path costs in agreement. Nothing here is a test: timings vary with the machine; the ratios of one run are
what compare.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitlab.model import VisionTransformer, variant_config  # noqa: E402
from vitlab.onnx_export import INPUT, export_onnx  # noqa: E402
from vitlab.runtime import Predictor, cpu_has_native_bf16, normalize  # noqa: E402

MODELS = {
    "s16": ("ViT-S/16", lambda: variant_config("vit-s/16", image_size=224, num_classes=1000)),
    "r26s32": ("R26+ViT-S/32", lambda: variant_config("r26+vit-s/32", image_size=224, num_classes=1000)),
}


def random_model(cfg) -> VisionTransformer:
    model = VisionTransformer(cfg)
    with torch.no_grad():
        model.head.weight.normal_(0, 0.02)  # the official zero head would make every logit equal
    return model.eval()


def session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bench(name: str, batches: list[int], rounds: int, directory: Path) -> list[dict]:
    title, make = MODELS[name]
    model = random_model(make())
    cfg = model.cfg
    onnx = session(export_onnx(model, directory / f"{name}.onnx"))
    fp32, bf16 = Predictor(model, "fp32", torch.device("cpu")), Predictor(model, "bf16", torch.device("cpu"))
    rows = []
    for batch in batches:
        images = torch.randint(0, 256, (batch, cfg.in_chans, *cfg.image_size), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(batch))
        x = normalize(images, cfg.mean or (0.5,) * 3, cfg.std or (0.5,) * 3).numpy()
        variants = {
            "vitlab fp32 (eager)": lambda: fp32.logits(images),
            "vitlab bf16 (eager)": lambda: bf16.logits(images),
            "onnxruntime fp32": lambda: torch.from_numpy(onnx.run(None, {INPUT: x})[0]),
        }
        reference = fp32.logits(images)
        diffs = {k: (fn() - reference).abs().max().item() for k, fn in variants.items()}  # and one warm-up each
        times: dict[str, list[float]] = {k: [] for k in variants}
        calls = max(1, 4 // batch)  # per variant and round
        names = list(variants)
        for r in range(rounds):
            for k in names[r % len(names):] + names[: r % len(names)]:
                t0 = time.perf_counter()
                for _ in range(calls):
                    variants[k]()
                times[k].append((time.perf_counter() - t0) / calls)
        for k in names:
            median = statistics.median(times[k])
            rows.append(dict(model=title, batch=batch, variant=k, median_ms=1e3 * median, best_ms=1e3 * min(times[k]),
                             images_s=batch / median, diff=diffs[k]))
            print(f"{title} batch {batch} {k}: {1e3 * median:.1f} ms", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="s16,r26s32", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="threads for both (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import onnxruntime

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {torch.get_num_threads()} threads, "
          f"CPU bf16 instructions: {'yes' if cpu_has_native_bf16() else 'no'}; {args.rounds} interleaved rounds\n")
    print("| model | batch | variant | ms per call (median) | best | images/s | max abs logit diff vs vitlab fp32 |")
    print("|---|---:|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for r in bench(name, [int(b) for b in args.batches.split(",")], args.rounds, Path(tmp)):
                print(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['median_ms']:.1f} | {r['best_ms']:.1f} | "
                      f"{r['images_s']:.1f} | {r['diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
