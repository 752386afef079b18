"""Transfer at this machine's scale: does pre-training help a ViT on a small dataset? (paper section 4, Table 2 and
Figure 3's few-shot curves, in miniature.)

    python experiments/transfer.py            # the experiment: writes experiments/results/transfer/
    python experiments/transfer.py --quick    # the whole pipeline in about a minute, into runs/transfer-quick/

1. Pre-train a small ViT on CIFAR-10 (the WebDataset shards in ../shared, 32 px, 10 % held out as val).
2. (a) Fine-tune it at 48 px on a 1,000-image subset of Fashion-MNIST, grey replicated to the 3 channels the
   pre-trained model takes (`vitlab finetune`: new zero head, position embeddings interpolated 4x4 -> 6x6,
   SGD + cosine), against the same architecture from scratch for the same steps and batch, with the from-scratch
   recipe (AdamW) and with the fine-tuning one (SGD).
   (b) Few-shot 1/5/10/25 on the same 1,000 images (`vitlab.evaluate.fewshot`, closed-form ridge, 5 seeds): the
   pre-trained model's features against those of a randomly initialised one.
Both measured on the first 2,000 images of Fashion-MNIST's test set. Writes results.md (tables, settings, wall
time), results.json and transfer.png. `--pretrained DIR` reuses a pre-trained checkpoint (the long step).

Time: patch 8 keeps the token count small (16 at 32 px, 36 at 48 px) so that the whole experiment fits in about
half an hour on this 2-core machine; results.md states the measured wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vitlab import data  # noqa: E402
from vitlab.evaluate import fewshot  # noqa: E402
from vitlab.model import VisionTransformer  # noqa: E402
from vitlab.common import atomic_write, atomic_write_text  # noqa: E402
from vitlab.config import TrainConfig, fine_tune  # noqa: E402
from vitlab.train import train  # noqa: E402
from vitlab.weights import load_model  # noqa: E402

CIFAR = "../shared/data/cifar10-jpeg/train-000{0..4}.tar"  # relative to the repository root
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

# (full, quick) settings
MODEL = dict(full=dict(model="vit-ti/8", hidden_size=128, num_layers=6, num_heads=4, mlp_dim=512),
             quick=dict(model="vit-ti/8", hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64))
PRETRAIN = dict(full=dict(epochs=6, batch_size=128, lr=2e-3, weight_decay=0.05, warmup=0.05, schedule="cosine",
                          val_split=0.1),
                quick=dict(steps=12, batch_size=64, lr=1e-3, warmup=2, schedule="cosine"))
TUNE = dict(full=dict(steps=300, batch_size=64), quick=dict(steps=8, batch_size=32))
SCRATCH_ADAMW = dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, warmup=0.05, schedule="cosine", grad_clip=1.0)
FEWSHOT = dict(full=dict(shots=[1, 5, 10, 25], seeds=5), quick=dict(shots=[1, 5, 10, 25], seeds=2))
# 2,000 test images (± about 1 % at 80 % accuracy): the loop evaluates after every epoch of 1,000 images, and
# 10,000 at 48 px would cost more than the fine-tuning itself.
SUBSET, TEST = dict(full=1000, quick=1000), dict(full=2000, quick=500)


def write_idx(path: Path, array: np.ndarray) -> None:
    import gzip
    import struct

    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fashion_subset(source: Path, out: Path, train_images: int, test_images: int, seed: int = 0) -> Path:
    """Fashion-MNIST's four idx files with `train_images` training images (a seeded random subset) and the
    first `test_images` test images, for VITLAB_FASHION_MNIST_DIR."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for part, n in (("train", train_images), ("t10k", test_images)):
        images = data.read_idx(source / f"{part}-images-idx3-ubyte.gz")
        labels = data.read_idx(source / f"{part}-labels-idx1-ubyte.gz")
        keep = np.sort(rng.permutation(len(labels))[:n]) if part == "train" else np.arange(min(n, len(labels)))
        write_idx(out / f"{part}-images-idx3-ubyte.gz", images[keep])
        write_idx(out / f"{part}-labels-idx1-ubyte.gz", labels[keep])
    return out


def pretrain_settings(run: Path, default: dict) -> dict:
    """The pre-training settings that matter here, as the run recorded them (a reused --pretrained run too)."""
    path = run / "train_config.json"
    if not path.exists():
        return default
    recorded = json.loads(path.read_text())
    return {k: recorded.get(k) for k in ("epochs", "steps", "batch_size", "lr", "weight_decay", "warmup", "schedule",
                                         "val_split", "precision") if recorded.get(k) is not None}


