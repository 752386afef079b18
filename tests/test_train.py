"""Training: tiny real runs (tests/tiny.py's set and model) killed, resumed, split across processes.

Every run uses one thread, here and in subprocesses, so that float results compare bit for bit across processes."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from checkpoints import tiny_source
from datasets import write_cls_shards, write_shards
from tiny import (  # noqa: F401 (fixtures)
    CNN,
    RANDOM,
    TINY,
    _one_line_error,
    assert_same_weights,
    fashion_dir,
    flags,
    reference_run,
    rows,
    subprocess_env,
    vitlab_train,
    weights,
    world,
)

from vitlab import cli
from vitlab import data as vitlab_data
from vitlab import model as model_module
from vitlab import runtime
from vitlab.common import ConfigError
from vitlab.config import PRESETS, TrainConfig, fine_tune, make_config
from vitlab.images import in_train_subset
from vitlab.schedule import learning_rate
from vitlab.train import (
    COMPILE_MIN_CPU_STEPS,
    EMA,
    ClassificationObjective,
    Process,
    _compiled,
    make_optimizer,
    train,
    train_step,
)
from vitlab.weights import load_model


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
    model = model_module.build_model(cfg.model_config(num_classes=10))
    decay, no_decay = make_optimizer(model, cfg, torch.device("cpu")).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert not_decayed >= {"pos_embed", "cls_token", "norm.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.bias"}
    assert decayed >= {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "head.weight"}
    assert not decayed & not_decayed and len(decayed | not_decayed) == len(names)


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
    assert train_rows[-1]["train_flops"] == 3 * model_module.forward_flops(load_model(out).cfg) * 32 * 64
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


@pytest.mark.slow
def test_resume_after_sigkill_ends_bit_for_bit_where_an_uninterrupted_run_does(tmp_path, reference_run):
    out = tmp_path / "run"
    killed = vitlab_train(*flags(RANDOM), "--out", out, VITLAB_FAULT="step@21")  # killed mid-epoch 2
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 16  # the last save before the kill
    train(TrainConfig(**RANDOM, out=str(out)), resume=True)
    assert_same_weights(weights(out), weights(reference_run))
    assert [(r["step"], r["loss"]) for r in rows(out)] == [(r["step"], r["loss"]) for r in rows(reference_run)]


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


def _has_child(pid: int) -> bool:
    """Whether process `pid` has a child process yet (Linux: /proc)."""
    try:
        return bool(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("signum, group", [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGTERM, True),
                                           (signal.SIGINT, True)],
                         ids=["SIGTERM", "SIGINT", "SIGTERM to the group, a loader worker", "Ctrl-C, a loader worker"])
def test_a_signal_finishes_the_step_saves_and_exits(tmp_path, signum, group):
    """The signal to the main process alone, or (group) to its whole process group, as a terminal's Ctrl-C or a
    scheduler's SIGTERM sends it, with a DataLoader worker in the group: the worker leaves it to the main process
    (data.signals_to_main; test_data has the worker's side). Before, SIGTERM killed the worker and the main process
    failed at once with a traceback; on Ctrl-C PyTorch's worker returned quietly, which passed here only because the
    main process had its batch already. The group is signalled as soon as the worker exists, its init maybe not run
    yet: the worker starts with both signals blocked (data.Loader)."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "vitlab", "train", *flags(TINY), "--epochs", "1000", "--no-compile", "--out",
               str(out)]  # (16,000 steps would be compiled by default: that is not what this test is about)
    if group:
        command += ["--num-workers", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                            start_new_session=group)
    try:
        deadline = time.monotonic() + 60
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size):
            assert time.monotonic() < deadline and proc.poll() is None, "the run did not start"
            time.sleep(0.1)
        if group:  # once an epoch's loader worker exists (Linux: /proc)
            while not _has_child(proc.pid):
                assert time.monotonic() < deadline and proc.poll() is None, "no loader worker started"
                time.sleep(0.01)
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum  # 143 for SIGTERM, 130 for SIGINT
    assert f"stopped by {signal.Signals(signum).name} after step" in stderr
    assert f"vitlab train --resume {out}" in stderr and "Traceback" not in stderr
    step = torch.load(out / "train_state.pt", weights_only=True)["step"]
    assert rows(out)[-1]["step"] == step > 0
    result = train(make_config(("saved", json.loads((out / "train_config.json").read_text())),
                               ("resume", dict(epochs=None, steps=step + 2))), resume=True)
    assert [r["step"] for r in rows(out) if r["split"] == "train"][-1] == step + 2
    assert result["n"] == 128 and 0 <= result["top1"] <= 1


