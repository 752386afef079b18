"""The run directory's save protocol: a process killed at any point of a save, or a disk full during one, leaves a
loadable checkpoint that resumes bit for bit."""

from __future__ import annotations

import signal

import pytest
import torch
from checkpoints import Payload
from tiny import (  # noqa: F401 (fixtures)
    RANDOM,
    TINY,
    assert_same_weights,
    fashion_dir,
    flags,
    reference_run,
    vitlab_train,
    weights,
    world,
)

from vitlab import cli, rundir
from vitlab import weights as weights_module
from vitlab.config import TrainConfig
from vitlab.train import train
from vitlab.weights import load_model


@pytest.mark.slow
@pytest.mark.parametrize("point", ["staged", "committed", "moved-model.safetensors"])
def test_a_kill_during_a_save_leaves_a_loadable_and_resumable_checkpoint(tmp_path, reference_run, point):
    # The save of step 16 is killed: before its commit (the previous checkpoint, step 8, stands), after it, and
    # halfway through moving the files in (DIR holds step 16's weights beside step 8's training state).
    out = tmp_path / "run"
    killed = vitlab_train(*flags(RANDOM), "--out", out, VITLAB_FAULT=f"{point}@16")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    load_model(out)  # loadable as it is
    train(TrainConfig(**RANDOM, out=str(out)), resume=True)
    assert_same_weights(weights(out), weights(reference_run))
    assert not (out / ".next").exists() and not (out / ".next.tmp").exists()


@pytest.mark.slow
def test_an_error_while_saving_keeps_the_previous_checkpoint(tmp_path, reference_run, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    saves = []

    def failing_save(obj, path):  # the second save writes half a file, then the disk is full
        saves.append(obj["step"])
        if len(saves) == 2:
            with open(path, "wb") as f:
                f.write(b"half a state")
            raise OSError(28, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(rundir.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        train(TrainConfig(**RANDOM, out=str(out)))
    monkeypatch.setattr(rundir.torch, "save", real_save)
    assert saves == [8, 16]
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 8
    load_model(out)
    train(TrainConfig(**RANDOM, out=str(out)), resume=True)
    assert_same_weights(weights(out), weights(reference_run))


@pytest.mark.slow
def test_a_disk_full_during_the_weights_write_keeps_the_previous_checkpoint(tmp_path, reference_run, monkeypatch):
    out = tmp_path / "run"
    real_write = weights_module.save_safetensors
    writes = []

    def failing_write(tensors, path, metadata=None):  # the second save's weights: half a file, then the disk is full
        writes.append(path)
        if len(writes) == 2:
            with open(path, "wb") as f:
                f.write(b"half a safetensors file")
            raise OSError(28, "No space left on device")
        real_write(tensors, path, metadata=metadata)

    monkeypatch.setattr(weights_module, "save_safetensors", failing_write)
    with pytest.raises(OSError, match="No space left"):
        train(TrainConfig(**RANDOM, out=str(out)))
    monkeypatch.setattr(weights_module, "save_safetensors", real_write)
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 8  # the first save stands, whole
    load_model(out)
    assert not (out / ".next.tmp").exists() and not (out / ".next").exists()
    train(TrainConfig(**RANDOM, out=str(out)), resume=True)
    assert_same_weights(weights(out), weights(reference_run))


def test_a_malicious_training_state_is_refused_not_unpickled(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *flags(TINY), "--steps", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    sentinel = tmp_path / "sentinel"
    state = torch.load(out / "train_state.pt", weights_only=True)
    torch.save(dict(state, payload=Payload(sentinel)), out / "train_state.pt")  # a pickle that runs code when loaded
    assert cli.main(["train", "--resume", str(out), "--steps", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train_state.pt: not a readable training state" in err[0]
    assert not sentinel.exists()

