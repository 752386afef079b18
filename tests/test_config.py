"""vitlab.config: presets, flags and config files parsed against the field types, one-line errors before any work,
the fine-tuning defaults."""

from __future__ import annotations

import pytest
from checkpoints import tiny_source
from tiny import CNN, TINY, _one_line_error, fashion_dir, flags, world  # noqa: F401 (fixtures)

from vitlab import cli
from vitlab.common import ConfigError
from vitlab.config import FINE_TUNE, PRESETS, TrainConfig, fine_tune, make_config
from vitlab.schedule import learning_rate


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
    # a later layer's evaluation set wins: --eval-data on a preset with a validation split
    preset = dict(TINY, val_split=0.1)
    assert make_config(("preset", preset), ("flags", dict(eval_data="wds:t.tar"))).val_split is None
    with pytest.raises(ConfigError, match="eval_data or val_split"):
        make_config(("flags", dict(preset, eval_data="wds:t.tar")))


@pytest.mark.parametrize("yaml_text,extra,fragments", [
    ("weight_decy: 0.1\n", [], ["unknown field 'weight_decy'", "did you mean 'weight_decay'"]),
    ("epochs: many\n", [], ["epochs must be an int", "'many'"]),
    ("", ["--batch-size", "abc"], ["batch_size must be an int", "'abc'"]),
    ("", ["--image-size", "30"], ["patch_size (4, 4) does not divide image_size (30, 30)"]),
    ("", ["--schedule", "exp"], ["schedule must be 'linear' or 'cosine'"]),
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


def test_resnet_flags_only_for_resnets(capsys):
    _one_line_error(capsys, ["train", *flags(TINY), "--resnet-num-layers", "1"], "resnet_num_layers",
                    "apply to hybrids and BiT ResNets")
    _one_line_error(capsys, ["train", *flags(dict(CNN, model="bit-r26x1", hidden_size=64))], "hidden_size",
                    "does not apply to the BiT ResNet")
    _one_line_error(capsys, ["train", *flags(dict(CNN, model="bit-r26x1", resnet_root="3x3"))], "resnet_root",
                    "does not apply to the BiT ResNet")
    _one_line_error(capsys, ["train", *flags(TINY), "--resnet-root", "3x3"], "resnet_root applies to hybrids")


def test_fine_tune_defaults_are_the_papers_and_the_schedule_warms_up_then_cosine(tmp_path):
    cfg = fine_tune(init=str(tmp_path), data="fashion-mnist", steps=200)
    assert (cfg.optimizer, cfg.momentum, cfg.weight_decay, cfg.grad_clip) == ("sgd", 0.9, 0.0, 1.0)
    assert cfg.schedule == "cosine"
    assert (cfg.batch_size, cfg.accum_steps, cfg.lr) == (512, 8, 0.03) and FINE_TUNE["steps"] == 10_000
    lrs = [learning_rate(cfg, s, 200) for s in range(200)]
    warm = int(0.05 * 200)
    assert lrs[:warm] == pytest.approx([0.03 * (s + 1) / warm for s in range(warm)])  # linear to the peak
    assert lrs[warm - 1] == pytest.approx(0.03) and lrs[-1] < 1e-5
    decay = lrs[warm:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    middle = warm + (200 - warm) // 2
    assert lrs[middle] == pytest.approx(0.015, rel=1e-2)  # cosine: half the peak halfway through the decay


def test_finetune_flags_that_conflict_are_one_line_errors(tmp_path, capsys):
    source = tiny_source(tmp_path)
    assert cli.main(["finetune", "--data", "fashion-mnist", "--out", str(tmp_path / "a")]) == 2
    assert "--init is required" in capsys.readouterr().err
    assert cli.main(["finetune", "--init", str(source), "--data", "fashion-mnist", "--model", "vit-b/16",
                     "--out", str(tmp_path / "b")]) == 2
    assert "model cannot be set with init" in capsys.readouterr().err
    assert cli.main(["finetune", "--init", str(source), "--data", "fashion-mnist", "--in-chans", "3",
                     "--out", str(tmp_path / "c")]) == 2
    assert "in_chans 3 differs from the 1 of" in capsys.readouterr().err


def test_the_recipe_flags_are_fields_that_reach_the_model():
    cfg = make_config(("command line", dict(TINY, drop_path="0.1", posemb="sincos2d", ema_decay="0.999",
                                            trivialaugment="true", layer_decay="0.75", eval_data="wds:/d/t-{0..1}.tar",
                                            attention_init="mimetic", progressive_sizes="8,12")))
    assert (cfg.drop_path, cfg.posemb, cfg.ema_decay, cfg.trivialaugment, cfg.layer_decay, cfg.attention_init) == (
        0.1, "sincos2d", 0.999, True, 0.75, "mimetic")
    model_cfg = cfg.model_config(num_classes=10)
    assert model_cfg.stochastic_depth == 0.1 and model_cfg.posemb == "sincos2d"
    assert make_config(("flags", dict(TINY, autoaugment="cifar10"))).autoaugment == "cifar10"
    assert cfg.progressive_sizes == (8, 12) and cfg.progressive_until == 0.5


@pytest.mark.parametrize("fields,message", [
    (dict(trivialaugment=True, randaugment="2,9"), "choose one augmentation policy, not randaugment and trivialaugment"),
    (dict(autoaugment="mnist"), "autoaugment must be 'cifar10' or 'imagenet' or 'svhn'"),
    (dict(ema_decay=1.0), "ema_decay must be in (0, 1)"),
    (dict(layer_decay=0), "layer_decay must be in (0, 1]"),
    (dict(drop_path=1.0), "drop_path must be in [0, 1)"),
    (dict(eval_data="imagenet"), "unknown data spec 'imagenet'"),
    (dict(eval_data="wds:/x.tar", val_split=0.1), "set eval_data or val_split, not both"),
    (dict(model="bit-r26x1", hidden_size=None, num_layers=None, num_heads=None, mlp_dim=None, image_size=32,
          drop_path=0.1), "drop_path does not apply to the BiT ResNet"),
    (dict(model=None, hidden_size=None, num_layers=None, num_heads=None, mlp_dim=None, init="x.npz",
          posemb="sincos2d"), "posemb cannot be set with init"),
    (dict(attention_init="xavier"), "attention_init must be 'official' or 'mimetic'"),
    (dict(model=None, hidden_size=None, num_layers=None, num_heads=None, mlp_dim=None, init="x.npz",
          attention_init="mimetic"), "attention_init mimetic initialises a model trained from scratch; with init"),
    (dict(model="bit-r26x1", hidden_size=None, num_layers=None, num_heads=None, mlp_dim=None, image_size=32,
          attention_init="mimetic"), "attention_init does not apply to the BiT ResNet bit-r26x1"),
    (dict(progressive_sizes="8,6"), "progressive_sizes must rise, each below image_size 16, got 8,6"),
    (dict(progressive_sizes="16"), "progressive_sizes must rise, each below image_size 16, got 16"),
    (dict(progressive_sizes="10"), "progressive_sizes 10: patch_size (4, 4) does not divide image_size (10, 10)"),
    (dict(progressive_sizes="8", image_size="16x12"), "progressive_sizes needs a square image_size, got 16x12"),
    (dict(progressive_sizes="8", progressive_until=1.0), "progressive_until must be in (0, 1)"),
    (dict(progressive_sizes="8", objective="mpp"), "progressive_sizes does not apply to objective mpp"),
    (dict(model=None, hidden_size=None, num_layers=None, num_heads=None, mlp_dim=None, init="x.npz",
          progressive_sizes="8"), "progressive_sizes trains a model from scratch"),
])
def test_recipe_flag_errors_name_the_field(fields, message):
    with pytest.raises(ConfigError) as error:
        TrainConfig(**{k: v for k, v in dict(TINY, **fields).items() if v is not None})
    assert message in str(error.value)
