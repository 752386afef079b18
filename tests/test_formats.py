"""Other people's checkpoint files, against the logits their own libraries computed: the fixtures of
tests/fixtures/official (vit_jax's ViT, ViT with pre-logits, gap ViT and two hybrid stems, one in the published
layout; BiT; timm; transformers), the files vitlab writes back in the layout the official readers take, and the
files vitlab refuses, each in one line. (timm's and Hugging Face's variants: tests/test_timm_hf.py.)"""

from __future__ import annotations

import numpy as np
import official
import pytest
import torch
from checkpoints import Payload, max_diff, randomise, save_state

from vitlab.common import CheckpointError
from vitlab.formats import export_npz, read_npz, state_dict_to_npz
from vitlab.model import VisionTransformer, ViTConfig
from vitlab.resnet import ResNetConfig
from vitlab.transfer import adapt
from vitlab.weights import _read_source, load_model, read_config, save_checkpoint

# --------------------------------------------------------------------------------------------------------------
# The fixtures: each file as its library wrote it, its logits as its library computed them
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(official.MANIFEST))
def test_each_fixture_gives_its_own_librarys_logits(name):
    model = load_model(official.path(name), source_grid=official.grid(name))
    x, logits = official.expected(name)
    assert not model.training
    with torch.no_grad():
        diff = max_diff(model(x), logits)
    assert logits.std() > 0.3  # random heads: a wrong mapping cannot hide behind zeros
    assert diff < official.TOLERANCE[name], diff


@pytest.mark.parametrize("name", official.VIT_JAX)
def test_official_config_is_read_from_the_arrays(name):
    m = official.MANIFEST[name]
    cfg = load_model(official.path(name), source_grid=official.grid(name)).cfg
    assert cfg.patch_size == tuple(m["patch"]) and cfg.image_size == tuple(m["image_size"])
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_dim) == (m["hidden"], m["layers"], m["heads"],
                                                                              m["mlp"])
    assert (cfg.num_classes, cfg.representation_size) == (m["classes"], m.get("representation_size"))
    assert cfg.classifier == m.get("classifier", "token")
    resnet = m.get("resnet")
    assert cfg.resnet_num_layers == (tuple(resnet["num_layers"]) if resnet else None)
    assert cfg.resnet_width_factor == (resnet["width_factor"] if resnet else 1.0)
    assert cfg.gelu == "tanh" and cfg.mean == (0.5,) * 3 and cfg.std == (0.5,) * 3  # official: tanh GELU, [-1, 1]


@pytest.mark.parametrize("name", official.HYBRIDS)
def test_hybrid_group_norm_as_either_generation_wrote_it(tmp_path, name):
    """GroupNorm scale and bias as (1, 1, 1, C) (the published files, pre-Linen Flax) or (C,) (today's Flax)."""
    arrays = official.arrays(name)
    gn = [k for k in arrays if "/" in k and k.split("/")[-2].startswith("gn")]
    shapes = {arrays[k].shape for k in gn}
    reshaped = {k: (v.reshape(v.shape[-1]) if len(v.shape) == 4 else v.reshape(1, 1, 1, -1)) if k in gn else v
                for k, v in arrays.items()}
    assert {reshaped[k].shape for k in gn} != shapes
    x, logits = official.expected(name)
    with torch.no_grad():
        assert max_diff(load_model(official.write_npz(tmp_path / "h.npz", reshaped))(x), logits) < 2e-4


def test_the_published_layout_and_todays_give_the_same_model():
    a, b = load_model(official.path("vit_jax_r_hybrid")), load_model(official.path("vit_jax_r_hybrid_published"))
    assert a.cfg == b.cfg
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


# --------------------------------------------------------------------------------------------------------------
# Written back: the published layout, array for array and shape for shape
# --------------------------------------------------------------------------------------------------------------


def test_export_writes_the_published_file_itself(tmp_path):
    """The hybrid in the published layout (which vit_jax's checkpoint.load reads back to the tree it was saved from,
    tests/fixtures/make_official.py): loaded from today's layout or from it, exported, it is that file again."""
    reference = official.arrays("vit_jax_r_hybrid_published")
    for name in ("vit_jax_r_hybrid", "vit_jax_r_hybrid_published"):
        out = read_npz(export_npz(load_model(official.path(name)), tmp_path / f"{name}.npz"))
        assert sorted(out) == sorted(reference)
        for k, v in reference.items():
            assert out[k].dtype == v.dtype and out[k].shape == v.shape and np.array_equal(out[k], v), k


