"""Training: tiny real runs (tests/tiny.py's set and model) killed, resumed, split across processes.

Every run uses one thread, here and in subprocesses, so that float results compare bit for bit across processes.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tiny import TINY, flags, tiny_world, write_fashion_mnist, fashion_dir, world  # noqa: F401 (fixtures)
from vitlab import cli
from vitlab import train as train_module
from vitlab.train import PRESETS, TrainConfig, learning_rate, make_config, make_optimizer, train
from vitlab.weights import load_model

# For bit-exact resumes: everything random on (dropout, mixup, pad-crop and flips), saved every 8 steps.
RANDOM = dict(TINY, epochs=3, dropout=0.1, mixup=0.2, crop="pad", flip=True, deterministic=True, save_every=8)


def subprocess_env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def vitlab_train(*args, **env):
    return subprocess.run([sys.executable, "-m", "vitlab", "train", *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(**env), timeout=120)


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fashion_dir):
    """An uninterrupted RANDOM run: what every killed-and-resumed run must end with, bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with tiny_world(fashion_dir):
        train(TrainConfig(**RANDOM, out=str(out)))
    return out


# --------------------------------------------------------------------------------------------------------------
# The configuration
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_says_how_to_run_it(name):
    cfg = PRESETS[name]()
    assert isinstance(cfg, TrainConfig)
    cfg.model_config(num_classes=10)
    doc = PRESETS[name].__doc__
    for part in ("Command:", "Expected:", "Time:", "Hardware:"):
        assert part in doc


def test_flags_are_parsed_against_the_field_types():
    cfg = make_config(("command line", dict(
        data="fashion-mnist", model="vit-ti/4", image_size="16x24", randaugment="2,9", grad_clip="none",
        flip="false", mean="0.25", std="0.5", lr="1e-3", batch_size="64", optimizer="sgd", steps="7",
    )))
    assert cfg.image_size == (16, 24) and cfg.randaugment == (2, 9) and cfg.grad_clip is None
    assert cfg.flip is False and cfg.mean == (0.25,) and cfg.lr == 1e-3 and cfg.batch_size == 64
    assert cfg.in_chans == 1  # Fashion-MNIST is grey
    assert cfg.weight_decay == 0.0  # the paper fine-tunes with SGD and no weight decay; AdamW's default is 0.1
    assert cfg.steps == 7 and cfg.epochs is None
    assert make_config(("a", dict(TINY)), ("b", dict(steps=5))).epochs is None  # a later layer's length wins


def test_learning_rate_warms_up_linearly_then_decays_to_zero():
    cfg = TrainConfig(**dict(TINY, warmup=10, lr=1.0))
    assert [learning_rate(cfg, s, 110) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert learning_rate(cfg, 60, 110) == pytest.approx(0.5)  # linear: halfway through the decay
    assert learning_rate(cfg, 109, 110) == pytest.approx(0.01)
    cosine = TrainConfig(**dict(TINY, warmup=0.1, lr=1.0, schedule="cosine"))
    assert learning_rate(cosine, 9, 100) == 1.0  # a warm-up of 10% of 100 steps
    assert learning_rate(cosine, 55, 100) == pytest.approx(0.5)


def test_no_weight_decay_on_biases_norms_position_embeddings_and_class_token():
    cfg = TrainConfig(**TINY)
    model = train_module.build_model(cfg.model_config(num_classes=10))
    decay, no_decay = make_optimizer(model, cfg, torch.device("cpu")).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert not_decayed >= {"pos_embed", "cls_token", "norm.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.bias"}
    assert decayed >= {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "head.weight"}
    assert not decayed & not_decayed and len(decayed | not_decayed) == len(names)


def _one_line_error(capsys, argv, *fragments):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("yaml_text,extra,fragments", [
    ("weight_decy: 0.1\n", [], ["unknown field 'weight_decy'", "did you mean 'weight_decay'"]),
    ("epochs: many\n", [], ["epochs must be an int", "'many'"]),
    ("", ["--batch-size", "abc"], ["batch_size must be an int", "'abc'"]),
    ("", ["--image-size", "30"], ["patch_size (4, 4) does not divide image_size (30, 30)"]),
    ("", ["--schedule", "exp"], ["schedule must be linear or cosine"]),
    ("", ["--label-smoothing", "1.5"], ["label_smoothing must be in [0, 1)"]),
    ("", ["--steps", "5", "--epochs", "2"], ["set epochs (2) or steps (5), not both"]),
])
def test_config_errors_are_one_line_before_any_work(tmp_path, capsys, yaml_text, extra, fragments):
    config = tmp_path / "run.yaml"
    config.write_text(yaml_text)
    out = tmp_path / "run"
    argv = ["train", "--config", str(config), *flags({k: v for k, v in TINY.items()}), "--out", str(out), *extra]
    _one_line_error(capsys, argv, *fragments)
    assert not out.exists()


# --------------------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------------------


def test_a_short_run_learns_and_leaves_its_records(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *flags(TINY), "--epochs", "4", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    assert stdout[-1].startswith("test accuracy: ")
    accuracy = float(stdout[-1].split(": ")[1])
    assert accuracy >= 0.5  # chance is 0.1

    assert {p.name for p in out.iterdir()} >= {"train_config.json", "config.json", "model.safetensors",
                                                "train_state.pt", "metrics.jsonl", "curves.png", "tb"}
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["lr"] == 3e-3 and saved["epochs"] == 4 and saved["weight_decay"] == 0.1

    records = rows(out)
    train_rows = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, 65))  # 512 images / 32 = 16 steps an epoch
    assert set(train_rows[0]) >= {"step", "epoch", "loss", "acc", "lr", "img_s", "train_flops"}
    assert train_rows[-1]["train_flops"] == 3 * train_module.forward_flops(load_model(out).cfg) * 32 * 64
    evals = [r for r in records if r["split"] == "test"]
    assert [r["step"] for r in evals] == [16, 32, 48, 64]  # each epoch
    assert evals[-1]["top1"] == pytest.approx(accuracy, abs=1e-4) and evals[-1]["n"] == 128

    model = load_model(out)
    assert model.cfg.in_chans == 1 and model.cfg.num_classes == 10 and model.cfg.class_names[9] == "Ankle boot"
    assert model.cfg.mean == (0.5,) and model.cfg.std == (0.5,)
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batch"]) == (64, 4, 0)

    # the same command again would overwrite the run: refused
    _one_line_error(capsys, ["train", *flags(TINY), "--out", str(out)], "already holds a run", "--resume")


