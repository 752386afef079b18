"""The learning-rate schedule by progress, and runs that end at a time limit (vitlab.schedule), on a fake clock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import types

import pytest
import torch
from tiny import TINY, fashion_dir, flags, rows, subprocess_env, world  # noqa: F401 (fixtures)

from vitlab import schedule as schedule_module
from vitlab import train as train_module
from vitlab.common import CheckpointError, ConfigError
from vitlab.config import TrainConfig
from vitlab.rundir import STATE_FILE
from vitlab.schedule import Schedule, learning_rate, learning_rate_at
from vitlab.train import TrainingStopped, train

CPU = torch.device("cpu")
TIMED = dict(TINY, warmup=0.1, schedule="cosine", epochs=20, time_limit=1.0)  # at most 320 steps, a minute


@pytest.fixture
def clock(monkeypatch):
    """vitlab.schedule's clock, in seconds, moved by the test alone."""
    now = [1000.0]
    monkeypatch.setattr(schedule_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    return now


def test_learning_rate_by_progress_is_learning_rate_by_step():
    for schedule in ("linear", "cosine"):
        cfg = TrainConfig(**dict(TINY, warmup=0.1, lr=1.0, schedule=schedule))
        for step in (0, 5, 9, 10, 11, 50, 99):
            assert learning_rate_at(cfg, step / 100, (step + 1) / 100) == pytest.approx(learning_rate(cfg, step, 100))


def drive(clock, schedule: Schedule, step_seconds, eval_seconds: float, steps_per_eval: int) -> list[float]:
    """Run `schedule` as the training loop does, each step taking step_seconds(step); the learning rates."""
    lrs, step = [], 0
    while not schedule.done:
        lrs.append(schedule.lr(step))
        clock[0] += step_seconds(step)
        schedule.advance()
        step += 1
        if step % 10 == 0:
            schedule.replan(step, False, CPU)
        if step % steps_per_eval == 0 or schedule.done:
            with schedule.aside(evaluation=True):
                clock[0] += eval_seconds
    return lrs


@pytest.mark.parametrize("slower", [1.0, 2.0], ids=["steady", "slower-halfway"])
def test_a_timed_schedule_ends_at_the_limit_with_its_learning_rate_decayed(clock, slower):
    """0.1 s a step and 1 s an evaluation every 50 steps: 0.12 s a step, so a minute (less the 1% margin and the
    last evaluation) holds ~486 steps; when steps take twice as long after step 200, ~281. The run ends within the
    limit, its learning rate warmed up and decayed smoothly to 0, whatever the cap of 10,000 steps said."""
    cfg = TrainConfig(**dict(TIMED, lr=1.0))
    start = clock[0]
    schedule = Schedule(cfg, 10_000, steps_per_eval=50)
    lrs = drive(clock, schedule, lambda s: 0.1 if s < 200 else 0.1 * slower, eval_seconds=1.0, steps_per_eval=50)
    expected = 486 if slower == 1.0 else 200 + (59.4 - 200 * 0.12 - 1) / (0.2 + 1 / 50)
    assert len(lrs) == pytest.approx(expected, rel=0.03)
    assert clock[0] - start <= 60.0
    assert schedule.progress == 1.0 and lrs[-1] < 0.01
    peak = lrs.index(max(lrs))
    assert max(lrs) > 0.99 and all(b <= a + 1e-12 for a, b in zip(lrs[peak:], lrs[peak + 1:]))  # decays, no jumps
    assert max(abs(b - a) for a, b in zip(lrs, lrs[1:])) < 0.05


def test_a_timed_schedule_stops_at_its_cap_when_time_is_left(clock):
    schedule = Schedule(TrainConfig(**dict(TIMED, lr=1.0)), 300, steps_per_eval=50)
    lrs = drive(clock, schedule, lambda s: 0.01, eval_seconds=0.0, steps_per_eval=50)  # 3 s for a minute's budget
    assert len(lrs) == 300 and lrs == pytest.approx([learning_rate(schedule.cfg, s, 300) for s in range(300)])


def test_without_a_time_limit_the_schedule_is_learning_rate_over_the_steps():
    cfg = TrainConfig(**dict(TINY, warmup=5, lr=1.0))
    schedule = Schedule(cfg, 40, steps_per_eval=16)
    lrs = []
    while not schedule.done:
        lrs.append(schedule.lr(len(lrs)))
        schedule.advance()
        schedule.replan(len(lrs), False, CPU)  # nothing to fit
    assert lrs == [learning_rate(cfg, s, 40) for s in range(40)]
    assert set(schedule.state()) == {"time_used"}


def test_time_limit_is_checked_with_what_it_cannot_go_with():
    for fields, words in ((dict(time_limit=0), "time_limit"), (dict(time_limit=5, deterministic=True), "deterministic"),
                          (dict(time_limit=5, warmup=100), "warmup 100")):
        with pytest.raises(ConfigError, match=words):
            TrainConfig(**dict(TINY, **fields)).check()


@pytest.fixture
def one_second_steps(clock, monkeypatch):
    """Each training step takes one second of vitlab.schedule's clock; with control["stop_after"] = k, the k-th step
    from then on is followed by a SIGTERM."""
    real, control = train_module.train_step, dict(stop_after=None)

    def step(*args, **kwargs):
        out = real(*args, **kwargs)
        clock[0] += 1.0
        if control["stop_after"] is not None:
            control["stop_after"] -= 1
            if control["stop_after"] == 0:
                os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(train_module, "train_step", step)
    return control


def test_a_run_with_a_time_limit_ends_when_it_is_up_and_resumes_with_the_time_it_used(tmp_path, one_second_steps,
                                                                                      capsys):
    """A minute of one-second steps (and the real seconds of loading the data and the model): the run ends after
    ~57 steps of its 320, not at its cap, its learning rate decayed to ~0, its last evaluation at its last step.
    Stopped after step 30 and resumed, it counts the time it used before: it too ends when the minute is up."""
    def time_used(run):
        return torch.load(run / STATE_FILE, weights_only=True)["schedule"]["time_used"]

    whole = tmp_path / "whole"
    train(TrainConfig(**dict(TIMED), out=str(whole)))
    steps = [r for r in rows(whole) if r["split"] == "train"]
    assert 50 <= steps[-1]["step"] <= 59 and 57 <= time_used(whole) <= 60
    assert steps[-1]["lr"] < 0.01 * TIMED["lr"]
    assert [r["step"] for r in rows(whole) if r["split"] == "test"][-1] == steps[-1]["step"]
    assert (f"the time limit (1 min) ended the run after {steps[-1]['step']} of at most 320 steps"
            in capsys.readouterr().out)

    one_second_steps["stop_after"] = 30
    stopped = tmp_path / "stopped"
    with pytest.raises(TrainingStopped):
        train(TrainConfig(**dict(TIMED), out=str(stopped)))
    assert 30 <= time_used(stopped) <= 35
    assert 0 < torch.load(stopped / STATE_FILE, weights_only=True)["schedule"]["progress"] < 1
    train(TrainConfig(**dict(TIMED), out=str(stopped)), resume=True)
    resumed = [r for r in rows(stopped) if r["split"] == "train"]
    assert 50 <= resumed[-1]["step"] <= 59 and 57 <= time_used(stopped) <= 60
    lr = {r["step"]: r["lr"] for r in resumed}
    assert lr[31] == pytest.approx(lr[30], rel=0.1) and resumed[-1]["lr"] < 0.01 * TIMED["lr"]


def test_a_training_state_whose_schedule_is_not_numbers_is_refused_naming_the_file(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**dict(TINY, steps=3), out=str(out)))
    state = torch.load(out / STATE_FILE, weights_only=True)
    torch.save(dict(state, schedule=dict(time_used="soon")), out / STATE_FILE)
    with pytest.raises(CheckpointError, match="schedule state is not numbers"):
        train(TrainConfig(**dict(TINY, steps=6), out=str(out)), resume=True)