@pytest.mark.parametrize("name", official.VIT_JAX)
def test_export_round_trip_in_the_published_layout(tmp_path, name):
    expected = official.published(official.arrays(name))  # the published names and GroupNorm shapes
    model = load_model(official.path(name), source_grid=official.grid(name))
    out = read_npz(export_npz(model, tmp_path / "out.npz"))
    assert sorted(out) == sorted(expected)
    for k, v in expected.items():  # the key bias too, which no logit can see
        assert out[k].dtype == v.dtype and out[k].shape == v.shape and np.array_equal(out[k], v), k
    again = load_model(tmp_path / "out.npz")  # the sidecar gives back the grid, however it is shaped
    assert again.cfg == model.cfg
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_an_official_file_without_a_head(tmp_path):
    """num_classes=0 in vit_jax writes no head arrays: the model returns its representation."""
    arrays = {k: v for k, v in official.arrays("vit_jax_vit_pre_logits").items() if not k.startswith("head/")}
    model = load_model(official.write_npz(tmp_path / "nohead.npz", arrays))
    assert model.cfg.num_classes == 0 and model.cfg.representation_size == 24
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 24)
    out = read_npz(export_npz(model, tmp_path / "out.npz"))
    assert sorted(out) == sorted(official.published(arrays))


def test_npz_through_vitlab_checkpoint_round_trip(tmp_path):
    save_checkpoint(load_model(official.path("vit_jax_vit_pre_logits")), tmp_path / "ckpt")
    exported = state_dict_to_npz(load_model(tmp_path / "ckpt"))
    expected = official.published(official.arrays("vit_jax_vit_pre_logits"))
    assert sorted(exported) == sorted(expected) and all(np.array_equal(exported[k], v) for k, v in expected.items())


def test_hybrid_round_trip_config_and_new_resolution(tmp_path):
    model = load_model(official.path("vit_jax_r1-1_hybrid"))
    assert model.cfg.resnet_width_factor == 0.5 and model.cfg.image_size == (32, 32) and model.cfg.stem_stride == 8
    save_checkpoint(model, tmp_path / "ckpt")
    assert read_config(tmp_path / "ckpt") == model.cfg
    # a new resolution: the position embeddings interpolated over the stem's grid
    bigger = adapt(model, image_size=64)
    assert bigger.pos_embed.shape == (1, 8 * 8 + 1, 32) and bigger(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_bit_published_layout_loads_and_writes_back(tmp_path):
    """BiT's TensorFlow names (resnet/block1/unit01/a/group_norm/gamma, ...): the stages, their units and the width
    read from the arrays; written back, the file itself."""
    cfg, _, kind = _read_source(official.path("big_transfer_bit"), None, None)
    assert kind == "bit" and isinstance(cfg, ResNetConfig)
    assert (cfg.num_layers, cfg.width_factor, cfg.num_classes, cfg.in_chans) == ((2,), 0.5, 10, 3)
    reference = official.arrays("big_transfer_bit")
    out = read_npz(export_npz(load_model(official.path("big_transfer_bit")), tmp_path / "bit.npz"))
    assert sorted(out) == sorted(reference)
    for k, v in reference.items():
        assert out[k].shape == v.shape and np.array_equal(out[k], v), k


def test_bit_names_a_known_depth():
    cfg = ResNetConfig(num_layers=(3, 4, 6, 3), width_factor=1, num_classes=5)
    from vitlab.formats import bit_npz_config, npz_names

    shapes = {"resnet/root_block/standardized_conv2d/kernel": (7, 7, 3, 64), "resnet/head/conv2d/kernel": (1, 1, 8, 5)}
    arrays = {key: np.zeros(shapes.get(key, (1,)), np.float32) for _, keys, _ in npz_names(cfg) for key in keys}
    assert "resnet/block3/unit06/c/standardized_conv2d/kernel" in arrays  # two digits, from 01
    assert bit_npz_config(arrays).name == "BiT-R50x1"


# --------------------------------------------------------------------------------------------------------------
# Broken and unknown files: one line, naming the file and what is wrong
# --------------------------------------------------------------------------------------------------------------


def test_empty_truncated_unrelated_npz(tmp_path):
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.npz: the file is empty"):
        load_model(empty)
    good = official.path("vit_jax_vit")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.npz: not a readable \.npz file"):
        load_model(truncated)
    text = tmp_path / "notes.npz"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match=r"notes\.npz: not an \.npz archive"):
        load_model(text)
    with pytest.raises(CheckpointError, match=r"nothere\.npz: no such file"):
        load_model(tmp_path / "nothere.npz")