# Equivalences of batching. SGD rather than Adam: Adam's update does not depend on the gradient's scale, so it
# would hide a wrongly scaled loss; SGD's update is the gradient itself, so they compare to float rounding.
# fp32: under bf16 autocast (the `auto` precision on a CPU with avx512_bf16) a micro-batch rounds differently from
# the whole batch, so the equalities below hold only to bf16 precision.
EXACT = dict(TINY, optimizer="sgd", lr=0.1, steps=6, precision="fp32")


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    train(TrainConfig(**EXACT, out=str(tmp_path / "large")))
    train(TrainConfig(**EXACT, accum_steps=4, out=str(tmp_path / "accumulated")))
    assert_same_weights(weights(tmp_path / "accumulated"), weights(tmp_path / "large"), atol=1e-6)


@pytest.mark.slow
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


@pytest.mark.parametrize("model,extra", [
    ("bit-r26x0.25", dict(image_size=32)),
    ("r26+vit-ti/8", dict(image_size=32, resnet_num_layers="1,1", resnet_width_factor=0.25, hidden_size=32,
                          num_layers=2, num_heads=2, mlp_dim=64)),
    ("r26+vit-ti/8", dict(image_size=32, resnet_root="3x3", resnet_num_layers="1,1,1,1", resnet_width_factor=0.125,
                          hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)),
])
@pytest.mark.slow
def test_bit_and_hybrid_train_evaluate_and_resume(tmp_path, capsys, model, extra):
    out = tmp_path / "run"
    fields = dict(CNN, model=model, epochs=3, **extra)
    assert cli.main(["train", *flags(fields), "--out", str(out)]) == 0
    accuracy = float(capsys.readouterr().out.strip().splitlines()[-1].split(": ")[1])
    assert accuracy > 0.3  # the tiny set's blocks; chance is 0.1
    loaded = load_model(out)
    assert loaded.cfg.name == {"bit-r26x0.25": "BiT-R26x0.25", "r26+vit-ti/8": "R26+ViT-Ti/8"}[model]
    if "resnet_root" in extra:  # the root is part of the checkpoint's config: strides 1, 1, 2, 2, 2 make 4x4 cells
        assert loaded.cfg.resnet_root == "3x3" and loaded.cfg.grid_size == (4, 4)
    train_rows = [r for r in rows(out) if r["split"] == "train"]
    assert train_rows[-1]["train_flops"] == 3 * model_module.forward_flops(loaded.cfg) * 32 * 48
    assert cli.main(["eval", str(out), "--data", "fashion-mnist"]) == 0
    assert f"{accuracy:.4f}" in capsys.readouterr().out
    # one more epoch from the checkpoint
    assert cli.main(["train", "--resume", str(out), "--epochs", "4"]) == 0
    assert [r["step"] for r in rows(out) if r["split"] == "train"][-1] == 64


def test_train_images_keeps_a_nested_subset_and_eval_every(tmp_path):
    from vitlab import data

    small = data.subset_indices(list(range(1000)), 100)
    large = data.subset_indices(list(range(1000)), 300)
    assert len(small) == 100 and len(large) == 300 and set(small) <= set(large)
    keys = [f"k{i:05d}" for i in range(1000)]
    assert in_train_subset(keys, 100) <= in_train_subset(keys, 300)
    assert len(in_train_subset(keys, 300)) == 300

    out = tmp_path / "run"
    train(TrainConfig(**dict(TINY, steps=12, train_images=96, eval_every=5, val_split=0.25), out=str(out)))
    records = rows(out)
    assert [r["step"] for r in records if r["split"] == "val"] == [5, 10, 12]
    assert [r["epoch"] for r in records if r["split"] == "train"][-1] == 4.0  # 96 images = 3 steps an epoch
    with pytest.raises(Exception, match="more than the 384 training images"):
        train(TrainConfig(**dict(TINY, steps=1, train_images=385, val_split=0.25), out=str(tmp_path / "big")))


