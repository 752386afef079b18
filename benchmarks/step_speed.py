"""vitlab's training and inference steps against timm's, side by side in one process, against the machine's peak.

    python benchmarks/step_speed.py                         # the three configs, training and inference
    python benchmarks/step_speed.py --configs demo --modes train --no-compile
    python benchmarks/step_speed.py --configs preset-demo,preset-demo-p4 --modes train --precision fp32

It first measures the machine's matrix-multiply peak (in --precision, a large square product, best of several), then
for each config times every variant in rounds, interleaved (each round runs every variant for a few steps, in a
rotating order), so that the machine's noise falls on all alike:

- vitlab, eager and `torch.compile`d: the product's own step (vitlab.train.train_step with the classification
  objective, AdamW from make_optimizer, clipping; label smoothing 0.1, autocast) and its inference path
  (vitlab.runtime.Predictor, what `vitlab eval`, `predict` and `serve` use);
- timm's VisionTransformer of the same shape and numerics, with its fused attention on (its default) and off
  (TIMM_FUSED_ATTN=0, its fastest setting on CPUs), eager and compiled: a hand-written step doing the same work
  (normalise the uint8 batch, forward under autocast, cross-entropy with label smoothing, backward, clip at
  global norm 1, AdamW) and an inference forward under autocast and inference_mode.

Each row gives images/s (median over rounds, and the best round), the GFLOP/s that makes (forward FLOPs of the
model, vitlab.model.forward_flops, x3 for a training step) and its share of the peak. Training and inference
are timed with the same batch. `--precision` (default auto: bf16 where the CPU has bf16 instructions, else
fp32, as `vitlab train` picks) sets every variant's autocast and the peak the shares are of. Nothing here is a
test: timings vary with the machine; the ratios in one run are what compare.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitlab.config import PRESETS, TrainConfig  # noqa: E402
from vitlab.model import ViTConfig, VisionTransformer, forward_flops, variant_config  # noqa: E402
from vitlab.runtime import Predictor, autocast, resolve_precision  # noqa: E402
from vitlab.train import ClassificationObjective, Process, make_optimizer, train_step  # noqa: E402

CONFIGS = {  # name: (config, batch)
    "demo": (lambda: variant_config("vit-ti/7", image_size=28, in_chans=1, hidden_size=192, num_layers=6, num_heads=3,
                                    mlp_dim=768, classifier="gap", num_classes=10), 64),
    "ti4": (lambda: variant_config("vit-ti/4", image_size=32, num_classes=10), 128),
    "s16": (lambda: variant_config("vit-s/16", image_size=224, num_classes=1000), 16),
    # the fashion-mnist-demo preset's model as the preset builds it, and at the last preset's patch 4
    "preset-demo": (lambda: PRESETS["fashion-mnist-demo"]().model_config(num_classes=10), 64),
    "preset-demo-p4": (lambda: dataclasses.replace(PRESETS["fashion-mnist-demo"](), model="vit-ti/4")
                       .model_config(num_classes=10), 64),
}
DESCRIPTION = {"demo": "demo model (p7, width 192, 6 layers, 28 px)", "ti4": "ViT-Ti/4 at 32 px",
               "s16": "ViT-S/16 at 224 px", "preset-demo": "the demo preset (p7, width 128, 4 layers, 28 px)",
               "preset-demo-p4": "the last demo preset (p4, width 128, 4 layers, 28 px)"}
CPU = torch.device("cpu")


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 12) -> float:
    """GFLOP/s of the best of `repeats` (n x n) @ (n x n) products in `dtype`."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timm_twin(cfg: ViTConfig, fused: bool):
    """timm's VisionTransformer of the same shape and numerics (tanh GELU, eps 1e-6, pooling), attention fused or not."""
    from timm.layers import set_fused_attn
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    set_fused_attn(fused)
    return TimmViT(
        img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
        embed_dim=cfg.hidden_size, depth=cfg.num_layers, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.hidden_size,
        class_token=cfg.classifier == "token", global_pool="token" if cfg.classifier == "token" else "avg",
        fc_norm=False, act_layer="gelu_tanh" if cfg.gelu == "tanh" else "gelu",
    )


