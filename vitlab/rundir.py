"""The run directory of a training run: what it holds, the save protocol that keeps it whole through a crash, the
metrics log, and the RNG states a resume restores.

A run directory DIR holds:

    train_config.json                the resolved TrainConfig; `vitlab train --resume DIR` reads it back
    config.json, model.safetensors   the model, a vitlab checkpoint (`vitlab eval DIR`, `load_model(DIR)`)
    train_state.pt                   optimizer, step, epoch, batch in the epoch, every process's RNG states
    metrics.jsonl                    one JSON object per training step and per evaluation
    tb/                              TensorBoard event files
    curves.png                       train and eval loss and accuracy against steps, redrawn each epoch
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .common import CheckpointError, atomic_write, atomic_write_text, fsync_dir
from .formats import CONFIG_FILE, WEIGHTS_FILE, read_safetensors
from .weights import read_config, save_checkpoint

TRAIN_CONFIG_FILE = "train_config.json"
STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
# What a resumed run may not change: the position in the data is counted in batches, and an optimizer's state
# only fits that optimizer. (The model may not change either: its config.json is compared.)
FIXED_ON_RESUME = ("batch_size", "optimizer", "seed")


def run_setting(directory: str | os.PathLike, key: str, default):
    """A training run's setting (its train_config.json's `key`) when `directory` is a run, else `default`."""
    path = Path(directory) / TRAIN_CONFIG_FILE
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text()).get(key, default)
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a readable training config ({e})") from None


# Checkpoints. The weights (model.safetensors, config.json) and the training state (train_state.pt) are separate
# files, and a resumed run needs them from the same step. A save therefore writes all three into DIR/.next.tmp,
# renames that to DIR/.next (the commit point: one atomic rename), then moves the files one by one into DIR and
# removes DIR/.next. A process killed before the commit leaves DIR as it was (the .next.tmp is deleted later); one
# killed after it leaves a complete DIR/.next, which `finish_save` moves in before anything reads DIR. Every
# file is itself replaced atomically, and config.json does not change during a run, so `load_model(DIR)` reads
# a whole model at any moment; a resume reads a consistent pair once `finish_save` has run.


def fault_point(point: str, step: int) -> None:
    """Crash-test hook: VITLAB_FAULT=POINT@STEP kills the process with SIGKILL there (tests/test_train.py)."""
    if os.environ.get("VITLAB_FAULT") == f"{point}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def finish_save(out: Path, step: int | None = None) -> None:
    """Complete a save that a killed process committed but did not finish; drop one it had not committed."""
    shutil.rmtree(out / ".next.tmp", ignore_errors=True)
    staged = out / ".next"
    if not staged.is_dir():
        return
    for name in sorted(os.listdir(staged)):
        os.replace(staged / name, out / name)
        if step is not None:
            fault_point(f"moved-{name}", step)
    fsync_dir(out)
    staged.rmdir()
    fsync_dir(out)


def save_run(out: Path, model: nn.Module, state: dict) -> None:
    """Save the weights and the training state of one step as a pair (see above)."""
    staging = out / ".next.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_checkpoint(model, staging)  # the uncompiled module's weights and config, each written atomically
        atomic_write(staging / STATE_FILE, lambda tmp: torch.save(state, tmp))
    except BaseException:  # a failed write (a full disk): DIR is untouched, and nothing of this save stays
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fault_point("staged", state["step"])
    os.rename(staging, out / ".next")  # the commit point
    fsync_dir(out)
    fault_point("committed", state["step"])
    finish_save(out, state["step"])


def load_run(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module | None = None) -> dict:
    """Load DIR's weights into `model` and its optimizer state into `optimizer`; the rest of the state. With `ema`
    (a run that keeps an average of its weights), the saved model is the average: it goes into `ema`, and the
    trained weights come from the training state."""
    saved = read_config(out)
    if saved != model.cfg:
        diff = [f"{k}: {v!r} in the checkpoint, {getattr(model.cfg, k)!r} now" for k, v in vars(saved).items()
                if getattr(model.cfg, k) != v]
        raise CheckpointError(f"{out / CONFIG_FILE}: the model of this run changed ({'; '.join(diff)})")
    (model if ema is None else ema).load_state_dict(read_safetensors(out / WEIGHTS_FILE))
    path = out / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler raises about anything on a damaged file (KeyError, EOFError, ...)
        raise CheckpointError(f"{path}: not a readable training state ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0]})") from None
    keys = set(state) if isinstance(state, dict) else set()
    missing = sorted({"step", "epoch", "batch", "optimizer", "rng", "config"} - keys)
    if missing:
        raise CheckpointError(f"{path}: not a vitlab training state (no {', '.join(missing)})")
    if (ema is not None) != ("model" in state):
        raise CheckpointError(f"{path}: the run was saved {'without' if ema is not None else 'with'} an average of "
                              "its weights: ema_decay cannot be added or removed on resume")
    if ema is not None:
        model.load_state_dict(state["model"])
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: the optimizer state does not fit ({str(e).splitlines()[0]})") from None
    return state


def _json_lines(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


class RunLog:
    """The run's records, written by process 0: metrics.jsonl, TensorBoard events, curves.png."""

    def __init__(self, out: Path, start_step: int, started: float | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.out = out
        path = out / METRICS_FILE
        # A resumed run redoes the steps after its checkpoint: their rows go, here and in TensorBoard (purge_step),
        # and so does a line that a killed process left half-written.
        self.rows = [r for r in _json_lines(path) if r.get("step", math.inf) <= start_step]
        # Each row's wall_s: seconds since the run's command started (`started`, a perf_counter reading), counting
        # the time of the processes before a resume, for accuracy against wall-clock time.
        before = self.rows[-1].get("wall_s", 0.0) if self.rows else 0.0
        self.clock = (time.perf_counter() if started is None else started) - before
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.file = open(path, "a")
        self.tb = SummaryWriter(str(out / "tb"), purge_step=start_step + 1 if start_step else None)

    def write(self, row: dict) -> None:
        row = dict(row, wall_s=round(time.perf_counter() - self.clock, 2))
        self.rows.append(row)
        self.file.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key not in ("step", "epoch", "split", "wall_s") and isinstance(value, (int, float)):
                self.tb.add_scalar(f"{row['split']}/{key}", value, row["step"])

    def flush(self) -> None:
        self.file.flush()
        self.tb.flush()

    def plot(self) -> None:
        """curves.png: loss and accuracy of training steps and evaluations against steps."""
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

        fig = Figure(figsize=(11, 4), layout="constrained")
        ax_loss, ax_acc = fig.subplots(1, 2)
        splits = sorted({r["split"] for r in self.rows}, key=lambda s: s != "train")
        for split in splits:
            rows = [r for r in self.rows if r["split"] == split]
            steps = [r["step"] for r in rows]
            style = dict(lw=0.8, alpha=0.7) if split == "train" else dict(marker="o", lw=1.5)
            ax_loss.plot(steps, [r["loss"] for r in rows], label=split, **style)
            ax_acc.plot(steps, [r["acc"] if split == "train" else r["top1"] for r in rows], label=split, **style)
        ax_loss.set(xlabel="step", ylabel="cross-entropy", title="loss")
        ax_acc.set(xlabel="step", ylabel="top-1 accuracy", title="accuracy", ylim=(0, 1))
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.legend()
        atomic_write(self.out / "curves.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))

    def close(self) -> None:
        self.file.close()
        self.tb.close()



# RNG states as tensors, lists and numbers, so that torch.load(weights_only=True) reads them back.


def rng_state() -> dict:
    """This process's RNG states: torch CPU (and CUDA), numpy, Python's random."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return dict(
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        numpy=dict(keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos), has_gauss=int(has_gauss),
                   cached=float(cached)),
        python=dict(version=version, internal=list(internal), gauss_next=gauss_next),
    )


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)  # also every CUDA device
    np.random.seed(seed % 2**32)
    random.seed(seed)