def test_pickled_npz_is_refused_not_unpickled(tmp_path):
    sentinel = tmp_path / "sentinel"
    arrays = official.arrays("vit_jax_vit")
    arrays["embedding/kernel"] = np.array([Payload(sentinel)], dtype=object)
    np.savez(tmp_path / "weights.npz", **arrays)
    with pytest.raises(CheckpointError, match=r"array 'embedding/kernel' holds pickled Python objects"):
        load_model(tmp_path / "weights.npz")
    assert not sentinel.exists()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickled_weights_are_refused_by_extension_and_by_content(tmp_path, name):
    sentinel = tmp_path / "sentinel"
    torch.save({"patch_embed.proj.weight": Payload(sentinel)}, tmp_path / name)  # a real pickle, as torch writes it
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_model(tmp_path / name)  # the file itself
    with pytest.raises(CheckpointError, match="only pickled weights"):
        load_model(tmp_path)  # a directory that holds only it
    # the same bytes under a safetensors name reach the safetensors reader, which parses them without unpickling
    (tmp_path / "model.safetensors").write_bytes((tmp_path / name).read_bytes())
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(tmp_path / "model.safetensors")
    # and under another name, read for what its bytes are (a zip archive): its names, never its pickle
    (tmp_path / "weights").write_bytes((tmp_path / name).read_bytes())
    with pytest.raises(CheckpointError, match=r"a layout vitlab does not know: its first arrays are \[\w+/\.data/"):
        load_model(tmp_path / "weights")
    assert not sentinel.exists()


def test_an_unknown_layout_names_what_it_holds_and_what_is_known(tmp_path):
    np.savez(tmp_path / "other.npz", weights=np.zeros(3), bias=np.zeros(1))
    with pytest.raises(CheckpointError) as refused:
        load_model(tmp_path / "other.npz")
    message = str(refused.value)
    assert "other.npz: an .npz of a layout vitlab does not know: its first arrays are [bias, weights]" in message
    assert "embedding/kernel" in message and "resnet/root_block/standardized_conv2d/kernel" in message
    save_state(torch.nn.Linear(2, 2), tmp_path / "linear.safetensors")
    with pytest.raises(CheckpointError, match=r"neither timm nor Hugging Face ViT names: its first tensors are "
                                              r"\[bias, weight\]; known safetensors layouts: .*patch_embed"):
        load_model(tmp_path / "linear.safetensors")
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(CheckpointError, match=r"notes\.txt: not a checkpoint layout vitlab knows .*hf-hub:ORG/NAME"):
        load_model(tmp_path / "notes.txt")


def test_npz_with_inconsistent_arrays(tmp_path):
    arrays = official.arrays("vit_jax_vit")
    arrays["Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel"] = np.zeros((32, 50), np.float32)
    with pytest.raises(CheckpointError, match=r"bad\.npz: blocks\.1\.mlp\.fc1\.weight has shape \(50, 32\)"):
        load_model(official.write_npz(tmp_path / "bad.npz", arrays))
    del arrays["Transformer/encoderblock_1/LayerNorm_1/scale"]  # named as the file names it
    with pytest.raises(CheckpointError, match=r"incomplete\.npz: missing array 'Transformer/encoderblock_1/"
                                              r"LayerNorm_1/scale'"):
        load_model(official.write_npz(tmp_path / "incomplete.npz", arrays))


def test_non_square_npz_needs_its_grid():
    path = official.path("vit_jax_vit_gap")
    with pytest.raises(CheckpointError, match=r"vit_jax_vit_gap\.npz: 15 position embeddings do not form a square "
                                              "grid"):
        load_model(path)
    assert load_model(path, source_grid=(3, 5)).cfg.image_size == (12, 20)


def test_stems_with_missing_units_are_refused(tmp_path):
    arrays = {k: v for k, v in official.arrays("vit_jax_r1-1_hybrid").items() if not k.startswith("block1/unit1/")}
    with pytest.raises(CheckpointError, match="not numbered"):
        load_model(official.write_npz(tmp_path / "h.npz", arrays))
    arrays = {k: v for k, v in official.arrays("big_transfer_bit").items() if "/unit01/" not in k}
    with pytest.raises(CheckpointError, match="not numbered"):
        load_model(official.write_npz(tmp_path / "bit.npz", arrays))


def test_a_sincos_model_exports_its_fixed_embeddings_so_the_npz_computes_the_same_logits(tmp_path):
    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, num_classes=5,
                    posemb="sincos2d", classifier="gap")
    model = randomise(VisionTransformer(cfg), seed=4).eval()
    export_npz(model, tmp_path / "sincos.npz")
    arrays = read_npz(tmp_path / "sincos.npz")
    assert np.array_equal(arrays["Transformer/posembed_input/pos_embedding"], model.pos_embed.numpy())
    loaded = load_model(tmp_path / "sincos.npz")  # the official layout: learned embeddings holding these values
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