def test_gradient_accumulation_equals_the_large_batch_when_fine_tuning(tmp_path):
    source = tiny_source(tmp_path)
    common = dict(init=str(source), data="fashion-mnist", batch_size=32, steps=3, lr=0.1, num_workers=0, crop="none",
                  flip=False, precision="fp32")  # fp32, as EXACT says
    train(fine_tune(**common, accum_steps=1, out=str(tmp_path / "large")))
    train(fine_tune(**common, accum_steps=4, out=str(tmp_path / "accumulated")))
    assert_same_weights(weights(tmp_path / "accumulated"), weights(tmp_path / "large"), atol=1e-6)


def test_the_mask_embedding_is_not_decayed():
    cfg = TrainConfig(**dict(TINY, objective="mpp"))
    model = model_module.build_model(cfg.model_config(num_classes=10))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in make_optimizer(model, cfg, torch.device("cpu")).param_groups
               if g["weight_decay"] > 0 for p in g["params"]}
    assert "mask_token" in names.values() and "mask_token" not in decayed and "mpp_head.weight" in decayed


def test_the_fused_adamw_on_a_cpu_takes_the_steps_of_pytorchs_reference_adamw():
    """make_optimizer's AdamW runs the fused kernel on a CPU; its steps are those of the for-loop implementation
    (weight decay per group, learning rate per group) to float32 rounding."""
    cfg = TrainConfig(**dict(TINY, weight_decay=0.1, lr=0.01))
    torch.manual_seed(0)
    model = model_module.build_model(cfg.model_config(num_classes=10))
    initial, reference_model = copy.deepcopy(model), copy.deepcopy(model)
    fused = make_optimizer(model, cfg, torch.device("cpu"))
    assert all(g["fused"] for g in fused.param_groups) and {g["weight_decay"] for g in fused.param_groups} == {0.0, 0.1}
    names = {id(p): n for n, p in model.named_parameters()}
    reference = torch.optim.AdamW([dict(g, params=[reference_model.get_parameter(names[id(p)]) for p in g["params"]],
                                        fused=False, foreach=False) for g in fused.param_groups])
    for step in range(5):
        for m in (model, reference_model):
            torch.manual_seed(step)
            for p in m.parameters():
                p.grad = torch.randn_like(p)
        fused.step()
        reference.step()
    for (name, p), q, p0 in zip(model.named_parameters(), reference_model.parameters(), initial.parameters()):
        assert (p - q).abs().max() < 1e-6 < (p - p0).abs().max(), name


def test_layer_decay_gives_each_layer_the_rate_of_the_formula():
    cfg = TrainConfig(**dict(TINY, layer_decay=0.5))  # 2 layers: embeddings 0.5^3, block 0 0.5^2, block 1 0.5, head 1
    model = model_module.build_model(cfg.model_config(num_classes=10))
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    scale = {name: g["lr_scale"] for g in optimizer.param_groups for p in g["params"]
             for name, q in model.named_parameters() if q is p}
    expected = {"patch_embed.proj.weight": 0.125, "cls_token": 0.125, "pos_embed": 0.125,
                "blocks.0.attn.qkv.weight": 0.25, "blocks.0.norm1.bias": 0.25, "blocks.1.mlp.fc2.weight": 0.5,
                "norm.weight": 1.0, "head.weight": 1.0, "head.bias": 1.0}
    assert {k: scale[k] for k in expected} == expected and len(scale) == len(list(model.parameters()))
    decayed = {g["weight_decay"] > 0 for g in optimizer.param_groups if g["lr_scale"] == 0.25}
    assert decayed == {True, False}  # weight decay is still per kind of parameter
    images, labels = torch.randint(0, 256, (32, 1, 16, 16), dtype=torch.uint8), torch.randint(0, 10, (32,))
    objective = ClassificationObjective(model.cfg, torch.device("cpu"), "fp32")
    train_step(model, model, optimizer, objective, images, labels, 0.01, 0, cfg, Process(0, 1, torch.device("cpu")))
    assert all(g["lr"] == pytest.approx(0.01 * g["lr_scale"]) for g in optimizer.param_groups)
    with pytest.raises(ConfigError, match="layer_decay applies to ViTs"):
        bit = model_module.build_model(model_module.model_config("bit-r26x0.25", image_size=32, num_classes=10))
        make_optimizer(bit, cfg, torch.device("cpu"))