def timm_train_step(model, cfg: ViTConfig, compiled: bool, precision: str):
    """The hand-written step of a timm user: what vitlab's step does, written out."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    forward = torch.compile(model) if compiled else model
    mean, std = torch.tensor(cfg.mean).view(1, -1, 1, 1), torch.tensor(cfg.std).view(1, -1, 1, 1)

    def step(images, labels):
        x = (images.float() / 255 - mean) / std
        with autocast(CPU, precision):
            logits = forward(x)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=0.1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timm_infer_step(model, cfg: ViTConfig, compiled: bool, precision: str):
    model.eval()
    forward = torch.compile(model) if compiled else model
    mean, std = torch.tensor(cfg.mean).view(1, -1, 1, 1), torch.tensor(cfg.std).view(1, -1, 1, 1)

    def step(images, labels):
        with torch.inference_mode(), autocast(CPU, precision):
            forward((images.float() / 255 - mean) / std)

    return step


def vitlab_train_step(cfg: ViTConfig, compiled: bool, precision: str):
    model = VisionTransformer(cfg).train()
    train_cfg = TrainConfig(data="fashion-mnist", model="vit-ti/16", lr=1e-4, weight_decay=0.05, label_smoothing=0.1,
                            precision=precision, compile=compiled)
    optimizer = make_optimizer(model, train_cfg, CPU)
    net = torch.compile(model) if compiled else model
    objective = ClassificationObjective(cfg, CPU, precision, label_smoothing=0.1)
    proc = Process(0, 1, CPU)

    def step(images, labels):
        train_step(net, model, optimizer, objective, images, labels, 1e-4, 0, train_cfg, proc)

    return step


def vitlab_infer_step(cfg: ViTConfig, compiled: bool, precision: str):
    predictor = Predictor(VisionTransformer(cfg), precision=precision, compile=compiled)

    def step(images, labels):
        predictor.logits(images)

    return step


def variants(cfg: ViTConfig, mode: str, compile_: bool, precision: str) -> dict:
    out = {}
    for compiled in (False, True) if compile_ else (False,):
        suffix = ", compiled" if compiled else ""
        if mode == "train":
            out[f"vitlab{suffix}"] = vitlab_train_step(cfg, compiled, precision)
            for fused in (True, False):
                out[f"timm fused {'on' if fused else 'off'}{suffix}"] = timm_train_step(
                    timm_twin(cfg, fused).train(), cfg, compiled, precision)
        else:
            out[f"vitlab{suffix}"] = vitlab_infer_step(cfg, compiled, precision)
            for fused in (True, False):
                out[f"timm fused {'on' if fused else 'off'}{suffix}"] = timm_infer_step(timm_twin(cfg, fused), cfg,
                                                                                        compiled, precision)
    return out


def bench(cfg: ViTConfig, batch: int, mode: str, compile_: bool, rounds: int, steps: int, peak: float,
          precision: str) -> list[dict]:
    # Compiled code of the configs before is dropped: timm's forward is one code object for all its models, and
    # past dynamo's recompile limit (8) a new model of it would silently run eager.
    torch._dynamo.reset()
    torch.manual_seed(0)
    images = torch.randint(0, 256, (batch, cfg.in_chans, *cfg.image_size), dtype=torch.uint8)
    labels = torch.randint(0, cfg.num_classes, (batch,))
    fns = variants(cfg, mode, compile_, precision)
    for fn in fns.values():  # warm-up: compilation, allocator, caches
        for _ in range(3):
            fn(images, labels)
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # a rotating order
            t = _timed(lambda: [fns[name](images, labels) for _ in range(steps)])
            times[name].append(t / steps)
    flops = forward_flops(cfg) * (3 if mode == "train" else 1)
    rows = []
    for name, ts in times.items():
        median, best = batch / statistics.median(ts), batch / min(ts)
        rows.append(dict(variant=name, median=median, best=best, gflops=median * flops / 1e9,
                         share=median * flops / 1e9 / peak))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="demo,ti4,s16", help=f"comma-separated of {', '.join(CONFIGS)}")
    p.add_argument("--modes", default="train,infer")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    args = p.parse_args()
    precision = resolve_precision(args.precision, CPU)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, MALLOC_MMAP_THRESHOLD_="
          f"{os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}")
    # the peak of the precision measured (an emulated bf16 product of 2048^3 takes ~10 s on an AVX2 CPU)
    peak = matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)
    print(f"matmul peak (2048^3, best of 12): {precision} {peak:.0f} GFLOP/s; every variant in {precision}")
    print()
    print(f"| config | mode | variant | img/s (median) | img/s (best) | GFLOP/s | share of {precision} peak |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name in args.configs.split(","):
        make, batch = CONFIGS[name]
        cfg = make()
        for mode in args.modes.split(","):
            rows = bench(cfg, batch, mode, args.compile, args.rounds, args.steps, peak, precision)
            best_timm = max(r["median"] for r in rows if r["variant"].startswith("timm"))
            best_ours = max(r["median"] for r in rows if r["variant"].startswith("vitlab"))
            for r in rows:
                print(f"| {DESCRIPTION[name]}, batch {batch} | {mode} | {r['variant']} | {r['median']:,.0f} | "
                      f"{r['best']:,.0f} | {r['gflops']:.0f} | {100 * r['share']:.0f}% |", flush=True)
            print(f"| {DESCRIPTION[name]}, batch {batch} | {mode} | **vitlab's best / timm's best** | "
                  f"**{best_ours / best_timm:.2f}** | | | |", flush=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
