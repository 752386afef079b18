"""Masked patch prediction (appendix B.1.2): the corruption's statistics, the 3-bit colour targets, a run that
predicts colours from context far above the majority colour, and its checkpoint fine-tuned like any other."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datasets import write_idx
from tiny import TINY, fashion_dir, flags, world  # noqa: F401 (fixtures)

from vitlab import cli, data
from vitlab.common import ConfigError
from vitlab.config import TrainConfig
from vitlab.model import create_model
from vitlab.mpp import draw_corruption, mean_colour_targets
from vitlab.train import train
from vitlab.weights import load_model

MPP = dict(TINY, objective="mpp", image_size=16, epochs=3, val_split=0.25)


def draws(batch=200, patches=64, times=20):
    g = torch.Generator().manual_seed(0)
    return [draw_corruption(batch, patches, g) for _ in range(times)]


def test_half_of_each_images_patches_are_chosen_uniformly():
    cs = draws()
    for c in cs:
        assert (c.chosen.sum(dim=1) == 32).all()  # 50% of the 64 patches of every image
        assert c.count == 200 * 32
    position_rate = torch.stack([c.chosen.float().mean(dim=0) for c in cs]).mean(dim=0)  # (64,)
    assert position_rate.sub(0.5).abs().max() < 0.03  # every position equally likely (4000 draws each)


def test_chosen_patches_split_80_10_10():
    cs = draws()
    chosen = sum(int(c.chosen.sum()) for c in cs)  # 128,000
    masked = sum(int(c.masked.sum()) for c in cs) / chosen
    swapped = sum(int(c.swapped.sum()) for c in cs) / chosen
    kept = sum(int((c.chosen & ~c.masked & ~c.swapped).sum()) for c in cs) / chosen
    # the standard error of each fraction is < 0.0012 here: these bounds are over 4 of them
    assert masked == pytest.approx(0.8, abs=0.005)
    assert swapped == pytest.approx(0.1, abs=0.005)
    assert kept == pytest.approx(0.1, abs=0.005)
    for c in cs:
        assert not (c.masked & ~c.chosen).any() and not (c.swapped & ~c.chosen).any()
        assert not (c.masked & c.swapped).any()
        own = torch.arange(200 * 64).view(200, 64)
        assert (c.source != own).all() and c.source.min() >= 0 and c.source.max() < 200 * 64


def test_the_corruption_replaces_what_it_says():
    g = torch.Generator().manual_seed(1)
    c = draw_corruption(4, 16, g)
    x = torch.randn(4, 16, 8)
    token = torch.randn(1, 1, 8)
    y = c.apply(x, token)
    flat = x.reshape(-1, 8)
    for b in range(4):
        for n in range(16):
            if c.masked[b, n]:
                assert torch.equal(y[b, n], token[0, 0])
            elif c.swapped[b, n]:
                assert torch.equal(y[b, n], flat[c.source[b, n]])
            else:  # not chosen, or chosen and left unchanged
                assert torch.equal(y[b, n], x[b, n])
    parts = c.split(2)
    assert [p.chosen.shape for p in parts] == [(2, 16), (2, 16)]
    assert sum(p.count for p in parts) == c.count
    assert all(p.source.max() < 2 * 16 for p in parts)


def test_three_bit_mean_colour_targets_by_hand():
    # one 4x4 RGB image in a 2x2 grid of 2x2-pixel patches: three of one colour each, the last mixed
    image = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    image[0, :, :2, :2] = torch.tensor([255, 128, 25]).view(3, 1, 1)  # levels 7, 4 (128/255*8 = 4.02), 0
    image[0, :, :2, 2:] = torch.tensor([0, 0, 0]).view(3, 1, 1)  # black: class 0
    image[0, :, 2:, :2] = torch.tensor([32, 64, 224]).view(3, 1, 1)  # 1.004 -> 1, 2.008 -> 2, 7.03 -> 7
    image[0, :, 2:, 2:] = torch.tensor([[0, 255], [255, 255]], dtype=torch.uint8)  # mean 191.25 -> 6.0 -> 6
    targets = mean_colour_targets(image, (2, 2))
    assert targets.tolist() == [[7 * 64 + 4 * 8 + 0, 0, 1 * 64 + 2 * 8 + 7, 6 * 64 + 6 * 8 + 6]]
    assert mean_colour_targets(torch.full((2, 1, 4, 4), 255, dtype=torch.uint8), (1, 1)).tolist() == [[7], [7]]
    assert mean_colour_targets(torch.zeros(1, 3, 8, 8), (2, 2)).shape == (1, 4)  # floats in [0, 1] too


def test_the_model_predicts_a_colour_per_patch():
    model = create_model("vit-ti/4", image_size=16, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=32,
                         num_classes=0, mpp_classes=512)
    c = draw_corruption(2, 16, torch.Generator().manual_seed(0))
    assert model(torch.randn(2, 3, 16, 16), corruption=c).shape == (2, 16, 512)
    plain = create_model("vit-ti/4", image_size=16, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=32)
    with pytest.raises(ConfigError, match="no masked-patch-prediction head"):
        plain(torch.randn(2, 3, 16, 16), corruption=c)


@pytest.mark.slow
def test_an_mpp_run_records_its_colour_metrics_and_fine_tunes_like_any_other(tmp_path, capsys):
    """(That it learns, above the majority colour, is test_an_mpp_run_predicts_from_context_...)"""
    out = tmp_path / "mpp"
    assert cli.main(["train", *flags(MPP), "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("val accuracy (masked patch prediction")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert len(losses) == 36  # 384 training images / 32, 3 epochs
    assert losses[0] == pytest.approx(torch.log(torch.tensor(8.0)).item(), abs=0.05)  # grey: 8 colours, uniform
    val = [r for r in rows if r["split"] == "val"]
    assert len(val) == 3 and val[-1]["n"] == 128 * 8  # 8 of 16 patches each
    model = load_model(out)
    assert model.cfg.mpp_classes == 8 and model.cfg.num_classes == 0 and model.mask_token.shape == (1, 1, 32)

    # it has no class head: evaluating it as a classifier is refused in one line
    assert cli.main(["eval", str(out), "--data", "fashion-mnist"]) == 2
    assert "no classification head" in capsys.readouterr().err

    tuned = tmp_path / "tuned"
    assert cli.main(["finetune", "--init", str(out), "--data", "fashion-mnist", "--steps", "64", "--batch-size", "32",
                     "--accum-steps", "1", "--num-workers", "0", "--crop", "none", "--no-flip", "--optimizer", "adamw",
                     "--lr", "3e-3", "--out", str(tuned)]) == 0
    printed = capsys.readouterr().out
    assert "the masked-patch-prediction head dropped" in printed
    model = load_model(tuned)
    assert model.cfg.mpp_classes == 0 and model.cfg.num_classes == 10 and not hasattr(model, "mask_token")
    assert float(printed.strip().splitlines()[-1].split(": ")[1]) > 0.25  # the tiny set; chance is 0.1


@pytest.mark.parametrize("fields,message", [
    (dict(init="x"), "objective mpp pre-trains a model from scratch"),
    (dict(mixup=0.2), "mixup do not apply to objective mpp"),
    (dict(tta="flip"), "tta do not apply to objective mpp"),
    (dict(model="bit-r26x1", hidden_size=None, num_layers=None, num_heads=None, mlp_dim=None, image_size=32),
     "objective mpp does not apply to the BiT ResNet"),
])
def test_mpp_config_errors(fields, message):
    values = dict(MPP, **fields)
    if "init" in fields:
        for k in ("model", "hidden_size", "num_layers", "num_heads", "mlp_dim"):
            values.pop(k)
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{k: v for k, v in values.items() if v is not None})


def write_flat_grey(root, n: int, seed: int) -> None:
    """Fashion-MNIST-shaped idx files of flat grey images, each one of the 8 three-bit levels: every patch of an image
    has the image's colour, and the colours are equally likely, so a patch's colour can only be told from the others."""
    rng = np.random.default_rng(seed)
    for part, count in (("train", n), ("t10k", n // 4)):
        levels = rng.integers(0, 8, count)
        images = np.repeat((32 * levels + 16).astype(np.uint8)[:, None, None], 28, 1).repeat(28, 2)
        write_idx(root / f"{part}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{part}-labels-idx1-ubyte.gz", rng.integers(0, 10, count))


@pytest.mark.slow
def test_an_mpp_run_predicts_from_context_not_from_the_majority_colour(tmp_path, monkeypatch):
    root = tmp_path / "flat"
    root.mkdir()
    write_flat_grey(root, 768, seed=3)
    monkeypatch.setenv("VITLAB_FASHION_MNIST_DIR", str(root))
    cfg = TrainConfig(**dict(MPP, epochs=None, steps=150, val_split=None, out=str(tmp_path / "run")))
    result = train(cfg)
    # the baselines of the evaluated patches: the same images, the evaluator's own corruption (seed 0)
    splits = data.build("fashion-mnist", image_size=16, in_chans=1, train_transform=None)
    generator, targets = torch.Generator().manual_seed(0), []
    for images, _ in data.make_loader(splits.eval, 32, shuffle=False, seed=0, epoch=0, even=False):
        chosen = draw_corruption(len(images), 16, generator).chosen
        targets.append(mean_colour_targets(images, (4, 4))[chosen])
    counts = torch.bincount(torch.cat(targets), minlength=8).double()
    assert counts.sum() == result["n"] == 192 * 8
    shares = counts / counts.sum()
    majority = shares.max().item()
    entropy = -(shares[shares > 0] * shares[shares > 0].log()).sum().item()  # the loss of predicting the marginal
    assert majority < 0.2 and entropy > 2.0  # no colour dominates: the marginal alone is worth little
    assert result["top1"] > majority + 0.5 and result["loss"] < 0.5 * entropy