@pytest.mark.slow
def test_torchrun_processes_take_process_0s_estimate_and_end_together(tmp_path):
    """Under torchrun every process takes process 0's estimate of the steps left: were they to disagree, one would
    leave the loop while the other waited in a collective, and the run would hang. A 15-second limit ends the run
    long before its cap of 20,000 steps, its learning rate decayed."""
    out = tmp_path / "ddp"
    fields = dict(TINY, warmup=0.1, epochs=1250, time_limit=0.25, compile=False)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         "-m", "vitlab", "train", *flags(fields), "--out", str(out)],
        capture_output=True, text=True, env=subprocess_env(), timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes on cpu" in result.stdout and "the time limit (0.25 min) ended the run after" in result.stdout
    steps = [r for r in rows(out) if r["split"] == "train"]
    assert steps[-1]["step"] < 20_000 and steps[-1]["lr"] < 0.05 * TINY["lr"]


def test_progressive_sizes_take_equal_shares_of_the_run_before_progressive_until():
    cfg = TrainConfig(**dict(TINY, progressive_sizes=(8, 12), progressive_until=0.5))  # image_size 16
    schedule, sizes = Schedule(cfg, 12, 4), []
    while not schedule.done:
        sizes.append(schedule.image_size()[0])
        schedule.advance()
    assert sizes == [8] * 3 + [12] * 3 + [16] * 6
    assert Schedule(TrainConfig(**TINY), 12, 4).image_size() == (16, 16)  # without progressive_sizes: image_size


def test_a_timed_run_s_progressive_sizes_follow_its_progress(clock):
    """Under a time limit the stages follow the run's progress, which sets the learning rate: half of it at 8 px
    here, for every step the time limit allows."""
    cfg = TrainConfig(**dict(TIMED, progressive_sizes=(8,), progressive_until=0.5))
    schedule, sizes = Schedule(cfg, 320, 50), []
    while not schedule.done:
        sizes.append(schedule.image_size()[0])
        before = schedule.progress
        clock[0] += 0.05 if sizes[-1] == 8 else 0.2  # the small images' steps are 4x as fast
        schedule.advance()
        if len(sizes) % 10 == 0:
            schedule.replan(len(sizes), False, CPU)
        assert (before < 0.5) == (sizes[-1] == 8)
    assert 8 in sizes and 16 in sizes
