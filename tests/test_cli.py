"""The `vitlab` command: its output, and one-line errors with a non-zero exit. In-process through `cli.main` (what
the `vitlab` script calls), and once as a user runs it, in a subprocess."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import official
import pytest
import torch
from checkpoints import randomise
from datasets import fmnist  # noqa: F401 (fixture)
from PIL import Image

import vitlab as vitlab_module
from vitlab import cli
from vitlab.model import VisionTransformer, ViTConfig
from vitlab.weights import load_model, save_checkpoint


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def vitlab(*args) -> Result:
    """`vitlab ARGS` in this process: its exit code and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    return Result(code, out.getvalue(), err.getvalue())


@pytest.mark.slow
def test_the_command_as_a_user_runs_it():
    result = subprocess.run([sys.executable, "-m", "vitlab", "models", "--image-size", "32", "--patch", "4"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "ViT-Ti/4" in result.stdout, result.stderr
    result = subprocess.run([sys.executable, "-m", "vitlab", "convert", "missing.npz", "out"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and result.stderr.strip() == "vitlab convert: error: missing.npz: no such file"


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_models_lists_every_variant():
    result = vitlab("models")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for name, params in [("ViT-Ti/16", "5,717,416"), ("ViT-S/16", "22,050,664"), ("ViT-B/16", "86,567,656"),
                         ("ViT-L/16", "304,326,632"), ("ViT-H/14", "632,045,800")]:
        line = next(line for line in out.splitlines() if line.startswith(name))
        assert params in line
    assert "GFLOPs" in out and "35.13" in out  # ViT-B/16 at 224


def test_models_at_another_resolution():
    result = vitlab("models", "--image-size", "384", "--patch", "32")
    assert result.returncode == 0
    row = next(line.split() for line in result.stdout.splitlines() if line.startswith("ViT-B/32"))
    assert row[5] == "145"  # the tokens column: 12 x 12 patches + 1


def test_convert_npz(tmp_path):
    src = official.path("vit_jax_vit")
    result = vitlab("convert", src, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "2 layers, width 32" in result.stdout and "mean (0.5, 0.5, 0.5)" in result.stdout
    model = load_model(tmp_path / "out")
    assert model.cfg.gelu == "tanh" and model.cfg.num_classes == 7


def test_convert_with_new_resolution_and_head_then_export(tmp_path):
    src = official.path("vit_jax_vit")
    assert vitlab("convert", src, tmp_path / "out", "--image-size", "24x32", "--num-classes", "2").returncode == 0
    model = load_model(tmp_path / "out")
    assert model.cfg.image_size == (24, 32) and model.cfg.num_classes == 2
    result = vitlab("export", tmp_path / "out", tmp_path / "back.npz")
    assert result.returncode == 0, result.stderr
    back = load_model(tmp_path / "back.npz")  # what was exported loads, as the same model
    assert back.cfg.image_size == (24, 32) and back.cfg.num_classes == 2
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def _file(path, content: bytes):
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "make,fragments",
    [
        (lambda d: d / "missing.npz", ["missing.npz: no such file"]),
        (lambda d: _file(d / "empty.npz", b""), ["empty.npz: the file is empty"]),
        (lambda d: _file(d / "junk.npz", b"junk"), ["junk.npz: not an .npz archive"]),
        (lambda d: d, ["not a vitlab checkpoint"]),
    ],
)
def test_convert_errors_are_one_line(tmp_path, make, fragments):
    assert_one_line_error(vitlab("convert", make(tmp_path), tmp_path / "out"), *fragments)


def test_convert_bad_resolution_names_the_field(tmp_path):
    src = official.path("vit_jax_vit")
    result = vitlab("convert", src, tmp_path / "out", "--image-size", "30")
    assert_one_line_error(result, "patch_size (4, 4) does not divide image_size (30, 30)")
    assert not (tmp_path / "out").exists()  # nothing written


def test_bad_arguments_exit_non_zero():
    result = vitlab("models", "--image-size", "big")
    assert result.returncode == 2 and "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------------------------
# One convention for every command
# --------------------------------------------------------------------------------------------------------------


def test_version_and_defaults_in_help():
    assert vitlab("--version").stdout.strip() == f"vitlab {vitlab_module.__version__}"
    train_help = vitlab("train", "--help").stdout
    for shown in ("--lr LR", "(default: 0.001)", "--batch-size BATCH_SIZE", "(default: 512)", "(default: linear)",
                  "(default: 0.05)", "(default: 2)"):  # lr, batch, schedule, warmup, num-workers
        assert shown in train_help, shown
    finetune_help = " ".join(vitlab("finetune", "--help").stdout.split())
    assert "(default: 10000)" in finetune_help and "(default: sgd)" in finetune_help
    epochs_help = finetune_help.rsplit("--epochs EPOCHS", 1)[1].split("--steps STEPS")[0]
    assert "passes over" in epochs_help and "default" not in epochs_help  # fine-tuning counts steps, not train's 10 epochs
    assert "(default: 5)" in " ".join(vitlab("predict", "--help").stdout.split())  # --top-k


def test_outputs_are_out_everywhere_with_the_old_positional_kept(tmp_path):
    src = official.path("vit_jax_vit")
    assert vitlab("convert", src, "--out", tmp_path / "flag").returncode == 0
    assert vitlab("convert", src, tmp_path / "positional").returncode == 0
    assert vitlab("export", tmp_path / "flag", "--out", tmp_path / "back.npz").returncode == 0
    assert (tmp_path / "back.npz").exists() and (tmp_path / "back.npz.json").exists()
    result = vitlab("convert", src, tmp_path / "x", "--out", tmp_path / "y")
    assert result.returncode == 2 and "two outputs" in result.stderr
    assert "--out is required" in vitlab("convert", src).stderr


def test_models_says_when_no_hybrid_fits_instead_of_an_empty_table(tmp_path):
    result = vitlab("models", "--image-size", "28", "--patch", "7", "--json", tmp_path / "m.json")
    assert result.returncode == 0 and "ViT-B/7" in result.stdout
    assert "baselines and hybrids" not in result.stdout and "no hybrid or BiT ResNet fits 28x28" in result.stdout
    assert [r["name"] for r in json.loads((tmp_path / "m.json").read_text())["vit"]][:2] == ["ViT-Ti/7", "ViT-S/7"]


def test_an_export_keeps_what_the_npz_cannot_hold_so_predictions_survive_the_round_trip(tmp_path):
    cfg = ViTConfig(image_size=(16, 24), patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
                    num_classes=3, in_chans=1, mean=(0.286,), std=(0.353,), class_names=("T-shirt/top", "Bag", "Sandal"),
                    gelu="exact")
    model = randomise(VisionTransformer(cfg), seed=2)
    save_checkpoint(model, tmp_path / "ck")
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 20), dtype=np.uint8)).save(image)
    before = vitlab("predict", tmp_path / "ck", image, "--precision", "fp32")
    assert vitlab("export", tmp_path / "ck", tmp_path / "m.npz").returncode == 0
    after = vitlab("predict", tmp_path / "m.npz", image, "--precision", "fp32")
    assert before.returncode == after.returncode == 0 and after.stdout == before.stdout  # names, order, probabilities
    loaded = load_model(tmp_path / "m.npz")
    assert (loaded.cfg.mean, loaded.cfg.std, loaded.cfg.class_names, loaded.cfg.gelu, loaded.cfg.image_size) == (
        cfg.mean, cfg.std, cfg.class_names, "exact", (16, 24))
    # without the sidecar the file is the official layout alone, and convert takes what it lacks
    (tmp_path / "m.npz.json").unlink()
    (tmp_path / "names.txt").write_text("T-shirt/top\nBag\nSandal\n")
    result = vitlab("convert", tmp_path / "m.npz", tmp_path / "again", "--source-grid", "4x6", "--mean", "0.286",
                    "--std", "0.353", "--class-names", tmp_path / "names.txt", "--gelu", "exact")
    assert result.returncode == 0, result.stderr
    assert vitlab("predict", tmp_path / "again", image, "--precision", "fp32").stdout == before.stdout.replace(
        str(tmp_path / "ck"), str(tmp_path / "again"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_jax_r1-1_hybrid", "big_transfer_bit"])
def test_an_official_file_through_every_command(tmp_path, fmnist, name):
    """The official hybrid and BiT files: converted (their logits kept), evaluated, inspected, fine-tuned from,
    exported back."""
    src, (x, logits) = official.path(name), official.expected(name)
    result = vitlab("convert", src, tmp_path / "converted")
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        assert (load_model(tmp_path / "converted")(x) - logits).abs().max() < official.TOLERANCE[name]
    if name == "big_transfer_bit":  # ten classes, as fashion-mnist
        result = vitlab("eval", src, "--data", "fashion-mnist")
        assert result.returncode == 0 and "top1: " in result.stdout, result.stderr
    else:
        result = vitlab("inspect", src, "--out", tmp_path / "inspect")
        assert result.returncode == 0 and (tmp_path / "inspect" / "index.html").is_file(), result.stderr
    result = vitlab("finetune", "--init", src, "--data", "fashion-mnist", "--image-size", "32", "--steps", "1",
                    "--batch-size", "8", "--num-workers", "0", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert f"init: {src}: " in result.stdout and "a new zero head for 10 classes" in result.stdout
    result = vitlab("eval", tmp_path / "run", "--data", "fashion-mnist")
    assert result.returncode == 0 and "top1: " in result.stdout, result.stderr
    result = vitlab("export", tmp_path / "run", tmp_path / "back.npz")
    assert result.returncode == 0, result.stderr
    assert load_model(tmp_path / "back.npz").cfg == load_model(tmp_path / "run").cfg
