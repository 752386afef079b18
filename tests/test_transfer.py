"""Transfer (section 3.2): position-embedding resizing against the official scipy zoom, new heads, loading at another
resolution, and fine-tuning from pretrained weights end to end."""

from __future__ import annotations

import json

import numpy as np
import official
import pytest
import scipy.ndimage
import timm
import torch
import transformers
from checkpoints import hf_config, randomise, tiny_source
from tiny import fashion_dir, world  # noqa: F401 (fixtures)

from vitlab import cli
from vitlab.common import ConfigError
from vitlab.model import VisionTransformer, ViTConfig, posemb_sincos_2d, resize_pos_embed
from vitlab.transfer import adapt
from vitlab.weights import load_model


def test_new_zero_head_drops_the_pre_logits_and_keeps_the_rest():
    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64, num_classes=7,
                    representation_size=24)
    source = randomise(VisionTransformer(cfg), seed=7)
    tuned = adapt(source, new_head=True, num_classes=3, representation_size=None, image_size=24)
    assert tuned.cfg.representation_size is None and isinstance(tuned.pre_logits, torch.nn.Identity)
    assert tuned.head.weight.shape == (3, 32) and not tuned.head.weight.any() and not tuned.head.bias.any()
    assert torch.equal(tuned.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert torch.equal(tuned.pos_embed, resize_pos_embed(source.pos_embed, (4, 4), (6, 6)))
    kept = adapt(source, new_head=True)  # same classes, pre-logits kept: still a fresh head
    assert torch.equal(kept.pre_logits.fc.weight, source.pre_logits.fc.weight) and not kept.head.weight.any()
    with pytest.raises(ConfigError, match="representation_size can only be dropped"):
        adapt(source, representation_size=12)


def test_vitlab_finetune_end_to_end_at_a_higher_resolution(tmp_path, capsys):
    """A Hugging Face 3-channel 16 px checkpoint fine-tuned on grey 28 px images at 24 px."""
    reference = randomise(transformers.ViTModel(hf_config(image_size=16), add_pooling_layer=True), seed=9, scale=0.1)
    reference.save_pretrained(tmp_path / "hf")
    out = tmp_path / "run"
    argv = ["finetune", "--init", str(tmp_path / "hf"), "--data", "fashion-mnist", "--image-size", "24",
            "--batch-size", "64", "--accum-steps", "2", "--steps", "4", "--num-workers", "0", "--out", str(out)]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    init = next(line for line in lines if line.startswith("init: "))
    assert "4x4 -> 6x6 patches (interpolated in 2-D)" in init and "new zero head for 10 classes" in init
    assert "pre-logits layer dropped" in init and "exact GELU" in init
    assert lines[-1].startswith("test accuracy: ")

    tuned = load_model(out)
    assert tuned.cfg.image_size == (24, 24) and tuned.pos_embed.shape == (1, 37, 32)
    assert tuned.cfg.in_chans == 3 and tuned.cfg.representation_size is None and tuned.cfg.num_classes == 10
    assert tuned.cfg.layer_norm_eps == 1e-12  # the source's
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["init"] == str(tmp_path / "hf") and saved["optimizer"] == "sgd" and saved["accum_steps"] == 2
    assert saved["image_size"] == [24, 24] and saved["in_chans"] == 3 and saved["mean"] == [0.5, 0.5, 0.5]
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]

    # resumed for two more steps, from its own checkpoint
    assert cli.main(["train", "--resume", str(out), "--steps", "6"]) == 0
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 6


def test_a_zero_head_is_reported_and_not_evaluated(tmp_path, capsys):
    source = tiny_source(tmp_path, zero_head=True)
    assert cli.main(["eval", str(source), "--data", "fashion-mnist"]) == 2
    err = capsys.readouterr().err
    assert "the head is all zero" in err and len(err.strip().splitlines()) == 1
    argv = ["finetune", "--init", str(source), "--data", "fashion-mnist", "--batch-size", "32", "--accum-steps", "1",
            "--steps", "1", "--num-workers", "0", "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 0
    assert "is all zero (as in the official ImageNet-21k checkpoints)" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------
# ImageNet-ReaL
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# Downstream data specs
# --------------------------------------------------------------------------------------------------------------


def test_resize_same_size_is_identity():
    pe = torch.randn(1, 1 + 12, 8)
    assert torch.equal(resize_pos_embed(pe, (3, 4), (3, 4)), pe)
    assert torch.equal(resize_pos_embed(pe, (3, 4), (3, 4), mode="bicubic"), pe)


def test_resize_hand_checked_2x2_to_3x3():
    """Corners stay, edge midpoints average two corners, the centre averages all four (official: zoom order 1)."""
    grid = torch.tensor([[0.0, 2.0], [4.0, 10.0]])  # one channel
    pe = torch.cat([torch.tensor([[[7.0]]]), grid.reshape(1, 4, 1)], dim=1)
    out = resize_pos_embed(pe, (2, 2), (3, 3))
    assert out[0, 0, 0] == 7.0  # the [class] token is kept apart
    expected = torch.tensor([[0.0, 1.0, 2.0], [2.0, 4.0, 6.0], [4.0, 7.0, 10.0]])
    assert torch.allclose(out[0, 1:, 0].reshape(3, 3), expected)


@pytest.mark.parametrize("old,new", [((7, 7), (12, 12)), ((4, 6), (6, 9)), ((3, 5), (5, 4)), ((8, 8), (4, 4))])
def test_resize_equals_official_scipy_zoom(old, new):
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + old[0] * old[1], 6)
    out = resize_pos_embed(pe, old, new)
    grid = pe[0, 1:].reshape(*old, 6).numpy()
    zoomed = scipy.ndimage.zoom(grid, (new[0] / old[0], new[1] / old[1], 1), order=1)
    assert zoomed.shape[:2] == new
    assert np.allclose(out[0, 1:].reshape(*new, 6).numpy(), zoomed, atol=1e-5)
    assert torch.equal(out[:, :1], pe[:, :1])


