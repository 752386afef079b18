"""vitlab's training step against timm's VisionTransformer: same config, same batch, same step, side by side.

    python benchmarks/train_speed.py                  # the demo model (Fashion-MNIST, 28 px)
    python benchmarks/train_speed.py --model vit-ti/16 --image-size 224 --batch-size 32

Each row times both models in one process, interleaved (A, B, A, B, ...), so that the machine's noise falls on both
alike; it reports the median step time of each and the ratio timm / vitlab (above 1: vitlab is faster). The rows
are eager and `torch.compile`d, fp32 and bf16 autocast. The step is the same function for both models: normalise
the uint8 batch, forward, cross-entropy, backward, clip at global norm 1, AdamW.

The last lines measure the data loader of `vitlab train` on the same data: images/s of the loader alone against
images/s of the step, which must be at least 3x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitlab.model import ViTConfig, VisionTransformer, variant_config  # noqa: E402


def timm_twin(cfg: ViTConfig):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    return TimmViT(
        img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
        embed_dim=cfg.hidden_size, depth=cfg.num_layers, num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_dim / cfg.hidden_size, class_token=cfg.classifier == "token",
        global_pool="token" if cfg.classifier == "token" else "avg", fc_norm=False,
        act_layer="gelu_tanh" if cfg.gelu == "tanh" else "gelu",
    )


def make_step(model, cfg: ViTConfig, precision: str, compile_: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    forward = torch.compile(model) if compile_ else model
    mean = torch.tensor(cfg.mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std).view(1, -1, 1, 1)

    def step(images_u8, labels):
        x = (images_u8.float() / 255 - mean) / std
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(forward(x), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def bench_row(cfg: ViTConfig, batch: int, precision: str, compile_: bool, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    ours = VisionTransformer(cfg).train()
    theirs = timm_twin(cfg).train()
    theirs.load_state_dict(ours.state_dict())
    images = torch.randint(0, 256, (batch, cfg.in_chans, *cfg.image_size), dtype=torch.uint8)
    labels = torch.randint(0, cfg.num_classes, (batch,))
    steps_fn = {"vitlab": make_step(ours, cfg, precision, compile_), "timm": make_step(theirs, cfg, precision, compile_)}
    times = {"vitlab": [], "timm": []}
    for i in range(warmup + steps):
        order = ("vitlab", "timm") if i % 2 == 0 else ("timm", "vitlab")
        for name in order:
            t0 = time.perf_counter()
            steps_fn[name](images, labels)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    ours_t, theirs_t = statistics.median(times["vitlab"]), statistics.median(times["timm"])
    return dict(vitlab_img_s=batch / ours_t, timm_img_s=batch / theirs_t, ratio=theirs_t / ours_t)


def loader_rate(spec: str, cfg: ViTConfig, batch: int, batches: int, num_workers: int) -> float | None:
    """Images/s of the training data loader alone, as `vitlab train` builds it."""
    try:
        from vitlab import data
    except ImportError:
        return None
    splits = data.build(spec, image_size=cfg.image_size, in_chans=cfg.in_chans, train_transform=data.TrainAug())
    loader = data.make_loader(splits.train, batch, shuffle=True, seed=0, epoch=0, num_workers=num_workers, drop_last=True)
    it = iter(loader)
    next(it)  # start-up (worker processes) is not the steady state
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        images, _ = next(it)
        n += images.shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="'demo' (the Fashion-MNIST demo model) or a variant name")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rows", default="eager-fp32,eager-bf16,compile-fp32,compile-bf16")
    p.add_argument("--data", default="fashion-mnist", help="data spec for the loader measurement ('' to skip)")
    p.add_argument("--num-workers", type=int, default=1)
    args = p.parse_args()

    if args.model == "demo":
        from vitlab.train import fashion_mnist_demo

        cfg = fashion_mnist_demo().model_config(num_classes=10)
    else:
        cfg = variant_config(args.model, image_size=args.image_size or 224, num_classes=10)
    if args.image_size and args.model == "demo":
        cfg = cfg.replace(image_size=args.image_size)
    torch.set_num_threads(torch.get_num_threads())
    print(f"model: {cfg.name or 'custom'} width {cfg.hidden_size} depth {cfg.num_layers} heads {cfg.num_heads} "
          f"mlp {cfg.mlp_dim} patch {cfg.patch_size} image {cfg.image_size} in_chans {cfg.in_chans}; batch "
          f"{args.batch_size}; {torch.get_num_threads()} threads; torch {torch.__version__}")
    print(f"| mode | precision | vitlab img/s | timm img/s | timm time / vitlab time |")
    print(f"|---|---|---:|---:|---:|")
    step_rate = None
    for row in args.rows.split(","):
        mode, precision = row.split("-")
        r = bench_row(cfg, args.batch_size, precision, mode == "compile", args.steps, args.warmup + (3 if mode == "compile" else 0))
        step_rate = max(step_rate or 0, r["vitlab_img_s"])
        print(f"| {mode} | {precision} | {r['vitlab_img_s']:.0f} | {r['timm_img_s']:.0f} | {r['ratio']:.3f} |", flush=True)
    if args.data:
        rate = loader_rate(args.data, cfg, args.batch_size, 100, args.num_workers)
        if rate is not None:
            print(f"loader ({args.data}, {args.num_workers} worker(s)): {rate:.0f} img/s; fastest step: {step_rate:.0f} img/s; "
                  f"loader / step = {rate / step_rate:.1f}x")


if __name__ == "__main__":
    main()