def test_ema_equals_the_closed_form_after_k_steps():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    history = [torch.cat([p.detach().flatten() for p in model.parameters()]).double()]
    for _ in range(100):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        history.append(torch.cat([p.detach().flatten() for p in model.parameters()]).double())
    # ema_k = (prod_t d_t) w_0 + sum_t (1 - d_t) (prod_{s > t} d_s) w_t, d_t = min(0.9, (1 + t) / (10 + t))
    k = len(history) - 1
    d = [None] + [min(0.9, (1 + t) / (10 + t)) for t in range(1, k + 1)]
    expected = math.prod(d[1:]) * history[0]
    for t in range(1, k + 1):
        expected += (1 - d[t]) * math.prod(d[t + 1:]) * history[t]
    got = torch.cat([p.flatten() for p in ema.module.parameters()]).double()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert ema.updates == 100 and d[100] == 0.9 and d[1] == pytest.approx(2 / 11)  # warmed up by step 80
    assert not any(p.requires_grad for p in ema.module.parameters())


# The options of the recipes, all random where they can be: a resumed run must still end bit for bit.
RECIPE = dict(TINY, epochs=3, drop_path=0.2, ema_decay=0.9, posemb="sincos2d", classifier="gap", crop="pad",
              flip=True, trivialaugment=True, label_smoothing=0.1, attention_init="mimetic", deterministic=True,
              save_every=8)


@pytest.mark.slow
def test_drop_path_ema_and_sincos_resume_bit_for_bit_after_sigkill(tmp_path):
    reference = tmp_path / "reference"
    train(TrainConfig(**RECIPE, out=str(reference)))
    state = torch.load(reference / "train_state.pt", weights_only=True)
    assert state["ema_updates"] == 48 and set(state["model"]) == set(weights(reference))
    trained = load_model(reference)
    assert not any(torch.equal(state["model"][k], v) for k, v in trained.state_dict().items() if k != "pos_embed")
    assert trained.cfg.posemb == "sincos2d" and trained.cfg.stochastic_depth == 0.2
    evals = [r for r in rows(reference) if r["split"] == "test"]
    saved_eval = cli_eval_top1(reference)
    assert evals[-1]["top1"] == pytest.approx(saved_eval, abs=1e-4)  # what was evaluated is the model saved: the EMA

    out = tmp_path / "run"
    killed = vitlab_train(*flags(RECIPE), "--out", out, VITLAB_FAULT="step@21")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    train(TrainConfig(**RECIPE, out=str(out)), resume=True)
    assert_same_weights(weights(out), weights(reference))
    assert_same_weights(torch.load(out / "train_state.pt", weights_only=True)["model"], state["model"])
    with pytest.raises(Exception, match="ema_decay cannot be added or removed"):
        train(TrainConfig(**dict(RECIPE, ema_decay=None, epochs=4), out=str(out)), resume=True)


PROGRESSIVE = dict(TINY, epochs=3, progressive_sizes="8,12", crop="pad", flip=True, deterministic=True, save_every=8)


