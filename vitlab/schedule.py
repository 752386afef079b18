"""The learning-rate schedule, and how far through it a run is: a fixed number of steps, or as many as a time limit
allows.

A run of a fixed length (--epochs or --steps) takes the learning rate of step s of T from `learning_rate`: linear
warm-up, then linear or cosine decay to 0 at the last step. With `time_limit` (minutes) the same schedule is laid
over a length that the run finds out as it goes, so that it ends at the limit with its learning rate decayed to 0,
on whatever machine runs it: a run's progress p goes from 0 to 1, each step advancing it by (1 - p) / n, n being
the steps left. At every metric flush n is estimated again, from the time left, the steps' measured time and the
evaluations' (Li et al. 2020, "Budgeted training", found a schedule that decays to 0 at the budget's end beats a
fixed one cut short; PyTorch Lightning's max_time cuts the run short). The epochs or steps set stay the most the
run may take. Progress moves only forward, so the learning rate changes smoothly when the estimate does; it is
saved with the run, and a resumed run goes on from it, counting the time the run used before.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.distributed as dist

from .config import TrainConfig

# The share of the time limit kept for what follows the last step and no estimate sees: the final save and exit.
MARGIN = 0.01
SMOOTHING_STEPS = 50  # a flush window of this many steps replaces the estimate before it; shorter ones weigh less


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of step `step` (0-based): linear warm-up to cfg.lr, then linear or cosine decay to 0."""
    warmup = min(cfg.warmup if cfg.warmup >= 1 else cfg.warmup * total_steps, total_steps)
    if step < warmup:
        return cfg.lr * min(1.0, (step + 1) / warmup)
    return _decayed(cfg, (step - warmup) / max(1.0, total_steps - warmup))


def learning_rate_at(cfg: TrainConfig, before: float, after: float) -> float:
    """`learning_rate` by progress: the rate of the step that takes the run from `before` to `after` (fractions of
    the run; a time-limited run's warm-up is a fraction, TrainConfig.check)."""
    if before < cfg.warmup:
        return cfg.lr * min(1.0, after / cfg.warmup)
    return _decayed(cfg, (before - cfg.warmup) / (1.0 - cfg.warmup))


def _decayed(cfg: TrainConfig, progress: float) -> float:
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (1.0 - progress)


class Schedule:
    """Where a run is in its schedule: `lr(step)` for the next step, `advance()` after it, `done` when the run is
    over. Without a time limit it is `learning_rate` over `total_steps`; with one (or resumed from a run that had
    one), `replan` fits the steps left to the time left.

    `steps_per_eval` is how often the run evaluates, `elapsed` the seconds this process has spent on the run so far
    (loading the data and the model), `step` where it begins, `saved` what `state()` gave when the run was saved."""

    def __init__(self, cfg: TrainConfig, total_steps: int, steps_per_eval: int, elapsed: float = 0.0, step: int = 0,
                 saved: dict | None = None):
        saved = saved or {}
        self.cfg, self.cap, self.steps_per_eval = cfg, total_steps, steps_per_eval
        self.limit = cfg.time_limit * 60 if cfg.time_limit else None
        self.timed = self.limit is not None or "progress" in saved
        self.progress = saved.get("progress", step / total_steps)
        self.steps_left = min(saved.get("steps_left", total_steps - step), total_steps - step)
        # when the run began, on this process's clock (a resumed run counts the time it used before it stopped)
        self.origin = time.perf_counter() - elapsed - saved.get("time_used", 0.0)
        self.step_time: float | None = None  # seconds per training step, smoothed
        self.eval_time = 0.0  # seconds of the last evaluation
        self.window: tuple[float, int] | None = None  # (time, step) at which the current timing window began
        self.aside_time = 0.0  # seconds inside the window spent on evaluating and saving

    def lr(self, step: int) -> float:
        if not self.timed:
            return learning_rate(self.cfg, step, self.cap)
        return learning_rate_at(self.cfg, self.progress, self.progress + (1.0 - self.progress) / self.steps_left)

    def advance(self) -> None:
        """One step done."""
        if self.timed:
            self.progress = 1.0 if self.steps_left == 1 else self.progress + (1.0 - self.progress) / self.steps_left
        self.steps_left -= 1

    @property
    def done(self) -> bool:
        return self.steps_left <= 0

    def image_size(self) -> tuple[int, int]:
        """The size of the next step's images: image_size, or with progressive_sizes the size of the run's stage,
        each of them an equal share of the first progressive_until of the run (of its steps, or of its progress
        under a time limit, so that the sizes follow the learning-rate schedule)."""
        sizes, until = self.cfg.progressive_sizes, self.cfg.progressive_until
        done = self.progress if self.timed else 1.0 - self.steps_left / self.cap
        stage = int(done / until * len(sizes)) if sizes else 0
        return tuple(self.cfg.image_size) if not sizes or stage >= len(sizes) else (sizes[stage], sizes[stage])

    @contextlib.contextmanager
    def aside(self, evaluation: bool = False):
        """Time spent on something else than training steps: an evaluation (measured, as the next ones will
        cost as much) or a save."""
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        self.aside_time += seconds
        if evaluation:
            self.eval_time = seconds

    def replan(self, step: int, distributed: bool, device: torch.device) -> None:
        """Fit the steps left to the time left (a run with a time limit, at each metric flush; under torchrun every
        process calls it at the same step and takes process 0's estimate)."""
        if self.limit is None or self.steps_left <= 0:  # no limit, or the run is over
            return
        now = time.perf_counter()
        if self.window is not None and step > self.window[1]:  # each window but the first, which holds compiling
            seconds = (now - self.window[0] - self.aside_time) / (step - self.window[1])
            weight = min(1.0, (step - self.window[1]) / SMOOTHING_STEPS)
            self.step_time = seconds if self.step_time is None else self.step_time + weight * (seconds - self.step_time)
        self.window, self.aside_time = (now, step), 0.0
        if self.step_time is None:
            return
        # n steps and the evaluations to come must fit the time left: one every steps_per_eval steps, the last one,
        # and this step's when it is one (the loop replans before it evaluates)
        left = self.limit * (1.0 - MARGIN) - (now - self.origin)
        evaluations = 1 + (step % self.steps_per_eval == 0)
        n = (left - evaluations * self.eval_time) / (self.step_time + self.eval_time / self.steps_per_eval)
        self.steps_left = int(min(max(n, 1.0), self.cap - step))
        if distributed:
            steps_left = torch.tensor([self.steps_left], device=device)
            dist.broadcast(steps_left, src=0)
            self.steps_left = int(steps_left.item())

    def state(self) -> dict:
        """What a resumed run needs to go on: the time used, and for a timed run how far it is."""
        state = dict(time_used=time.perf_counter() - self.origin)
        if self.timed:
            state.update(progress=self.progress, steps_left=self.steps_left)
        return state
