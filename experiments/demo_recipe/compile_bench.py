"""Eager vs torch.compile (inductor) for the p7 w128 d6 ViT, fp32 and bf16 autocast: compile time and img/s."""
import sys, time, json, argparse
from pathlib import Path
import numpy as np, torch, torch.nn.functional as F
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from vitlab.model import ViTConfig, VisionTransformer
torch.set_num_threads(2)
ap = argparse.ArgumentParser(); ap.add_argument("--width", type=int, default=128); ap.add_argument("--heads", type=int, default=4)
ap.add_argument("--depth", type=int, default=6); ap.add_argument("--bs", type=int, default=256); ap.add_argument("--bf16", type=int, default=0)
a = ap.parse_args()
cfg = ViTConfig(image_size=28, patch_size=7, in_chans=1, num_classes=10, hidden_size=a.width, num_layers=a.depth,
                num_heads=a.heads, mlp_dim=4 * a.width, classifier="gap")
x = torch.randn(a.bs, 1, 28, 28); y = torch.randint(0, 10, (a.bs,))
runs = {}
for name in ("eager", "compiled"):
    m = VisionTransformer(cfg); opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    f = torch.compile(m) if name == "compiled" else m
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(a.bf16)):
            loss = F.cross_entropy(f(x).float(), y)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    t0 = time.perf_counter(); step(); step(); first = time.perf_counter() - t0
    runs[name] = dict(step=step, first=first, best=0)
for r in range(4):
    for name, run in runs.items():
        ts = []
        for i in range(6):
            t0 = time.perf_counter(); run["step"](); ts.append(time.perf_counter() - t0)
        run["best"] = max(run["best"], a.bs / float(np.median(ts)))
for name, run in runs.items():
    print(json.dumps(dict(name=name, bf16=a.bf16, width=a.width, first_two_steps_s=round(run["first"], 1), best_img_s=round(run["best"]))), flush=True)
