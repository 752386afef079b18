"""Parts of the training step made faster, each against what it replaced, on this machine.

    python benchmarks/parts_speed.py

1. The compiled tanh GELU: PyTorch's `F.gelu(approximate="tanh")` against vitlab.model.TanhGELU (x sigmoid(2z)),
   both compiled, on bf16 activations of the shape the MLP of step_speed.py's demo model makes (batch 64, 16
   tokens, MLP 768), forward alone and forward + backward.
2. The AdamW update of that model's parameters (2.7M) with make_optimizer's parameter groups: PyTorch's fused CPU
   kernel (what make_optimizer picks) against the foreach implementation (PyTorch's CPU default).
3. Attention in float32, forward + backward: `scaled_dot_product_attention` (PyTorch's fused CPU kernel) against
   the product written out as vitlab.model.Attention writes it, at the demo preset's shape (batch 64, 4 heads of
   32, 16 tokens), at 65 tokens and at ViT-B/16's 197 (model._fused_pays picks between them by length).

Variants are interleaved, best of 20 rounds (attention: also the median). Prints milliseconds and ratios; nothing here is a test.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitlab.config import TrainConfig  # noqa: E402
from vitlab.model import TanhGELU, VisionTransformer  # noqa: E402
from vitlab.train import make_optimizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_speed import CONFIGS  # noqa: E402


def best_ms(variants: dict, rounds: int = 20, calls: int = 10, stat=min) -> dict[str, float]:
    """Milliseconds per call of each no-argument function, the variants interleaved round by round: the best round
    by default, or `stat` (e.g. statistics.median) of the rounds."""
    for fn in variants.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls * 1e3)
    return {name: stat(ts) for name, ts in times.items()}


def show(what: str, times: dict[str, float]) -> None:
    (a, ta), (b, tb) = times.items()
    print(f"{what}: {a} {ta:.3f} ms, {b} {tb:.3f} ms, ratio {ta / tb:.2f}", flush=True)


def gelu() -> None:
    x = torch.randn(64 * 16, 768).bfloat16()
    fns = {"PyTorch's tanh GELU": torch.compile(lambda t: F.gelu(t, approximate="tanh")),
           "TanhGELU": torch.compile(TanhGELU())}
    show("GELU forward", best_ms({name: lambda fn=fn: fn(x) for name, fn in fns.items()}))
    show("GELU forward + backward",
         best_ms({name: lambda fn=fn: fn(x.detach().requires_grad_()).sum().backward() for name, fn in fns.items()}))


def adamw() -> None:
    make, _ = CONFIGS["demo"]
    model = VisionTransformer(make())
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    fused = make_optimizer(model, TrainConfig(data="fashion-mnist", model="vit-ti/7"), torch.device("cpu"))
    foreach = torch.optim.AdamW([dict(g, fused=False, foreach=True) for g in fused.param_groups])
    n = sum(p.numel() for p in model.parameters())
    show(f"AdamW update of {n / 1e6:.1f}M parameters", best_ms({"foreach": foreach.step, "fused": fused.step}))


def attention() -> None:
    for b, h, n, d in ((64, 4, 16, 32), (64, 3, 65, 64), (8, 12, 197, 64)):
        q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
        grad = torch.randn(b, h, n, d)
        fns = {"fused": lambda: F.scaled_dot_product_attention(q, k, v).backward(grad),
               "written out": lambda: (((q * d**-0.5) @ k.transpose(-2, -1)).softmax(-1) @ v).backward(grad)}
        rounds = 10 if n > 100 else 20
        for stat in (min, statistics.median):  # the fused kernel's time varies more from call to call
            show(f"attention forward + backward, float32, {n} tokens (batch {b}, {h} heads of {d}), {stat.__name__}",
                 best_ms(fns, rounds=rounds, stat=stat))


if __name__ == "__main__":
    gelu()
    adamw()
    attention()
