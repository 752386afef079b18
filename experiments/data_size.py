"""The paper's data-size and compute comparisons (Fig. 3/4 and Fig. 5) at this machine's scale, on CIFAR-10.

Two experiments, every run a `vitlab train` command (printed as it starts), all on the CIFAR-10 training shards
with a validation split of 10% cut from them by key hash (4,990 images; the test split is held back), 32 px,
the same recipe for every model (AdamW, lr 2e-3, beta2 0.99, weight decay 0.05, 5% warm-up then cosine, pad-and-
crop and flips, batch 128, bf16) and the same number of steps:

1. Data size (Fig. 3/4): a ViT and a BiT ResNet of similar training time per step here, trained on nested
   subsets of the training split of growing size; and, as the third line, the same ViT pre-trained by masked
   patch prediction on the whole training split (labels unused) and fine-tuned on each subset with the same
   recipe. Fig. 3/4 of the paper: ResNets ahead on small pre-training sets, ViTs catching up as data grows.
2. Compute (Fig. 5): ViT, BiT and hybrid models of three sizes each on the whole training split, validation
   accuracy against the training FLOPs the loop counted (3 x forward FLOPs x images; `train_flops` in
   metrics.jsonl).

    python experiments/data_size.py                      # both, ~1.5 h on 2 CPU cores
    python experiments/data_size.py --steps 100 --sizes 1000,4000 --out /tmp/quick   # a smoke run

Runs go to OUT/<name>; a run whose directory holds a finished result is not run again, so an interrupted
experiment continues where it stopped. It writes OUT/results.jsonl, OUT/data_size.png, OUT/compute.png and
OUT/RESULTS.md (the tables the README quotes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARDS = ROOT.parent / "shared/data/cifar10-jpeg/train-000{0..4}.tar"

RECIPE = ["--image-size", "32", "--val-split", "0.1", "--batch-size", "128", "--optimizer", "adamw", "--lr", "2e-3",
          "--beta2", "0.99", "--weight-decay", "0.05", "--warmup", "0.05", "--schedule", "cosine",
          "--precision", "bf16", "--num-workers", "1", "--log-every", "50"]

# name: (what the plots call it, family, model flags)
VIT = ["--model", "vit-ti/4", "--hidden-size", "96", "--num-layers", "4", "--num-heads", "3", "--mlp-dim", "384"]
BIT = ["--model", "bit-r26x0.5"]
MODELS = {
    "vit-s": ("ViT w64 d4 /4", "ViT", ["--model", "vit-ti/4", "--hidden-size", "64", "--num-layers", "4",
                                       "--num-heads", "2", "--mlp-dim", "256"]),
    "vit-m": ("ViT w96 d4 /4", "ViT", VIT),
    "vit-l": ("ViT w128 d6 /4", "ViT", ["--model", "vit-ti/4", "--hidden-size", "128", "--num-layers", "6",
                                        "--num-heads", "4", "--mlp-dim", "512"]),
    "bit-s": ("BiT-R26x0.25", "BiT", ["--model", "bit-r26x0.25"]),
    "bit-m": ("BiT-R26x0.5", "BiT", BIT),
    "bit-l": ("BiT-R26x1", "BiT", ["--model", "bit-r26x1"]),
    # hybrids: a ResNet stem of width 16 (x0.25) or 32 (x0.5) before the ViT, its feature map's cells the patches
    "hyb-s": ("R(1)x0.25+ViT w96 d4 /4", "hybrid", ["--model", "r26+vit-ti/4", "--resnet-num-layers", "1",
                                                    "--resnet-width-factor", "0.25"] + VIT[2:]),
    "hyb-m": ("R(2,2)x0.5+ViT w128 d6 /8", "hybrid", ["--model", "r26+vit-ti/8", "--resnet-num-layers", "2,2",
                                                      "--resnet-width-factor", "0.5", "--hidden-size", "128",
                                                      "--num-layers", "6", "--num-heads", "4", "--mlp-dim", "512"]),
    "hyb-l": ("R(1)x0.25+ViT w128 d6 /4", "hybrid", ["--model", "r26+vit-ti/4", "--resnet-num-layers", "1",
                                                     "--resnet-width-factor", "0.25", "--hidden-size", "128",
                                                     "--num-layers", "6", "--num-heads", "4", "--mlp-dim", "512"]),
}


def vitlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "vitlab", *args]


def run(out: Path, name: str, command: list[str], log) -> dict:
    """Run one training command into out/name unless it finished before; its result row."""
    run_dir = out / name
    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    if run_dir.exists():  # an interrupted run: start it again from scratch (they are minutes long)
        import shutil

        shutil.rmtree(run_dir)
    command = command + ["--out", str(run_dir)]
    print(f"$ {' '.join(command[2:])}", flush=True)
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as f:
        subprocess.run(command, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"][-1]
    result = dict(name=name, val_top1=val["top1"], val_loss=val["loss"], val_n=val["n"], steps=train[-1]["step"],
                  train_flops=train[-1]["train_flops"], wall_s=round(wall, 1), command=" ".join(command[2:]))
    done.write_text(json.dumps(result) + "\n")
    log.write(json.dumps(result) + "\n")
    log.flush()
    print(f"  {name}: val top-1 {result['val_top1']:.4f}, {result['train_flops']:.3g} training FLOPs, "
          f"{wall / 60:.1f} min", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=f"wds:{SHARDS}")
    parser.add_argument("--out", default="runs/data_size")
    parser.add_argument("--steps", type=int, default=1200, help="steps of every run (batch 128)")
    parser.add_argument("--mpp-steps", type=int, default=2400, help="steps of masked patch prediction")
    parser.add_argument("--sizes", default="2000,5000,10000,20000,45000", help="training-set sizes")
    parser.add_argument("--skip", default="", help="comma-separated: data, compute")
    args = parser.parse_args()
    out = (ROOT / args.out) if not os.path.isabs(args.out) else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    steps = ["--steps", str(args.steps), "--save-every", str(args.steps), "--eval-every", str(args.steps)]
    base = vitlab("train", "--data", args.data, *RECIPE)
    results = {}
    with open(out / "results.jsonl", "a") as log:
        if "data" not in args.skip:
            mpp = run(out, "mpp-pretrain", base + VIT + ["--objective", "mpp", "--steps", str(args.mpp_steps),
                                                        "--save-every", str(args.mpp_steps)], log)
            results["mpp-pretrain"] = mpp
            for n in sizes:
                for key, flags in (("vit", VIT), ("bit", BIT)):
                    results[f"{key}-{n}"] = run(out, f"{key}-{n}", base + flags + ["--train-images", str(n)] + steps,
                                                log)
                results[f"mpp-ft-{n}"] = run(out, f"mpp-ft-{n}", base + ["--init", str(out / "mpp-pretrain"),
                                                                         "--train-images", str(n)] + steps, log)
        if "compute" not in args.skip:
            full = max(sizes)
            for key, (_, family, flags) in MODELS.items():
                if key == "vit-m" and f"vit-{full}" in results:
                    results[key] = results[f"vit-{full}"]
                elif key == "bit-m" and f"bit-{full}" in results:
                    results[key] = results[f"bit-{full}"]
                else:
                    results[key] = run(out, key, base + flags + ["--train-images", str(full)] + steps, log)
    report(out, results, sizes, args)
    unique = sorted({r["name"]: r for r in results.values()}.values(), key=lambda r: r["name"])
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unique))


def report(out: Path, results: dict, sizes: list[int], args) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"# Data size and compute at this machine's scale (CIFAR-10, 32 px, val split of 4,990 images)\n",
             f"Every run: {args.steps} steps of 128 images, the same recipe (experiments/data_size.py).\n"]
    if any(k.startswith("vit-") and k[4:].isdigit() for k in results):
        mpp = results.get("mpp-pretrain")
        lines += ["## Validation top-1 against training-set size\n",
                  "| training images | ViT w96 d4 /4 (scratch) | BiT-R26x0.5 (scratch) | ViT, MPP-pre-trained then fine-tuned |",
                  "|---:|---:|---:|---:|"]
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for key, label, style in (("vit", "ViT w96 d4 /4, from scratch", "o-"), ("bit", "BiT-R26x0.5, from scratch", "s-"),
                                  ("mpp-ft", "ViT, masked-patch pre-trained, fine-tuned", "^--")):
            xs = [n for n in sizes if f"{key}-{n}" in results]
            ax.plot(xs, [results[f"{key}-{n}"]["val_top1"] for n in xs], style, label=label)
        for n in sizes:
            cells = [f"{results[f'{k}-{n}']['val_top1']:.4f}" if f"{k}-{n}" in results else "-"
                     for k in ("vit", "bit", "mpp-ft")]
            lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
        walls = {k: sum(results[f"{k}-{n}"]["wall_s"] for n in sizes if f"{k}-{n}" in results) / 60
                 for k in ("vit", "bit", "mpp-ft")}
        lines.append(f"| wall time, all sizes | {walls['vit']:.1f} min | {walls['bit']:.1f} min | "
                     f"{walls['mpp-ft']:.1f} min (+ {mpp['wall_s'] / 60:.1f} min pre-training) |" if mpp else "")
        if mpp:
            lines.append(f"\nMasked patch prediction: {mpp['steps']} steps on the whole training split, labels "
                         f"unused; val accuracy of the corrupted patches' 3-bit mean colours {mpp['val_top1']:.4f}.\n")
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("training images (nested subsets of the CIFAR-10 training split)")
        ax.set_ylabel("validation top-1")
        ax.set_title(f"Accuracy against data size ({args.steps} steps each)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "data_size.png", dpi=120)
        plt.close(fig)
    if any(k in results for k in MODELS):
        lines += ["## Validation top-1 against training compute (whole training split)\n",
                  "| model | family | forward GFLOPs/image | training FLOPs | val top-1 | wall time |",
                  "|---|---|---:|---:|---:|---:|"]
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for family, style in (("ViT", "o-"), ("BiT", "s-"), ("hybrid", "^-")):
            keys = sorted((k for k, (_, f, _) in MODELS.items() if f == family and k in results),
                          key=lambda k: results[k]["train_flops"])
            ax.plot([results[k]["train_flops"] for k in keys], [results[k]["val_top1"] for k in keys], style,
                    label=family)
            for k in keys:
                r = results[k]
                per_image = r["train_flops"] / (3 * r["steps"] * 128) / 1e9
                lines.append(f"| {MODELS[k][0]} | {family} | {per_image:.4f} | {r['train_flops']:.3g} | "
                             f"{r['val_top1']:.4f} | {r['wall_s'] / 60:.1f} min |")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("training compute (FLOPs: 3 x forward FLOPs x images)")
        ax.set_ylabel("validation top-1")
        ax.set_title(f"Accuracy against compute ({args.steps} steps of 128 images)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "compute.png", dpi=120)
        plt.close(fig)
    unique = {r["name"]: r for r in results.values()}  # vit-m is vit-45000, bit-m bit-45000
    total = sum(r["wall_s"] for r in unique.values()) / 60
    lines.append(f"\nAll {len(unique)} runs: {total:.1f} min of training and evaluation, one after another, on 2 CPU "
                 "cores. Rerun: `python experiments/data_size.py` (each run's full `vitlab train` command is in "
                 "runs.jsonl).\n")
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print((out / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