@pytest.mark.slow
def test_progressive_sizes_train_each_stage_at_its_size_and_resume_bit_for_bit_after_sigkill(tmp_path, capsys):
    """48 steps: the first 12 at 8 px, the next 12 at 12, the last 24 at the run's 16 (progressive_until 0.5); the
    logged FLOPs count each step at its size, and a run killed inside the second stage resumes into the same."""
    reference = tmp_path / "reference"
    result = train(TrainConfig(**PROGRESSIVE, out=str(reference)))
    cfg = load_model(reference).cfg
    per_step = {size: 3 * model_module.forward_flops(cfg.replace(image_size=size)) * 32 for size in (8, 12, 16)}
    flops = [0] + [r["train_flops"] for r in rows(reference) if r["split"] == "train"]
    assert [b - a for a, b in zip(flops, flops[1:])] == [per_step[8]] * 12 + [per_step[12]] * 12 + [per_step[16]] * 24
    assert result["n"] == 128 and cfg.image_size == (16, 16)  # evaluated, and saved, at image_size
    assert "48 steps of 32 images, the first 50% at 8 px, then 12 px (progressive resizing)" in capsys.readouterr().out
    assert all(r["img_s"] > 0 for r in rows(reference) if r["split"] == "train")  # each window's speed measured

    out = tmp_path / "run"
    killed = vitlab_train(*flags(PROGRESSIVE), "--out", out, VITLAB_FAULT="step@21")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    train(TrainConfig(**PROGRESSIVE, out=str(out)), resume=True)
    assert_same_weights(weights(out), weights(reference))
    assert [r for r in rows(out) if r["split"] == "train"][-1]["train_flops"] == flops[-1]