@pytest.mark.parametrize("old,new,prefix", [((4, 4), (6, 6), 1), ((7, 7), (3, 5), 1), ((4, 6), (6, 9), 0)])
def test_bicubic_resize_equals_timms(old, new, prefix):
    pe = torch.randn(1, prefix + old[0] * old[1], 8)
    ours = resize_pos_embed(pe, old, new, num_prefix_tokens=prefix, mode="bicubic")
    theirs = timm.layers.resample_abs_pos_embed(pe, list(new), list(old), num_prefix_tokens=prefix)
    assert ours.shape == (1, prefix + new[0] * new[1], 8)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="interpolation"):
        resize_pos_embed(pe, old, new, prefix, mode="nearest")


def test_sincos_embeddings_are_computed_for_the_new_grid_not_interpolated():
    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64, num_classes=3,
                    posemb="sincos2d")
    model = randomise(VisionTransformer(cfg), seed=3)
    bigger = adapt(model, image_size=(24, 32))
    torch.testing.assert_close(bigger.pos_embed, posemb_sincos_2d((6, 8), 32, 1), rtol=0, atol=0)
    assert torch.equal(bigger.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_load_at_another_resolution(tmp_path):
    path = official.path("vit_jax_vit")  # 16 px, 4x4 patches of 4
    model = load_model(path, image_size=(24, 32))
    assert model.cfg.image_size == (24, 32) and model.pos_embed.shape == (1, 1 + 6 * 8, 32)
    pe = torch.from_numpy(official.arrays("vit_jax_vit")["Transformer/posembed_input/pos_embedding"])
    assert torch.equal(model.pos_embed[:, :1], pe[:, :1])
    assert torch.allclose(model.pos_embed, resize_pos_embed(pe, (4, 4), (6, 8)))
    assert model(torch.zeros(1, 3, 24, 32)).shape == (1, 7)
    same = load_model(path, image_size=16)
    assert torch.equal(same.pos_embed, pe)


def test_new_head_is_zero_and_rest_kept(tmp_path):
    path = official.path("vit_jax_vit")
    model = load_model(path, num_classes=3)
    assert model.head.weight.shape == (3, 32) and torch.count_nonzero(model.head.weight) == 0
    base = load_model(path)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, base.blocks[1].mlp.fc2.weight)


def test_adapt_refuses_architecture_change():
    model = VisionTransformer(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_layers=1, num_heads=4, mlp_dim=8))
    with pytest.raises(ConfigError, match=r"num_heads cannot change on loaded weights \(4 -> 8\)"):
        adapt(model, num_heads=8)


@pytest.mark.parametrize("keep", [True, False], ids=["keep-pre-logits", "drop-pre-logits"])
def test_keep_pre_logits_keeps_the_sources_pre_logits_layer(tmp_path, capsys, keep):
    source = tiny_source(tmp_path, representation_size=24)
    out = tmp_path / "run"
    argv = ["finetune", "--init", str(source), "--data", "fashion-mnist", "--batch-size", "32", "--accum-steps", "1",
            "--steps", "1", "--lr", "1e-9", "--num-workers", "0", "--out", str(out)] + (["--keep-pre-logits"] * keep)
    assert cli.main(argv) == 0
    init = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("init: "))
    assert ("pre-logits layer dropped" in init) != keep
    tuned, original = load_model(out), load_model(source)
    assert tuned.cfg.representation_size == (24 if keep else None) and tuned.head.in_features == (24 if keep else 32)
    if keep:  # the source's layer, barely moved by one step at lr 1e-9; the head is new
        torch.testing.assert_close(tuned.pre_logits.fc.weight, original.pre_logits.fc.weight, rtol=0, atol=1e-6)
    else:
        assert not hasattr(tuned.pre_logits, "fc")
    assert tuned.head.weight.abs().max() < 1e-6  # a new zero head (one step at lr 1e-9)


@pytest.mark.parametrize("posemb", ["learned", "sincos2d"])
def test_smaller_images_meet_the_position_embeddings_adapt_gives_their_grid(posemb):
    """Progressive resizing trains on images below image_size: the model takes them with its position embeddings
    resampled to their grid (antialiased bicubic), computing what the model adapted to their size computes."""
    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64, num_classes=3,
                    posemb=posemb)
    model = randomise(VisionTransformer(cfg), seed=5)
    x = torch.randn(2, 3, 8, 12)
    torch.testing.assert_close(model(x), adapt(model, image_size=(8, 12), pos_embed_interp="bicubic")(x))
    if posemb == "learned":
        model(x).square().sum().backward()
        assert model.pos_embed.grad[:, 1:].abs().amin() > 0  # every position of the 4x4 grid learns from the 2x3
