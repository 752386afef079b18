"""Recipe search: a plain vitlab ViT on Fashion-MNIST within a wall-clock budget on a 2-core CPU.

Examples:
  python search.py --bench                       # throughput of a few configs, fp32 vs bf16
  python search.py --budget 120 --patch 7 --width 128 --depth 6
The LR schedule runs on wall-clock progress (elapsed / budget) when --budget is given, else on steps of --epochs.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from vitlab.model import ViTConfig, VisionTransformer, num_params  # noqa: E402

DATA = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530


def load_idx(name: str) -> np.ndarray:
    with gzip.open(DATA / name, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(split: str):
    x = torch.from_numpy(load_idx(f"{split}-images-idx3-ubyte.gz").copy())  # (N, 28, 28) uint8
    y = torch.from_numpy(load_idx(f"{split}-labels-idx1-ubyte.gz").astype(np.int64))
    return x, y


def to_input(x_u8: torch.Tensor, size: int) -> torch.Tensor:
    x = x_u8.float().unsqueeze(1).div_(255.0).sub_(MEAN).div_(STD)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def augment(x: torch.Tensor, pad: int, flip: bool, erase: float) -> torch.Tensor:
    """x: (B, 1, H, W) float, normalised. Random pad-crop (zero = background after norm), h-flip, erasing."""
    B, C, H, W = x.shape
    if pad:
        bg = -MEAN / STD
        xp = F.pad(x, (pad, pad, pad, pad), value=bg)
        oy = torch.randint(0, 2 * pad + 1, (B,))
        ox = torch.randint(0, 2 * pad + 1, (B,))
        rows = (oy[:, None] + torch.arange(H))[:, :, None]  # (B, H, 1)
        cols = (ox[:, None] + torch.arange(W))[:, None, :]  # (B, 1, W)
        x = xp[torch.arange(B)[:, None, None], 0, rows, cols].unsqueeze(1)
    if flip:
        m = torch.rand(B, 1, 1, 1) < 0.5
        x = torch.where(m, x.flip(-1), x)
    if erase > 0:  # one random rectangle (area 2-20%, ratio 0.3-3.3) per selected image, filled with noise
        m = torch.rand(B) < erase
        area = torch.empty(B).uniform_(0.02, 0.2) * H * W
        logr = torch.empty(B).uniform_(math.log(0.3), math.log(3.3))
        r = torch.exp(logr)
        eh = torch.sqrt(area * r).clamp(1, H - 1).long()
        ew = torch.sqrt(area / r).clamp(1, W - 1).long()
        y0 = (torch.rand(B) * (H - eh + 1)).long()
        x0 = (torch.rand(B) * (W - ew + 1)).long()
        ar = torch.arange(H)[None, :, None]
        ac = torch.arange(W)[None, None, :]
        box = ((ar >= y0[:, None, None]) & (ar < (y0 + eh)[:, None, None]) &
               (ac >= x0[:, None, None]) & (ac < (x0 + ew)[:, None, None]) & m[:, None, None])
        x = torch.where(box.unsqueeze(1), torch.randn_like(x), x)
    return x


def build(args) -> VisionTransformer:
    cfg = ViTConfig(image_size=args.size, patch_size=args.patch, in_chans=1, num_classes=10,
                    hidden_size=args.width, num_layers=args.depth, num_heads=args.heads,
                    mlp_dim=int(args.width * args.mlp_ratio), classifier=args.classifier,
                    dropout_rate=args.dropout, mean=(MEAN,), std=(STD,))
    return VisionTransformer(cfg)


def param_groups(model, wd):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "pos_embed" in n or "cls_token" in n else decay).append(p)
    return [dict(params=decay, weight_decay=wd), dict(params=no_decay, weight_decay=0.0)]


@torch.no_grad()
def evaluate(model, x, y, bf16, bs=1000):
    model.eval()
    correct = 0
    for i in range(0, len(x), bs):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x[i:i + bs])
        correct += (logits.argmax(-1) == y[i:i + bs]).sum().item()
    model.train()
    return correct / len(x)


def lr_at(progress, args):
    if progress < args.warmup:
        return args.lr * progress / args.warmup
    p = (progress - args.warmup) / max(1e-8, 1 - args.warmup)
    p = min(p, 1.0)
    if args.sched == "cos":
        return args.lr * (args.final_lr_frac + (1 - args.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))
    return args.lr * (1 - p * (1 - args.final_lr_frac))  # linear


def bench(args):
    """Interleaved rounds over configs x precision; reports best-of-rounds img/s (least disturbed by others)."""
    torch.set_num_threads(args.threads)
    configs = json.loads(args.bench_configs)
    runs = []
    for c in configs:
        a = copy.copy(args)
        for k, v in c.items():
            setattr(a, k, v)
        for bf16 in ((False, True) if args.bf16 < 0 else (bool(args.bf16),)):
            model = build(a)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            x = torch.randn(a.batch, 1, a.size, a.size)
            y = torch.randint(0, 10, (a.batch,))
            runs.append(dict(c=c, a=a, bf16=bf16, model=model, opt=opt, x=x, y=y, best=0.0))
    for r in range(args.bench_rounds):
        for run in runs:
            times = []
            for i in range(args.bench_steps):
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=run["bf16"]):
                    loss = F.cross_entropy(run["model"](run["x"]).float(), run["y"])
                run["opt"].zero_grad(set_to_none=True)
                loss.backward()
                run["opt"].step()
                times.append(time.perf_counter() - t0)
            run["best"] = max(run["best"], run["a"].batch / float(np.median(times[1:])))
    for run in runs:
        print(f"{json.dumps(run['c'])} bs={run['a'].batch} bf16={run['bf16']}  best {run['best']:7.0f} img/s", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--patch", type=int, default=7)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp-ratio", type=float, default=4.0)
    ap.add_argument("--classifier", default="gap")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--beta2", type=float, default=0.99)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--warmup", type=float, default=0.05, help="fraction of the run")
    ap.add_argument("--sched", default="cos")
    ap.add_argument("--final-lr-frac", type=float, default=0.0)
    ap.add_argument("--budget", type=float, default=0.0, help="seconds of training; 0: use --epochs")
    ap.add_argument("--epochs", type=float, default=5)
    ap.add_argument("--pad", type=int, default=0)
    ap.add_argument("--flip", type=int, default=0)
    ap.add_argument("--erase", type=float, default=0.0)
    ap.add_argument("--ls", type=float, default=0.0)
    ap.add_argument("--bf16", type=int, default=0)
    ap.add_argument("--compile", type=int, default=0)
    ap.add_argument("--ema", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=float, default=1.0, help="epochs between evals (not counted in time)")
    ap.add_argument("--clip", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--bench-steps", type=int, default=6)
    ap.add_argument("--bench-rounds", type=int, default=3)
    ap.add_argument("--bench-configs", default="")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    if args.bench:
        return bench(args)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    xtr_u8, ytr = load_split("train")
    xte_u8, yte = load_split("t10k")
    xtr = to_input(xtr_u8, args.size)
    xte = to_input(xte_u8, args.size)
    model = build(args)
    print(f"# {vars(args)}\n# params {num_params(model.cfg)/1e6:.3f}M", flush=True)
    opt = torch.optim.AdamW(param_groups(model, args.wd), lr=args.lr, betas=(0.9, args.beta2))
    ema = None
    if args.ema:
        ema = copy.deepcopy(model).eval()
        for p in ema.parameters():
            p.requires_grad_(False)
    step_fn = model
    if args.compile:
        step_fn = torch.compile(model)

    N = len(xtr)
    steps_per_epoch = N // args.batch
    total_steps = int(args.epochs * steps_per_epoch)
    eval_every = max(1, int(args.eval_every * steps_per_epoch))
    train_time = 0.0
    step = 0
    seen = 0
    perm = torch.randperm(N)
    pos = 0
    curve = []
    t_start = time.perf_counter()
    first_step_time = None
    while True:
        progress = train_time / args.budget if args.budget else step / total_steps
        if progress >= 1.0:
            break
        t0 = time.perf_counter()
        lr = lr_at(progress, args)
        for g in opt.param_groups:
            g["lr"] = lr
        if pos + args.batch > N:
            perm = torch.randperm(N)
            pos = 0
        idx = perm[pos:pos + args.batch]
        pos += args.batch
        xb = augment(xtr[idx], args.pad, bool(args.flip), args.erase)
        yb = ytr[idx]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16)):
            logits = step_fn(xb)
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=args.ls)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                d = min(args.ema, (1 + step) / (10 + step))
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - d)
        step += 1
        seen += args.batch
        dt = time.perf_counter() - t0
        if first_step_time is None:
            first_step_time = dt
        train_time += dt
        done = (train_time / args.budget >= 1.0) if args.budget else step >= total_steps
        if step % eval_every == 0 or done:
            acc = evaluate(model, xte, yte, bool(args.bf16))
            acc_ema = evaluate(ema, xte, yte, bool(args.bf16)) if ema is not None else None
            rec = dict(step=step, epoch=round(seen / N, 3), train_s=round(train_time, 1),
                       img_s=round(seen / train_time), loss=round(loss.item(), 4), acc=acc)
            if acc_ema is not None:
                rec["acc_ema"] = acc_ema
            curve.append(rec)
            print(json.dumps(rec), flush=True)
    total = time.perf_counter() - t_start
    res = dict(tag=args.tag, final_acc=curve[-1]["acc"], final_acc_ema=curve[-1].get("acc_ema"),
               train_s=round(train_time, 1), wall_s=round(total, 1), steps=step, epochs=round(seen / N, 2),
               img_s=round(seen / train_time), first_step_s=round(first_step_time, 2))
    print("RESULT " + json.dumps(res), flush=True)
    out = Path(__file__).with_name("runs.jsonl")
    with out.open("a") as f:
        f.write(json.dumps(dict(args=vars(args), curve=curve, result=res)) + "\n")


if __name__ == "__main__":
    main()