def cli_eval_top1(run_dir) -> float:
    result = subprocess.run([sys.executable, "-m", "vitlab", "eval", str(run_dir), "--data", "fashion-mnist"],
                            capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    return float(next(line for line in result.stdout.splitlines() if line.startswith("top1:")).split()[1])


@pytest.mark.parametrize("fields", [
    dict(precision="bf16", label_smoothing=0.1, classifier="gap", beta2=0.99, schedule="cosine"),  # the demo's
    dict(cutmix=1.0, mixup=0.8, label_smoothing=0.1),
    dict(autoaugment="cifar10", crop="pad", flip=True),
], ids=["demo-bf16-smoothing", "cutmix-mixup", "autoaugment"])
def test_the_recipes_options_run_through_the_loop(tmp_path, fields):
    result = train(TrainConfig(**dict(TINY, steps=6, **fields), out=str(tmp_path / "run")))
    assert result["n"] == 128 and 0 <= result["top1"] <= 1
    losses = [r["loss"] for r in rows(tmp_path / "run") if r["split"] == "train"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("native", [True, False])
def test_a_run_says_when_its_bf16_is_emulated(tmp_path, monkeypatch, capsys, native):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    train(TrainConfig(**dict(TINY, steps=1, precision="bf16"), out=str(tmp_path / "bf16")))
    train(TrainConfig(**dict(TINY, steps=1), out=str(tmp_path / "auto")))  # auto: what the hardware computes in
    first = [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(tmp_path))]
    assert ("bf16 emulated" in first[0]) is not native and "emulated" not in first[1]
    assert ("on cpu, bf16" if native else "on cpu, fp32") in first[1]


@pytest.mark.slow
def test_a_compiled_run_equals_an_eager_one(tmp_path):
    fields = dict(TINY, steps=3, precision="fp32")
    train(TrainConfig(**fields, out=str(tmp_path / "eager")))
    train(TrainConfig(**fields, compile=True, out=str(tmp_path / "compiled")))
    # the same computation, fused differently: float rounding, which Adam's normalised steps lift to ~1e-5
    assert_same_weights(weights(tmp_path / "compiled"), weights(tmp_path / "eager"), atol=1e-4)


def test_eval_data_evaluates_on_another_set(tmp_path):
    shards = write_cls_shards(tmp_path / "shards")
    result = train(TrainConfig(**dict(TINY, steps=4, eval_data=f"wds:{shards}"), out=str(tmp_path / "run")))
    assert result["n"] == 40  # every image of the shards
    assert [r["split"] for r in rows(tmp_path / "run") if r["split"] != "train"] == ["eval"]


@pytest.mark.parametrize("fields,expected", [
    (dict(trivialaugment=True), dict(trivialaugment=True)),
    (dict(autoaugment="cifar10"), dict(autoaugment="cifar10")),
    (dict(randaugment=(2, 9), crop="pad", crop_pad=1, flip=False), dict(randaugment=(2, 9), crop_pad=1, flip=False)),
])
def test_the_run_augments_as_its_config_says(tmp_path, monkeypatch, fields, expected):
    """Every augmentation field of the config reaches the training data's transform (TrivialAugment and
    AutoAugment were once accepted and not applied)."""
    seen = []
    real = vitlab_data.build
    monkeypatch.setattr(vitlab_data, "build", lambda *a, **k: seen.append(k["train_transform"]) or real(*a, **k))
    train(TrainConfig(**dict(TINY, steps=1, **fields), out=str(tmp_path / "run")))
    assert {name: getattr(seen[0], name) for name in expected} == expected
    assert seen[0].policy() is not None


def test_eval_epochs_evaluates_every_n_th_epoch_and_at_the_end(tmp_path):
    train(TrainConfig(**dict(TINY, epochs=5, eval_epochs=2), out=str(tmp_path / "run")))
    assert [r["epoch"] for r in rows(tmp_path / "run") if r["split"] != "train"] == [2.0, 4.0, 5.0]


def test_a_run_with_tta_flip_reports_and_saves_what_eval_measures_with_it(tmp_path, capsys):
    """The loop's evaluations use the run's --tta, and `vitlab eval` of the run measures the same by default."""
    out = tmp_path / "run"
    result = train(TrainConfig(**dict(TINY, steps=6, tta="flip"), out=str(out)))
    assert "evaluated with flip test-time augmentation" in capsys.readouterr().out
    for flags, tta in (([], "flip"), (["--tta", "none"], "none")):
        assert cli.main(["eval", str(out), "--data", "fashion-mnist", "--json", str(tmp_path / "e.json"), *flags]) == 0
        record = json.loads((tmp_path / "e.json").read_text())
        assert record["tta"] == tta
        if tta == "flip":
            assert record["top1"] == result["top1"] and record["loss"] == pytest.approx(result["loss"], rel=1e-6)
        else:
            assert record["loss"] != pytest.approx(result["loss"], rel=1e-6)


def test_compile_by_default_only_where_it_pays():
    model = torch.nn.Linear(2, 2)
    cpu, gpu = Process(0, 1, torch.device("cpu")), Process(0, 1, torch.device("cuda"))
    default = TrainConfig(**TINY)
    assert _compiled(model, default, cpu, COMPILE_MIN_CPU_STEPS - 1) is model  # a short CPU run: eager
    assert _compiled(model, default, cpu, COMPILE_MIN_CPU_STEPS) is not model
    assert _compiled(model, default, gpu, 10) is not model
    assert _compiled(model, TrainConfig(**dict(TINY, compile=False)), gpu, 10**6) is model  # what the user says wins
    assert _compiled(model, TrainConfig(**dict(TINY, compile=True)), cpu, 1) is not model


def test_metrics_rows_carry_the_wall_clock_time_of_the_run(tmp_path):
    train(TrainConfig(**dict(TINY, steps=20, save_every=10, log_every=5), out=str(tmp_path / "run")))
    times = [r["wall_s"] for r in rows(tmp_path / "run")]
    assert times == sorted(times) and times[0] > 0
    train(TrainConfig(**dict(TINY, steps=30, save_every=10, log_every=5), out=str(tmp_path / "run")), resume=True)
    again = [r["wall_s"] for r in rows(tmp_path / "run")]
    assert again[:len(times)] == times and again == sorted(again)  # a resume goes on counting



@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_trains_and_evaluates_as_it_is(name, tmp_path):
    """Each preset, unchanged but for its length and its data (the tiny Fashion-MNIST stand-in, or small shards
    for CIFAR-10: the presets' command names the shards with --data), runs its own model, augmentation, EMA and
    validation split through the loop."""
    preset = PRESETS[name]()
    fields = {f: getattr(preset, f) for f in preset.__dataclass_fields__}
    if preset.data != "fashion-mnist":
        fields["data"] = write_shards(tmp_path / "shards")
    fields.update(epochs=None, steps=2, batch_size=8, compile=False, out=str(tmp_path / "run"))
    result = train(TrainConfig(**fields))
    evaluated = [r for r in rows(tmp_path / "run") if r["split"] != "train"]
    assert evaluated and evaluated[-1]["split"] == ("test" if preset.data == "fashion-mnist" else "val")
    assert 0.0 <= result["top1"] <= 1.0 and result["n"] == evaluated[-1]["n"] > 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["name"] == preset.model_config(num_classes=10).name