def test_resume_after_sigkill_ends_bit_for_bit_where_an_uninterrupted_run_does(tmp_path, reference):
    out = tmp_path / "run"
    killed = vitlab_train(*flags(RANDOM), "--out", out, VITLAB_FAULT="step@21")  # killed mid-epoch 2
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 16  # the last save before the kill
    train(TrainConfig(**RANDOM, out=str(out)), resume=True)
    assert_same_weights(weights(out), weights(reference))
    assert [(r["step"], r["loss"]) for r in rows(out)] == [(r["step"], r["loss"]) for r in rows(reference)]


@pytest.mark.parametrize("point", ["staged", "committed", "moved-model.safetensors"])
def test_a_kill_during_a_save_leaves_a_loadable_and_resumable_checkpoint(tmp_path, reference, point):
    # The save of step 16 is killed: before its commit (the previous checkpoint, step 8, stands), after it, and
    # halfway through moving the files in (DIR holds step 16's weights beside step 8's training state).
    out = tmp_path / "run"
    killed = vitlab_train(*flags(RANDOM), "--out", out, VITLAB_FAULT=f"{point}@16")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    load_model(out)  # loadable as it is
    train(TrainConfig(**RANDOM, out=str(out)), resume=True)
    assert_same_weights(weights(out), weights(reference))
    assert not (out / ".next").exists() and not (out / ".next.tmp").exists()


def test_an_error_while_saving_keeps_the_previous_checkpoint(tmp_path, reference, monkeypatch):
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

    monkeypatch.setattr(train_module.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        train(TrainConfig(**RANDOM, out=str(out)))
    monkeypatch.setattr(train_module.torch, "save", real_save)
    assert saves == [8, 16]
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 8
    load_model(out)
    train(TrainConfig(**RANDOM, out=str(out)), resume=True)
    assert_same_weights(weights(out), weights(reference))


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *flags(TINY), "--steps", "8", "--out", str(out)]) == 0
    before = {name: (out / name).read_bytes() for name in ("model.safetensors", "train_state.pt")}
    with pytest.raises(SystemExit) as stopped:
        cli.main(["train", "--resume", str(out), "--steps", "40", "--lr", "1e30"])  # diverges within a few steps
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    step = int(err.split(" at step ")[1].split(";")[0])
    assert err.startswith("vitlab train: error: the loss is nan at step") and 8 < step < 40
    assert f"{out} keeps step 8" in err
    assert {name: (out / name).read_bytes() for name in before} == before


def test_sigterm_finishes_the_step_saves_and_exits(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "vitlab", "train", *flags(TINY), "--epochs", "1000", "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        deadline = time.monotonic() + 60
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size):
            assert time.monotonic() < deadline and proc.poll() is None, "the run did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM after step" in stderr and f"vitlab train --resume {out}" in stderr
    step = torch.load(out / "train_state.pt", weights_only=True)["step"]
    assert rows(out)[-1]["step"] == step > 0
    assert train(make_config(("saved", json.loads((out / "train_config.json").read_text())),
                             ("resume", dict(epochs=None, steps=step + 2))), resume=True)


