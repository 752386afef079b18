"""The presets' recipes against the old ones, and what each ingredient bought: accuracy against wall-clock minutes.

    python experiments/recipes.py run [NAME ...]     # run the named runs (all by default) one after another
    python experiments/recipes.py report             # the table and the plot of what has run

Every run is a `vitlab train` command (printed as it starts; the list is RUNS below) into
experiments/results/recipes/runs/NAME. A run that finished is not run again. Runs never overlap: the machine has two
cores, and accuracy against time is the measure. `report` reads each run's metrics.jsonl (every evaluation row
carries the run's wall-clock seconds, `wall_s`) and writes experiments/results/recipes/{results.md,results.json,
curves.png}: per preset, the final accuracy and wall time of each run, and the curves of accuracy against minutes.

The ablations take one ingredient out of a preset at a time (or, for the old recipe, put one in), at the preset's
own length, so that a row's difference to the preset is what that ingredient bought at that budget.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "recipes"
CIFAR = "wds:../shared/data/cifar10-jpeg/train-000{0..4}.tar"  # relative to ROOT, where the runs start
NO_LIMIT = ["--time-limit", "none"]  # runs from before the presets had a time limit, as they ran
NO_TTA = ["--tta", "none"]  # the CIFAR-10 runs from before those presets had flip TTA, as they ran
EVERY_EPOCH = ["--eval-epochs", "1"]  # the CIFAR-10 preset runs from before they evaluated every third epoch
ONE_SIZE = ["--progressive-sizes", "none"]  # the cifar10-vit runs from before progressive resizing
NO_DROP_PATH = ["--drop-path", "none"]  # the cifar10-vit runs from before stochastic depth

# name -> (group, label, vitlab train flags)
RUNS: dict[str, tuple[str, str, list[str]]] = {}
COMPARED_WITH: dict[str, str] = {}  # a run -> the preset run its "vs the preset" compares with (default: BASE's)


MACHINES = {"avx2": "AVX2 (fp32)", "bf16": "AVX-512 BF16 (bf16)"}
MACHINE: dict[str, str] = {}  # a run -> the CPU it ran on, a key of MACHINES


def run(group: str, name: str, label: str, *flags: str, compare_with: str | None = None,
        machine: str = "avx2") -> None:
    RUNS[name] = (group, label, list(flags))
    MACHINE[name] = machine
    if compare_with:
        COMPARED_WITH[name] = compare_with


# Fashion-MNIST, the demo. Two machines: the runs up to the last round's ran on an AVX-512 BF16 CPU in bf16 (BF16
# below, dashed in the plot); this machine has AVX2 alone, where bf16 is emulated (the last preset but one trained at
# 21 images/s in bf16 against 303 in fp32) and `--precision auto` trains in fp32, and there patch 7 runs 2.5-2.9x the
# images/s of patch 4 (benchmarks/step_speed.py). Rows compare with the preset on their own machine and code.
# The preset (the mimetic attention init, 14 epochs within 12.5 minutes) from a fresh clone (a scratch wrapper that
# applied the same formula, vitlab.model.mimetic_init_, before the flag existed had printed the same accuracies to
# the fourth digit); the last preset + the mimetic init (9 epochs), run by that wrapper; 5-minute proxies. Then the
# last preset (9 epochs, flip TTA, evaluated every second epoch), at batch 32, its 10-epoch run and two changes to
# that, MLP 512 and 6 layers; the 11-epoch run
# without TTA, which ran with the written-out attention before TTA existed; then the preset before it (7 epochs,
# PyTorch's fused attention, no TTA) and its 8-epoch, 9-epoch and no-EMA runs. Then the patch 4 preset
# (below "the patch 4 preset") and the runs behind it, on the bf16 machine: the recipe before it (patch 7,
# width 192, 6 layers, no EMA; it ran 11 epochs on a machine twice as fast, there 6), one change at a time. The rows
# marked "6-epoch" change that preset as it stood before flips and 8 epochs (SIX); they and the patch 7 rows ran
# before the compiled tanh GELU (vitlab.model.TanhGELU) and the fused AdamW made the step faster. Runs that predate
# a flag are pinned to what they ran with (--tta none, --eval-epochs 1).
OFFICIAL = ["--attention-init", "official"]  # the runs before the mimetic initialisation
DEMO = ["--preset", "fashion-mnist-demo", *NO_LIMIT, *OFFICIAL]
NINE = [*DEMO, "--epochs", "9"]  # the last preset
PER_EPOCH = ["--eval-epochs", "1"]  # the runs before the preset evaluated every second epoch
P7_7EP = [*DEMO, "--epochs", "7", "--tta", "none", *PER_EPOCH]  # the last preset, before flip TTA and 10 epochs
LAST = [*DEMO, "--model", "vit-ti/4", "--precision", "bf16", "--tta", "none", *PER_EPOCH]
P4 = [*LAST, "--epochs", "8"]  # the patch 4 preset, as it ran
SIX = [*LAST, "--epochs", "6", "--no-flip"]
P7 = ["--model", "vit-ti/7", "--hidden-size", "192", "--num-layers", "6", "--num-heads", "3", "--mlp-dim", "768"]
run("demo", "demo-mimetic", "fashion-mnist-demo (patch 7, width 128, 4 layers, mimetic attention init, EMA, flips, "
    "flip TTA, 14 epochs, 12.5-minute limit): `make demo` from a fresh clone", "--preset", "fashion-mnist-demo")
run("demo", "demo-mimetic-9ep", "the preset at 9 epochs (the last preset + the mimetic attention init), by the "
    "scratch wrapper", "--preset", "fashion-mnist-demo", "--epochs", "9", compare_with="demo-p7-9ep-tta")
# 5-minute proxies: each run ended by a 5-minute limit, evaluated once at the end, against the first
PROXY = ["--preset", "fashion-mnist-demo", "--time-limit", "5", "--epochs", "30", "--eval-epochs", "100"]
FIVE = dict(compare_with="demo-px-base")
run("demo", "demo-px-base", "5 minutes of the last preset (the official attention init)", *PROXY, *OFFICIAL, **FIVE)
run("demo", "demo-px-mimetic", "5 minutes + the mimetic attention init (the scratch wrapper)", *PROXY, **FIVE)
run("demo", "demo-px-lr5e-4", "5 minutes at lr 5e-4", *PROXY, *OFFICIAL, "--lr", "5e-4", **FIVE)
run("demo", "demo-px-lr2e-3", "5 minutes at lr 2e-3", *PROXY, *OFFICIAL, "--lr", "2e-3", **FIVE)
run("demo", "demo-px-p4w64l4", "5 minutes at patch 4, width 64, 4 layers, 2 heads, MLP 128", *PROXY,
    *OFFICIAL, "--model", "vit-ti/4", "--hidden-size", "64", "--num-heads", "2", "--mlp-dim",
    "128", **FIVE)
run("demo", "demo-px-p4w64l6", "5 minutes at patch 4, width 64, 6 layers, 4 heads, MLP 128", *PROXY,
    *OFFICIAL, "--model", "vit-ti/4", "--hidden-size", "64", "--num-layers", "6", "--mlp-dim",
    "128", **FIVE)
run("demo", "demo-p7-9ep-tta", "the last preset (the official attention init, 9 epochs)", *NINE)
TEN = [*DEMO, "--epochs", "10"]
LAST9 = dict(compare_with="demo-p7-9ep-tta")  # rows of the last preset compare with it
run("demo", "demo-p7-10ep-tta", "the last preset, 10 epochs", *TEN, **LAST9)
run("demo", "demo-p7-drop-path", "10 epochs + stochastic depth 0.1, evaluated each epoch", *TEN, "--drop-path", "0.1",
    *PER_EPOCH, compare_with="demo-p7-10ep-tta")
run("demo", "demo-p7-crop1", "10 epochs + pad-and-crop by 1 px, evaluated each epoch", *TEN, "--crop", "pad",
    "--crop-pad", "1", *PER_EPOCH, compare_with="demo-p7-10ep-tta")
run("demo", "demo-p7-bs32", "the last preset at batch 32, lr 7e-4", *NINE, "--batch-size", "32", "--lr", "7e-4",
    "--eval-every", "1874", **LAST9)  # as it ran, before --eval-epochs: every 1,874 steps, an epoch of batch 32 less 1
run("demo", "demo-p7-mlp512", "the last preset with MLP 512 (the paper's ratio of 4) and its time limit of 12.5 "
    "minutes", "--preset", "fashion-mnist-demo", *OFFICIAL, "--epochs", "9", "--mlp-dim", "512", **LAST9)
run("demo", "demo-p7-l6", "the last preset with 6 layers and its time limit of 12.5 minutes", "--preset",
    "fashion-mnist-demo", *OFFICIAL, "--epochs", "9", "--num-layers", "6", **LAST9)
run("demo", "demo-p7-11ep", "11 epochs without TTA, the written-out attention", *DEMO, "--epochs", "11",
    "--tta", "none", *PER_EPOCH, **LAST9)
run("demo", "demo-p7", "the preset before it (7 epochs, no TTA, SDPA attention)", *P7_7EP, **LAST9)
run("demo", "demo-p7-8ep", "the preset before it, 8 epochs", *P7_7EP, "--epochs", "8", compare_with="demo-p7")
run("demo", "demo-p7-9ep", "the preset before it, 9 epochs", *P7_7EP, "--epochs", "9", compare_with="demo-p7")
run("demo", "demo-p7-noema", "the preset before it without the EMA", *P7_7EP, "--ema-decay", "none",
    compare_with="demo-p7")
BF16 = dict(compare_with="demo", machine="bf16")
run("demo", "demo", "the patch 4 preset (patch 4, width 128, 4 layers, EMA, flips, 8 epochs)", *P4,
    **BF16)
run("demo", "demo-crop", "the patch 4 preset + pad-and-crop (4 px), stopped after 3 of 8 epochs", *P4,
    "--crop", "pad", **BF16)
run("demo", "demo-6ep", "the 6-epoch patch 4 preset (no flips)", *SIX, **BF16)
run("demo", "demo-8ep", "the patch 4 preset without flips", *P4, "--no-flip", **BF16)
run("demo", "demo-ls0", "the patch 4 preset without label smoothing", *P4, "--label-smoothing", "0", **BF16)
run("demo", "demo-lr2e-3", "6-epoch, lr 2e-3", *SIX, "--lr", "2e-3", **BF16)
run("demo", "demo-bs32", "6-epoch, batch 32, lr 7e-4", *SIX, "--batch-size", "32", "--lr", "7e-4", **BF16)
run("demo", "demo-old", "the recipe before it (patch 7, width 192, 6 layers), 6 epochs", *SIX, *P7,
    "--ema-decay", "none", **BF16)
run("demo", "demo-p7-ema", "the recipe before it + EMA 0.999", *SIX, *P7, **BF16)
run("demo", "demo-p4-patchdrop", "the recipe before it at patch 4 + patch dropout 0.5", *SIX, *P7,
    "--ema-decay", "none", "--model", "vit-ti/4", "--patch-dropout", "0.5", **BF16)
run("demo", "demo-sincos-lr2e-3", "the recipe before it + sincos2d + lr 2e-3", *SIX, *P7, "--ema-decay", "none",
    "--posemb", "sincos2d", "--lr", "2e-3", **BF16)

# CIFAR-10 from the training shards, a validation split of 10% cut by key hash (the test split is held back). The
# presets' runs up to the last round's ran on the AVX-512 BF16 machine, in bf16, before the presets had a time limit
# (pinned to --time-limit none; they ended at their epochs, in 53-56 minutes); this round's hybrid run is the preset
# as it stands, on this round's AVX2 machine in fp32, where its 59-minute limit ended it after 14.5 of its 27 epochs.
CIFAR_COMMON = ["--data", CIFAR, "--val-split", "0.1"]
OLD_CIFAR = [*CIFAR_COMMON, "--model", "vit-ti/8", "--hidden-size", "128", "--num-layers", "6", "--num-heads", "4",
             "--mlp-dim", "512", "--image-size", "32", "--epochs", "10", "--batch-size", "128", "--lr", "2e-3",
             "--beta2", "0.99", "--weight-decay", "0.05", "--schedule", "cosine", "--precision", "bf16",
             "--num-workers", "1", "--no-compile"]
run("cifar10", "cifar10-vit-17ep", "cifar10-vit (17 epochs)", "--preset", "cifar10-vit", *NO_DROP_PATH, "--precision",
    "bf16", "--data", CIFAR, *EVERY_EPOCH, *NO_LIMIT, "--epochs", "17", *NO_TTA, *OFFICIAL, *ONE_SIZE, machine="bf16")
run("cifar10", "cifar10-vit", "cifar10-vit at 15 epochs, before the faster step (TanhGELU, fused AdamW)",
    "--preset", "cifar10-vit", *NO_DROP_PATH, "--precision", "bf16", "--data", CIFAR, *EVERY_EPOCH, *NO_LIMIT,
    "--epochs", "15", *NO_TTA, *OFFICIAL, *ONE_SIZE, machine="bf16")
run("cifar10", "cifar10-hybrid", "cifar10-hybrid (R26's root and two stages, ViT of 4 layers on 4x4 cells, 27 epochs)",
    "--preset", "cifar10-hybrid", "--precision", "bf16", "--data", CIFAR, *EVERY_EPOCH, *NO_LIMIT, *NO_TTA,
    compare_with="cifar10-hybrid", machine="bf16")
run("cifar10", "cifar10-hybrid-59min", "cifar10-hybrid before flip TTA: fp32, ended by its 59-minute limit after 14.5 "
    "of 27 epochs", "--preset", "cifar10-hybrid", "--data", CIFAR, *EVERY_EPOCH, *NO_TTA, compare_with="cifar10-hybrid")
HYBRID_R2 = ["--model", "r26+vit-ti/4", "--resnet-num-layers", "2", "--resnet-width-factor", "0.5", "--num-layers", "6"]
run("cifar10", "cifar10-hybrid-old", "the last hybrid preset (root, 2 units at half width, 6 layers on 8x8 cells), "
    "11 epochs, before the faster step", "--preset", "cifar10-hybrid", "--precision", "bf16", "--data", CIFAR,
    *EVERY_EPOCH, *NO_LIMIT, *HYBRID_R2, "--epochs", "11", *NO_TTA, compare_with="cifar10-hybrid", machine="bf16")
run("cifar10", "cifar10-hybrid-3x3", "a 3x3 stride-1 root, stages (1, 1, 1) at quarter width, 4 layers, 13 epochs",
    "--preset", "cifar10-hybrid", "--precision", "bf16", "--data", CIFAR, *EVERY_EPOCH, *NO_LIMIT, "--model",
    "r26+vit-ti/4", "--resnet-root", "3x3", "--resnet-num-layers", "1,1,1", "--resnet-width-factor", "0.25",
    "--epochs", "13", *NO_TTA, compare_with="cifar10-hybrid", machine="bf16")
run("cifar10", "cifar10-old", "the last round's documented CIFAR-10 run", *OLD_CIFAR, machine="bf16")
# TrivialAugmentWide on the hybrid (stop 25, the bf16 machine): 0.8016 with flip TTA, 0.7856 without (vitlab eval
# --tta none on its weights); the preset without either reached 0.8052 in 27 epochs.
run("cifar10", "cifar10-hybrid-ta", "cifar10-hybrid + TrivialAugmentWide and flip TTA, ended by its 59-minute limit",
    "--preset", "cifar10-hybrid", "--data", CIFAR, *EVERY_EPOCH, "--trivialaugment", "--tta", "flip",
    compare_with="cifar10-hybrid", machine="bf16")
# The hybrid preset before it evaluated every third epoch (stop 26): flip TTA at every evaluation, the bf16 machine.
run("cifar10", "cifar10-hybrid-tta", "cifar10-hybrid + flip TTA, evaluated every epoch, within its 59-minute limit",
    "--preset", "cifar10-hybrid", "--data", CIFAR, *EVERY_EPOCH, compare_with="cifar10-hybrid", machine="bf16")
# The hybrid with a front at the image's resolution (stop 27): the paper's root (a 7x7 stride-2 convolution and a
# max-pool) leaves a 32 px image 8x8 cells before any unit; here a 3x3 stride-1 root and four stages of (1, 1, 2, 4)
# units at quarter width (32, 16, 8, 4 px) reach the same 4x4 cells of 512 channels: its last two stages are the
# preset's two less two units, its first two replace the root's pooling. Stopped in its 4th epoch, 16 points behind
# the preset at the same minutes (0.4365 at 10.3 min against 0.5938 at 9.7) at 0.73x its images/s (255 against 351).
run("cifar10", "cifar10-hybrid-front", "cifar10-hybrid with a 3x3 stride-1 root and stages (1, 1, 2, 4) at quarter "
    "width, stopped in its fourth epoch", "--preset", "cifar10-hybrid", "--data", CIFAR, *EVERY_EPOCH,
    "--resnet-root", "3x3", "--resnet-num-layers", "1,1,2,4", "--resnet-width-factor", "0.25",
    compare_with="cifar10-hybrid-tta", machine="bf16")
# The hybrid preset at twice the learning rate (stop 27, the bf16 machine), on the guess that its weight-standardised
# convolutions see Adam's fixed step shrink as their weights grow. 0.8184 after 26.2 epochs against 0.8138 after
# 24.9, level epoch by epoch: within the noise, and the preset keeps 1e-3.
run("cifar10", "cifar10-hybrid-lr2e-3", "cifar10-hybrid at lr 2e-3, within its 59-minute limit", "--preset",
    "cifar10-hybrid", "--data", CIFAR, *EVERY_EPOCH, "--lr", "2e-3", compare_with="cifar10-hybrid-tta", machine="bf16")
# The hybrid preset evaluating every third epoch (stop 28, the bf16 machine; now the preset's): its 25 evaluations
# with flip TTA had taken 6 of its 59 minutes (14 s each, the model run eagerly), time the limit takes from
# training. Its 9 took 2: all 27 epochs ran, in 56.7 minutes, 0.8190 against 0.8138 after 24.9 (within the noise).
run("cifar10", "cifar10-hybrid-eval3", "cifar10-hybrid as it stands: evaluating every third epoch, its 27 epochs",
    "--preset", "cifar10-hybrid", "--data", CIFAR, "--eval-epochs", "3", compare_with="cifar10-hybrid-tta",
    machine="bf16")
# The plain ViT preset before the mimetic init (stop 26): flip TTA at every evaluation, up to 20 epochs within the
# 59 minutes.
run("cifar10", "cifar10-vit-tta", "cifar10-vit before the mimetic init: + flip TTA, up to 20 epochs within its "
    "59-minute limit", "--preset", "cifar10-vit", *NO_DROP_PATH, "--data", CIFAR, *EVERY_EPOCH, *OFFICIAL, *ONE_SIZE,
    "--epochs", "20", machine="bf16")
# The plain ViT preset before progressive resizing (stop 27, the bf16 machine): + the mimetic attention init for its
# hour, which the 20-minute pair below had put +0.4 points ahead, within the noise; 0.7427 against 0.7259.
run("cifar10", "cifar10-vit-mimetic", "cifar10-vit + the mimetic attention init, before progressive resizing, within "
    "its 59-minute limit", "--preset", "cifar10-vit", *NO_DROP_PATH, "--data", CIFAR, *EVERY_EPOCH,
    "--attention-init", "mimetic", *ONE_SIZE, "--epochs", "20", compare_with="cifar10-vit-tta", machine="bf16")
# The plain ViT preset of stop 28 (the bf16 machine): progressive resizing, the first quarter of its
# progress at 16 px (4x4 patches of 4), the second at 24 (6x6), the second half at 32, so that its early steps cost
# about a quarter and a half of a full one (~1,000 and ~520 images/s against ~260); up to 30 epochs (20 would have
# ended it early: more steps fit the hour); and an evaluation every third epoch, as the hybrid's row above.
# 0.7729 against 0.7427 after 28.6 epochs (7.5 at 16 px in 6.5 min, 7.5 at 24 in 12.5, 13.6 at 32 in 39.1).
run("cifar10", "cifar10-vit-progressive", "cifar10-vit + progressive resizing (16, 24, then 32 px), up to 30 epochs, "
    "an evaluation every third epoch, within its 59-minute limit", "--preset", "cifar10-vit", *NO_DROP_PATH, "--data",
    CIFAR, "--progressive-sizes", "16,24", "--progressive-until", "0.5", "--epochs", "30", "--eval-epochs", "3",
    compare_with="cifar10-vit-mimetic", machine="bf16")
# Progressive resizing for the hybrid (stop 29): its stem takes 16 and 24 px (2x2 and 3x3 cells), up to 40 epochs.
# Its small sizes buy little speed (~790 and ~500 images/s against ~371, where a quarter and ~56% of the pixels
# would allow ~4x and ~1.8x: convolutions on maps of 2x2 to 12x12 run less efficiently) and learn less: stopped
# after 15 epochs, 4 points behind the preset at the same minutes (0.6992 at 21.1 min against 0.7293 at 19.1 and
# 0.7515 at 25.7).
run("cifar10", "cifar10-hybrid-progressive", "cifar10-hybrid + progressive resizing (16, 24, then 32 px), up to 40 "
    "epochs, stopped after 15", "--preset", "cifar10-hybrid", "--data", CIFAR, "--eval-epochs", "3",
    "--progressive-sizes", "16,24", "--epochs", "40", compare_with="cifar10-hybrid-eval3", machine="bf16")
# The plain ViT preset of stop 29: a longer, smoother ramp, 16, 20, 24 and 28 px over the first 75% of
# the run, up to 40 epochs (31.6 ran): 0.7864 against the two sizes' 0.7729, behind up to 37 minutes, ahead after.
run("cifar10", "cifar10-vit-ramp", "cifar10-vit of stop 29: a four-size ramp (16, 20, 24, 28, then 32 px) over "
    "75% of the run, up to 40 epochs within its 59-minute limit", "--preset", "cifar10-vit", *NO_DROP_PATH, "--data",
    CIFAR, "--eval-epochs", "3", "--progressive-sizes", "16,20,24,28", "--progressive-until", "0.75", "--epochs", "40",
    compare_with="cifar10-vit-progressive", machine="bf16")
# The mimetic attention init (the plain ViT's +1.7 points) in the hybrid's 4 layers (stop 29): 0.8140 against
# 0.8190 in 27 epochs, behind at 8 of its 9 evaluations, within run-to-run noise: the hybrid preset keeps the official.
run("cifar10", "cifar10-hybrid-mimetic", "cifar10-hybrid + the mimetic attention init, its 27 epochs within its "
    "59-minute limit", "--preset", "cifar10-hybrid", "--data", CIFAR, "--eval-epochs", "3", "--attention-init",
    "mimetic", compare_with="cifar10-hybrid-eval3", machine="bf16")
# 15-minute proxies of the plain ViT preset as it stands (stop 30, the bf16 machine): its schedule and ramp laid over
# 15 minutes by the time limit (its ramp pinned, so that the rows keep saying how they ran), one change at a time
# against the first. None of batch 64 or 256, lr 2e-3 or 5e-4, or a wider, shallower model paid; the two changes to
# the ramp that buy epochs did (+1.1 and +1.4 points), not yet tried for the hour.
FIFTEEN = ["--preset", "cifar10-vit", *NO_DROP_PATH, "--data", CIFAR, "--time-limit", "15", "--epochs", "40"]
RAMP = ["--progressive-sizes", "16,20,24,28", "--progressive-until", "0.75"]  # the preset's, as it stands
run("cifar10", "cifar10-vit-15min", "cifar10-vit for 15 minutes", *FIFTEEN, *RAMP, compare_with="cifar10-vit-15min",
    machine="bf16")
run("cifar10", "cifar10-vit-15min-bs64", "cifar10-vit for 15 minutes at batch 64", *FIFTEEN, *RAMP, "--batch-size",
    "64", compare_with="cifar10-vit-15min", machine="bf16")
run("cifar10", "cifar10-vit-15min-lr2e-3", "cifar10-vit for 15 minutes at lr 2e-3", *FIFTEEN, *RAMP, "--lr", "2e-3",
    compare_with="cifar10-vit-15min", machine="bf16")
run("cifar10", "cifar10-vit-15min-lr5e-4", "cifar10-vit for 15 minutes at lr 5e-4", *FIFTEEN, *RAMP, "--lr", "5e-4",
    compare_with="cifar10-vit-15min", machine="bf16")
run("cifar10", "cifar10-vit-15min-bs256", "cifar10-vit for 15 minutes at batch 256", *FIFTEEN, *RAMP, "--batch-size",
    "256", compare_with="cifar10-vit-15min", machine="bf16")
run("cifar10", "cifar10-vit-15min-until0.85", "cifar10-vit for 15 minutes, the ramp over 85% of the run", *FIFTEEN,
    "--progressive-sizes", "16,20,24,28", "--progressive-until", "0.85", compare_with="cifar10-vit-15min",
    machine="bf16")
run("cifar10", "cifar10-vit-15min-from12", "cifar10-vit for 15 minutes, the ramp from 12 px (12, 16, 20, 24, 28)",
    *FIFTEEN, "--progressive-sizes", "12,16,20,24,28", "--progressive-until", "0.75",
    compare_with="cifar10-vit-15min", machine="bf16")
run("cifar10", "cifar10-vit-15min-w256l4", "cifar10-vit for 15 minutes, 4 layers of width 256 (4 heads, MLP 512)",
    *FIFTEEN, *RAMP, "--hidden-size", "256", "--num-layers", "4", "--num-heads", "4", "--mlp-dim", "512",
    compare_with="cifar10-vit-15min", machine="bf16")
# The proxies' best change for the hour (stop 31): the ramp from 12 px, its epochs capped at 60 so that the time limit
# ends it (from 12 px the 15-minute proxy ran 11.9 epochs, a pace that passes 40 within the hour).
run("cifar10", "cifar10-vit-from12", "cifar10-vit with its ramp from 12 px (12, 16, 20, 24, 28, then 32) over 75% of "
    "the run, within its 59-minute limit", "--preset", "cifar10-vit", *NO_DROP_PATH, "--data", CIFAR, "--eval-epochs",
    "3",
    "--progressive-sizes", "12,16,20,24,28", "--progressive-until", "0.75", "--epochs", "60",
    compare_with="cifar10-vit-ramp", machine="bf16")
# The ramp from 12 px ran 59.4 epochs and ended at 0.7916 with its training accuracy at ~0.94 (stop 31): for the first
# time the plain ViT overfits in the hour, so the next hour added stochastic depth 0.1 (DeiT's rate) to it: 0.8030,
# ahead from epoch 42 on, all 60 epochs in 55.8 min. Both are the preset now (vitlab.config.cifar10_vit).
run("cifar10", "cifar10-vit-from12-dp0.1", "cifar10-vit as it stands: its ramp from 12 px + stochastic depth 0.1, "
    "its 60 epochs within its 59-minute limit", "--preset", "cifar10-vit", "--data", CIFAR, "--eval-epochs", "3",
    "--progressive-sizes", "12,16,20,24,28", "--progressive-until", "0.75", "--epochs", "60", "--drop-path", "0.1",
    compare_with="cifar10-vit-from12", machine="bf16")
# what the mimetic attention init buys the plain ViT on CIFAR-10: the preset for 20 minutes each way, fp32 on AVX2
TWENTY = ["--preset", "cifar10-vit", *NO_DROP_PATH, "--data", CIFAR, "--time-limit", "20", *NO_TTA, *EVERY_EPOCH,
    *ONE_SIZE,
          "--epochs", "20"]
run("cifar10", "cifar10-vit-20min", "cifar10-vit for 20 minutes (fp32, AVX2)", *TWENTY, *OFFICIAL,
    compare_with="cifar10-vit-20min")
run("cifar10", "cifar10-vit-20min-mimetic", "cifar10-vit for 20 minutes + the mimetic attention init", *TWENTY,
    "--attention-init", "mimetic", compare_with="cifar10-vit-20min")


BASE = {"demo": "demo-mimetic", "cifar10": "cifar10-vit-17ep"}  # the run each group's rows compare with
TARGETS = {"demo": [("aim: 0.90", 0.90)], "cifar10": [("aim, ViT: 0.80", 0.80), ("aim, hybrid: 0.85", 0.85)]}
# the curves drawn (the table has every run): the presets, the recipes before them and the largest single changes
PLOTTED = {"demo": ["demo-mimetic", "demo-mimetic-9ep", "demo-p7-9ep-tta", "demo-p7-10ep-tta", "demo-p7", "demo",
                    "demo-old"],
           "cifar10": ["cifar10-vit-from12-dp0.1", "cifar10-vit-from12", "cifar10-vit-ramp", "cifar10-vit-progressive",
                       "cifar10-vit-mimetic", "cifar10-vit-tta", "cifar10-vit-17ep", "cifar10-hybrid-eval3",
                       "cifar10-hybrid-lr2e-3",
                       "cifar10-hybrid-tta", "cifar10-hybrid", "cifar10-hybrid-front", "cifar10-hybrid-ta",
                       "cifar10-hybrid-59min", "cifar10-vit-20min", "cifar10-old"]}


def run_all(names: list[str]) -> None:
    for name in names or list(RUNS):
        group, _, flags = RUNS[name]
        out = OUT / "runs" / name
        if (out / "metrics.jsonl").exists() and _finished(out):
            print(f"{name}: done already")
            continue
        command = [sys.executable, "-m", "vitlab", "train", *flags, "--out", str(out)]
        resume = (out / "train_state.pt").exists()
        if resume:
            command = [sys.executable, "-m", "vitlab", "train", "--resume", str(out)]
        print(" ".join(command), flush=True)
        start = time.time()
        subprocess.run(command, check=True, cwd=ROOT)
        print(f"{name}: {time.time() - start:.0f} s", flush=True)
        _trim(out)


def _trim(out: Path, every: int = 50) -> None:
    """Keep what the report and the repository need of a finished run's metrics.jsonl: every evaluation, every
    `every`-th training row and the last one (the weights, the training state and TensorBoard stay out of git)."""
    rows = _rows(out)
    last = max((i for i, r in enumerate(rows) if r["split"] == "train"), default=-1)
    keep = [r for i, r in enumerate(rows) if r["split"] != "train" or r["step"] % every == 0 or i == last]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))


def _finished(out: Path) -> bool:
    state = json.loads((out / "train_config.json").read_text())
    rows = _rows(out)
    steps = [r["step"] for r in rows if r["split"] == "train"]
    return bool(steps) and state.get("steps") in (None, steps[-1]) and any(r["split"] != "train" for r in rows[-3:])


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _images_per_second(rows: list[dict]) -> int | None:
    """The training loop's speed: the mean of the kept training rows' images/s after step 100 (compiling, warm-up)."""
    speeds = [r["img_s"] for r in rows if r["split"] == "train" and r["step"] > 100 and "img_s" in r]
    return round(sum(speeds) / len(speeds)) if speeds else None


def report() -> None:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    results = {}
    for name, (group, label, flags) in RUNS.items():
        rows = _rows(OUT / "runs" / name)
        evals = [r for r in rows if r["split"] not in ("train",)]
        if not evals:
            continue
        results[name] = dict(group=group, label=label, command="vitlab train " + " ".join(flags), machine=MACHINE[name],
                             curve=[(round(r["wall_s"] / 60, 2), r["top1"]) for r in evals if "wall_s" in r],
                             final=evals[-1]["top1"], split=evals[-1]["split"],
                             minutes=round(rows[-1].get("wall_s", 0) / 60, 1), images_s=_images_per_second(rows))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| run | accuracy | split | vs the preset | wall-clock minutes | images/s | CPU | command |",
             "|---|---:|---|---:|---:|---:|---|---|"]
    for name, r in results.items():
        base_name = COMPARED_WITH.get(name, BASE[r["group"]])
        base = results.get(base_name)
        delta = f"{r['final'] - base['final']:+.4f}" if base and name != base_name else ""
        lines.append(f"| {r['label']} | {r['final']:.4f} | {r['split']} | {delta} | {r['minutes']} | "
                     f"{r['images_s'] or ''} | {MACHINES[MACHINE[name]]} | `{r['command']}` |")
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    groups = sorted({r["group"] for r in results.values()})
    fig = Figure(figsize=(6.5 * len(groups), 7.5), layout="constrained")
    for ax, group in zip(fig.subplots(1, len(groups), squeeze=False)[0], groups):
        names = PLOTTED.get(group) or [n for n, r in results.items() if r["group"] == group]
        runs = [results[n] for n in names if n in results and results[n]["curve"]]
        for i, r in enumerate(runs):  # tab20: more runs than tab10's ten colours, none repeated
            minutes, accuracy = zip(*r["curve"])
            ax.plot(minutes, accuracy, marker="o", markersize=3, label=textwrap.fill(r["label"], 60),
                    color=colormaps["tab20"](i),
                    linestyle="--" if r["machine"] == "bf16" else "-")  # dashed: the AVX-512 BF16 machine
        for label, target in TARGETS[group]:
            ax.axhline(target, linestyle="--", linewidth=0.8, color="grey")
            ax.annotate(label, (0, target), xycoords=("axes fraction", "data"), fontsize=7, color="grey",
                        xytext=(3, 2), textcoords="offset points")
        xlabel = "wall-clock minutes (2 CPU cores)\ndashed: the AVX-512 BF16 machine, in bf16"
        ax.set(xlabel=xlabel, ylabel=f"top-1 ({'test' if group == 'demo' else 'val'})",
               title="Fashion-MNIST" if group == "demo" else "CIFAR-10")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))  # below: the curves stay in view
    fig.savefig(OUT / "curves.png", dpi=110)
    print((OUT / "results.md").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("run", "report"))
    p.add_argument("names", nargs="*")
    args = p.parse_args()
    run_all(args.names) if args.what == "run" else report()


if __name__ == "__main__":
    main()