def pretrain_result(run: Path) -> str:
    """The pre-training run's last evaluation, e.g. 'val top-1 0.5010 after 10 epochs'."""
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    rows = [r for r in rows if r.get("split") in ("val", "test")]
    return f"{rows[-1]['split']} top-1 {rows[-1]['top1']:.4f} after {rows[-1]['epoch']:g} epochs" if rows else "no evaluation"


def evals(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["top1"]) for r in rows if r["split"] == "test"]


def img_per_s(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["img_s"] for r in rows if r["split"] == "train" and r.get("img_s")]
    return float(np.median(speeds)) if speeds else float("nan")


def plot(path: Path, curves: dict[str, list[tuple[int, float]]], shots: dict[str, dict]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_tune, ax_shots = fig.subplots(1, 2)
    for name, points in curves.items():
        ax_tune.plot(*zip(*points), marker="o", ms=3, label=name)
    ax_tune.set(xlabel="step", ylabel="test top-1", title="Fashion-MNIST 1k at 48 px: fine-tuned vs scratch",
                ylim=(0, 1))
    for name, result in shots.items():
        ks = sorted(result, key=int)
        ax_shots.errorbar([int(k) for k in ks], [result[k]["mean"] for k in ks], yerr=[result[k]["std"] for k in ks],
                          marker="o", capsize=3, label=name)
    ax_shots.set(xscale="log", xlabel="images per class", ylabel="test top-1", ylim=(0, 1),
                 title="linear few-shot (closed-form ridge)")
    for ax in (ax_tune, ax_shots):
        ax.grid(alpha=0.3)
        ax.legend()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few steps: the pipeline in ~1 min")
    parser.add_argument("--cifar", default=CIFAR, help="the CIFAR-10 shards (relative to the repository root)")
    parser.add_argument("--fashion-mnist", default=os.environ.get("VITLAB_FASHION_MNIST_DIR", FASHION_MNIST),
                        help="the directory of Fashion-MNIST's four idx .gz files")
    parser.add_argument("--pretrained", type=Path, default=None, help="reuse this pre-trained checkpoint")
    parser.add_argument("--out", type=Path, default=None,
                        help="results (default experiments/results/transfer, or runs/transfer-quick with --quick)")
    parser.add_argument("--work", type=Path, default=None, help="run directories (default runs/transfer[-quick])")
    parser.add_argument("--num-workers", type=int, default=1)
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    out = args.out or (ROOT / ("runs/transfer-quick" if args.quick else "experiments/results/transfer"))
    work = args.work or ROOT / ("runs/transfer-quick/work" if args.quick else "runs/transfer")
    shutil.rmtree(work, ignore_errors=True)  # every run starts afresh (except a reused --pretrained)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    cifar = args.cifar if os.path.isabs(args.cifar) else str(ROOT / args.cifar)
    started, times = time.perf_counter(), {}
    common = dict(num_workers=args.num_workers, seed=0, precision="bf16")

    # ---- 1. pre-training on CIFAR-10 at 32 px --------------------------------------------------------------
    t = time.perf_counter()
    if args.pretrained:
        pretrained = args.pretrained
    else:
        pretrained = work / "pretrain"
        train(TrainConfig(data=f"wds:{cifar}", image_size=(32, 32), **MODEL[mode], **PRETRAIN[mode], **common,
                          out=str(pretrained)))
    times["pre-training"] = time.perf_counter() - t
    source = load_model(pretrained)

    # ---- 2. the 1,000-image Fashion-MNIST ------------------------------------------------------------------
    subset = fashion_subset(Path(args.fashion_mnist), work / "fashion-mnist-1k", SUBSET[mode], TEST[mode])
    os.environ["VITLAB_FASHION_MNIST_DIR"] = str(subset)

    # ---- (a) fine-tuning at 48 px against scratch ----------------------------------------------------------
    t = time.perf_counter()
    # in memory, batched by the dataset itself: worker processes would only add their start-up
    tune = dict(data="fashion-mnist", image_size=(48, 48), accum_steps=1, **TUNE[mode], seed=0, num_workers=0,
                precision="bf16")
    runs = {
        "fine-tuned (SGD)": (work / "finetune", fine_tune(init=str(pretrained), **tune, out=str(work / "finetune"))),
        "scratch (AdamW)": (work / "scratch-adamw", TrainConfig(**MODEL[mode], in_chans=3, **tune, **SCRATCH_ADAMW,
                                                                out=str(work / "scratch-adamw"))),
        "scratch (SGD)": (work / "scratch-sgd", fine_tune(**MODEL[mode], in_chans=3, **tune, init=None,
                                                           out=str(work / "scratch-sgd"))),
    }
    finals = {}
    for name, (run, cfg) in runs.items():
        finals[name] = train(cfg)["top1"]
    times["fine-tuning and scratch"] = time.perf_counter() - t

    # ---- (b) few-shot: pre-trained features against random ones --------------------------------------------
    t = time.perf_counter()
    splits = data.build("fashion-mnist", image_size=source.cfg.image_size, in_chans=source.cfg.in_chans,
                        train_transform=None)
    torch.manual_seed(0)
    random_model = VisionTransformer(source.cfg).eval()
    shots = {}
    for name, model in (("pre-trained", source), ("random init", random_model)):
        result = fewshot(model, splits.train, splits.eval, splits.num_classes, shots=FEWSHOT[mode]["shots"],
                         seeds=range(FEWSHOT[mode]["seeds"]), batch_size=256)
        shots[name] = {str(k): v for k, v in result["results"].items()}
    times["few-shot"] = time.perf_counter() - t
    wall = time.perf_counter() - started

    # ---- results -------------------------------------------------------------------------------------------
    curves = {name: evals(run) for name, (run, _) in runs.items()}
    plot(out / "transfer.png", curves, shots)
    record = dict(mode=mode, fine_tune={n: dict(top1=finals[n], curve=curves[n], img_s=img_per_s(r))
                                        for n, (r, _) in runs.items()},
                  fewshot=shots, wall_s=round(wall, 1), stage_s={k: round(v, 1) for k, v in times.items()},
                  model=MODEL[mode], pretrain=PRETRAIN[mode], tune=TUNE[mode], pretrained=str(pretrained),
                  pretrain_img_s=None if args.pretrained else img_per_s(pretrained),
                  torch_threads=torch.get_num_threads())
    atomic_write_text(out / "results.json", json.dumps(record, indent=2) + "\n")
    ks = FEWSHOT[mode]["shots"]
    cfg = source.cfg
    lines = [
        f"# Transfer at small scale{' (--quick: a smoke test, not a result)' if args.quick else ''}",
        "",
        f"Command: `python experiments/transfer.py{' --quick' if args.quick else ''}{f' --pretrained {args.pretrained}' if args.pretrained else ''}`; wall time {wall / 60:.1f} "
        f"min ({', '.join(f'{k} {v / 60:.1f} min' for k, v in times.items())}), {torch.get_num_threads()} torch "
        "threads on CPU.",
        "",
        f"Model: {cfg.num_layers} layers, width {cfg.hidden_size}, {cfg.num_heads} heads, MLP {cfg.mlp_dim}, "
        f"patches {cfg.patch_size[0]}x{cfg.patch_size[1]}, [class] token. Pre-trained on CIFAR-10 at 32 px "
        f"({', '.join(f'{k} {v}' for k, v in pretrain_settings(Path(pretrained), PRETRAIN[mode]).items())}; "
        f"`{pretrained}`, {pretrain_result(Path(pretrained))}).",
        "",
        f"## (a) Fine-tuning at 48 px on {SUBSET[mode]:,} Fashion-MNIST images, test set of {TEST[mode]:,}",
        "",
        f"{TUNE[mode]['steps']} steps of {TUNE[mode]['batch_size']} images for every row. Fine-tuned: the paper's "
        "recipe (SGD momentum 0.9, lr 0.03, no weight decay, cosine, new zero head, position embeddings "
        "interpolated 4x4 -> 6x6). Scratch: the same architecture at 48 px, once with AdamW (lr 1e-3, weight "
        "decay 0.05, cosine) and once with the fine-tuning recipe.",
        "",
        "| run | test top-1 | train img/s |",
        "|---|---|---|",
        *[f"| {n} | {finals[n]:.4f} | {img_per_s(r):.0f} |" for n, (r, _) in runs.items()],
        "",
        f"## (b) Linear few-shot on the same {SUBSET[mode]:,} images (test top-1, mean ± std over "
        f"{FEWSHOT[mode]['seeds']} seeds)",
        "",
        "Frozen [class]-token features at 32 px, a closed-form ridge (λ = 1024) onto {-1, 1}^10 targets, as "
        "big_vision's few-shot evaluator.",
        "",
        "| features | " + " | ".join(f"{k}-shot" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
        *[f"| {n} | " + " | ".join(f"{r[str(k)]['mean']:.4f} ± {r[str(k)]['std']:.4f}" for k in ks) + " |"
          for n, r in shots.items()],
        "",
        "![fine-tuning curves and few-shot accuracy](transfer.png)",
        "",
    ]
    atomic_write_text(out / "results.md", "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'transfer.png'}")


if __name__ == "__main__":
    main()