# Equivalences of batching. SGD rather than Adam: Adam's update does not depend on the gradient's scale, so it
# would hide a wrongly scaled loss; SGD's update is the gradient itself, so they compare to float rounding.
EXACT = dict(TINY, optimizer="sgd", lr=0.1, steps=6)


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    train(TrainConfig(**EXACT, out=str(tmp_path / "large")))
    train(TrainConfig(**EXACT, accum_steps=4, out=str(tmp_path / "accumulated")))
    assert_same_weights(weights(tmp_path / "accumulated"), weights(tmp_path / "large"), atol=1e-6)


def test_torchrun_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         "-m", "vitlab", "train", *flags(EXACT), "--out", str(out)],
        capture_output=True, text=True, env=subprocess_env(), timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes on cpu" in result.stdout and result.stdout.count("test accuracy:") == 1  # process 0 prints
    train(TrainConfig(**EXACT, out=str(tmp_path / "one")))
    assert_same_weights(weights(out), weights(tmp_path / "one"), atol=1e-6)
    assert len(torch.load(out / "train_state.pt", weights_only=True)["rng"]) == 2  # each process's RNG states


# --------------------------------------------------------------------------------------------------------------
# The paper's other models, data subsets, evaluation frequency
# --------------------------------------------------------------------------------------------------------------

CNN = {k: v for k, v in TINY.items() if k not in ("model", "hidden_size", "num_layers", "num_heads", "mlp_dim")}


@pytest.mark.parametrize("model,extra", [
    ("bit-r26x0.25", dict(image_size=32)),
    ("r26+vit-ti/8", dict(image_size=32, resnet_num_layers="1,1", resnet_width_factor=0.25, hidden_size=32,
                          num_layers=2, num_heads=2, mlp_dim=64)),
])
def test_bit_and_hybrid_train_evaluate_and_resume(tmp_path, capsys, model, extra):
    out = tmp_path / "run"
    fields = dict(CNN, model=model, epochs=3, **extra)
    assert cli.main(["train", *flags(fields), "--out", str(out)]) == 0
    accuracy = float(capsys.readouterr().out.strip().splitlines()[-1].split(": ")[1])
    assert accuracy > 0.3  # the tiny set's blocks; chance is 0.1
    loaded = load_model(out)
    assert loaded.cfg.name == {"bit-r26x0.25": "BiT-R26x0.25", "r26+vit-ti/8": "R26+ViT-Ti/8"}[model]
    train_rows = [r for r in rows(out) if r["split"] == "train"]
    assert train_rows[-1]["train_flops"] == 3 * train_module.forward_flops(loaded.cfg) * 32 * 48
    assert cli.main(["eval", str(out), "--data", "fashion-mnist"]) == 0
    assert f"{accuracy:.4f}" in capsys.readouterr().out
    # one more epoch from the checkpoint
    assert cli.main(["train", "--resume", str(out), "--epochs", "4"]) == 0
    assert [r["step"] for r in rows(out) if r["split"] == "train"][-1] == 64


def test_resnet_flags_only_for_resnets(capsys):
    _one_line_error(capsys, ["train", *flags(TINY), "--resnet-num-layers", "1"], "resnet_num_layers",
                    "apply to hybrids and BiT ResNets")
    _one_line_error(capsys, ["train", *flags(dict(CNN, model="bit-r26x1", hidden_size=64))], "hidden_size",
                    "does not apply to the BiT ResNet")


def test_train_images_keeps_a_nested_subset_and_eval_every(tmp_path):
    from vitlab import data

    small = data.subset_indices(list(range(1000)), 100)
    large = data.subset_indices(list(range(1000)), 300)
    assert len(small) == 100 and len(large) == 300 and set(small) <= set(large)
    keys = [f"k{i:05d}" for i in range(1000)]
    assert data.in_train_subset(keys, 100) <= data.in_train_subset(keys, 300)
    assert len(data.in_train_subset(keys, 300)) == 300

    out = tmp_path / "run"
    train(TrainConfig(**dict(TINY, steps=12, train_images=96, eval_every=5, val_split=0.25), out=str(out)))
    records = rows(out)
    assert [r["step"] for r in records if r["split"] == "val"] == [5, 10, 12]
    assert [r["epoch"] for r in records if r["split"] == "train"][-1] == 4.0  # 96 images = 3 steps an epoch
    with pytest.raises(Exception, match="more than the 384 training images"):
        train(TrainConfig(**dict(TINY, steps=1, train_images=385, val_split=0.25), out=str(tmp_path / "big")))
