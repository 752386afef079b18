"""What a user gets from `vitlab train` against writing the loop themselves around timm's fastest setting.

    python benchmarks/demo_loop.py [--steps 400] [--repeats 2]

Two programs run one after the other, `--repeats` times each, alternating:

1. `vitlab train --preset fashion-mnist-demo --steps 400` (the demo's whole loop: data, augmentation, step,
   metrics, checkpoints); its steady state is the median of the images/s it logs in metrics.jsonl over steps
   150-400;
2. a plain Python process that imports nothing of vitlab: timm's VisionTransformer of the demo's shape with its fused
   attention off (TIMM_FUSED_ATTN=0, timm's fastest setting on CPUs), a hand-written step doing the same work (the
   uint8 batch normalised, bf16 autocast where vitlab trains in bf16, cross-entropy with the demo's label
   smoothing, backward, clipping at 1, AdamW), timed over the same steps 150-400 on random uint8 batches, median
   images/s. Written as a timm user would: eager, torch's default allocator settings.

It prints both medians and their ratio. Nothing here is a test: the ratio is what compares.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HANDWRITTEN = r'''
import json, os, statistics, sys, time
os.environ["TIMM_FUSED_ATTN"] = "0"
import torch, torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
cfg = json.loads(sys.argv[1])
torch.manual_seed(0)
model = VisionTransformer(img_size=cfg["image_size"], patch_size=cfg["patch_size"], in_chans=cfg["in_chans"],
                          num_classes=cfg["num_classes"], embed_dim=cfg["hidden_size"], depth=cfg["num_layers"],
                          num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_dim"] / cfg["hidden_size"],
                          class_token=cfg["classifier"] == "token",
                          global_pool="token" if cfg["classifier"] == "token" else "avg", fc_norm=False,
                          act_layer="gelu_tanh").train()
opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]),
                        weight_decay=cfg["weight_decay"])
mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
batch = cfg["batch_size"]
rates = []
for step in range(cfg["steps"]):
    images = torch.randint(0, 256, (batch, cfg["in_chans"], *cfg["image_size"]), dtype=torch.uint8)
    labels = torch.randint(0, cfg["num_classes"], (batch,))
    t0 = time.perf_counter()
    x = (images.float() / 255 - mean) / std
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg["bf16"]):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg["label_smoothing"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss.item()
    if step >= 150:
        rates.append(batch / (time.perf_counter() - t0))
print(statistics.median(rates))
'''


def vitlab_loop(steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "vitlab", "train", "--preset", "fashion-mnist-demo", "--steps",
                        str(steps), "--out", str(out)], check=True, capture_output=True, cwd=ROOT)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["img_s"] for r in rows if r["split"] == "train" and 150 < r["step"] <= steps]
    return statistics.median(rates)


def handwritten(steps: int) -> float:
    sys.path.insert(0, str(ROOT))
    import torch
    from vitlab.config import PRESETS
    from vitlab.runtime import resolve_precision

    train_cfg = PRESETS["fashion-mnist-demo"]()
    model = train_cfg.model_config(num_classes=10)
    cfg = dict(image_size=list(model.image_size), patch_size=list(model.patch_size), in_chans=model.in_chans,
               num_classes=10, hidden_size=model.hidden_size, num_layers=model.num_layers, num_heads=model.num_heads,
               mlp_dim=model.mlp_dim, classifier=model.classifier, lr=train_cfg.lr, beta1=train_cfg.beta1,
               beta2=train_cfg.beta2, weight_decay=train_cfg.weight_decay, mean=list(model.mean),
               std=list(model.std), batch_size=train_cfg.batch_size, label_smoothing=train_cfg.label_smoothing,
               steps=steps, bf16=resolve_precision(train_cfg.precision, torch.device("cpu")) == "bf16")
    # the precision `vitlab train` picks here: bf16 where the CPU has bf16 instructions, else fp32
    result = subprocess.run([sys.executable, "-c", HANDWRITTEN, json.dumps(cfg)], check=True, capture_output=True,
                            text=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(vitlab_loop(args.steps))
        theirs.append(handwritten(args.steps))
        print(f"vitlab train (steps 150-{args.steps}): {ours[-1]:.0f} img/s; hand-written timm step: "
              f"{theirs[-1]:.0f} img/s", flush=True)
    print(f"median of {args.repeats}: vitlab {statistics.median(ours):.0f} img/s, hand-written "
          f"{statistics.median(theirs):.0f} img/s, ratio {statistics.median(ours) / statistics.median(theirs):.2f}")


if __name__ == "__main__":
    main()
