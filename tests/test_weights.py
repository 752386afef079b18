"""Weights: official .npz files against timm's loader, the round trip, position-embedding resizing, checkpoints."""

import json
import math

import numpy as np
import pytest
import torch

from official import official_arrays, write_npz
from vitlab.model import ConfigError, ViTConfig, VisionTransformer
from vitlab.weights import (
    CheckpointError,
    adapt,
    export_npz,
    load_model,
    read_npz,
    resize_pos_embed,
    save_checkpoint,
    state_dict_to_npz,
)

timm = pytest.importorskip("timm")
scipy_ndimage = pytest.importorskip("scipy.ndimage")


def timm_from_npz(path, *, grid, patch, hidden, layers, heads, mlp, num_classes, classifier="token", in_chans=3):
    """timm's own VisionTransformer loaded with timm's own npz loader: the oracle."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    from timm.models.vision_transformer import _load_weights

    gap = classifier == "gap"
    model = TimmViT(
        img_size=(grid[0] * patch[0], grid[1] * patch[1]), patch_size=patch, in_chans=in_chans, num_classes=num_classes,
        embed_dim=hidden, depth=layers, num_heads=heads, mlp_ratio=mlp / hidden,
        class_token=not gap, global_pool="avg" if gap else "token", fc_norm=False,
    )
    _load_weights(model, str(path))
    return model.eval()


CASES = [  # (image grid, patch): square and non-square, at two resolutions
    ((4, 4), (4, 4)),
    ((6, 6), (4, 4)),
    ((3, 5), (4, 4)),
    ((4, 6), (2, 3)),
]


@pytest.mark.parametrize("grid,patch", CASES)
@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_npz_logits_equal_timm(tmp_path, grid, patch, classifier):
    arrays = official_arrays(grid=grid, patch=patch, classifier=classifier, seed=1)
    path = write_npz(tmp_path / "vit.npz", arrays)
    reference = timm_from_npz(path, grid=grid, patch=patch, hidden=32, layers=2, heads=4, mlp=64, num_classes=7,
                              classifier=classifier)
    ours = load_model(path, gelu="exact", source_grid=grid)
    assert not ours.training and ours.cfg.classifier == classifier
    x = torch.randn(4, 3, grid[0] * patch[0], grid[1] * patch[1])
    with torch.no_grad():
        diff = (ours(x) - reference(x)).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_npz_with_representation_size_equals_timm_plus_pre_logits(tmp_path, grid):
    """timm dropped the pre-logits layer, so the oracle is timm's [class] features through tanh(Dense) and the
    head, applied here in numpy from the file's own arrays."""
    arrays = official_arrays(grid=grid, representation_size=24, seed=2)
    path = write_npz(tmp_path / "vit.npz", arrays)
    reference = timm_from_npz(path, grid=grid, patch=(4, 4), hidden=32, layers=2, heads=4, mlp=64, num_classes=0)
    ours = load_model(path, gelu="exact", source_grid=grid)
    assert ours.cfg.representation_size == 24
    x = torch.randn(3, 3, grid[0] * 4, grid[1] * 4)
    with torch.no_grad():
        features = reference.forward_head(reference.forward_features(x), pre_logits=True).double().numpy()
        pre = np.tanh(features @ arrays["pre_logits/kernel"] + arrays["pre_logits/bias"])
        expected = pre @ arrays["head/kernel"] + arrays["head/bias"]
        diff = np.abs(ours(x).double().numpy() - expected).max()
    assert diff < 1e-4, diff


def test_npz_config_read_from_shapes(tmp_path):
    path = write_npz(tmp_path / "vit.npz", official_arrays(in_chans=1, patch=(2, 2), hidden=48, layers=3, heads=6,
                                                           mlp=96, grid=(5, 5), num_classes=4, representation_size=16))
    cfg = load_model(path).cfg
    assert (cfg.in_chans, cfg.patch_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_dim) == (
        1, (2, 2), 48, 3, 6, 96)
    assert (cfg.image_size, cfg.num_classes, cfg.representation_size, cfg.classifier) == ((10, 10), 4, 16, "token")
    assert cfg.gelu == "tanh" and cfg.mean == (0.5,) and cfg.std == (0.5,)  # official: tanh GELU, inputs in [-1, 1]


@pytest.mark.parametrize("kw", [dict(), dict(representation_size=12), dict(classifier="gap"), dict(num_classes=0)])
def test_npz_round_trip_bit_for_bit(tmp_path, kw):
    arrays = official_arrays(seed=3, **kw)
    path = write_npz(tmp_path / "in.npz", arrays)
    out = export_npz(load_model(path), tmp_path / "out.npz")
    again = read_npz(out)
    assert sorted(again) == sorted(arrays)
    for k, v in arrays.items():  # the key bias too, which no logit can see
        assert again[k].dtype == v.dtype and again[k].shape == v.shape, k
        assert np.array_equal(again[k], v), k


def test_npz_through_vitlab_checkpoint_round_trip(tmp_path):
    arrays = official_arrays(seed=4, representation_size=8)
    src = write_npz(tmp_path / "in.npz", arrays)
    save_checkpoint(load_model(src), tmp_path / "ckpt")
    exported = state_dict_to_npz(load_model(tmp_path / "ckpt"))
    assert all(np.array_equal(exported[k], v) for k, v in arrays.items())


# ---------------------------------------------------------------------------------------------------------------
# Resolution change
# ---------------------------------------------------------------------------------------------------------------


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
    zoomed = scipy_ndimage.zoom(grid, (new[0] / old[0], new[1] / old[1], 1), order=1)
    assert zoomed.shape[:2] == new
    assert np.allclose(out[0, 1:].reshape(*new, 6).numpy(), zoomed, atol=1e-5)
    assert torch.equal(out[:, :1], pe[:, :1])


def test_resize_without_class_token_and_bicubic():
    pe = torch.randn(1, 16, 4)
    out = resize_pos_embed(pe, (4, 4), (6, 2), num_prefix_tokens=0, mode="bicubic")
    assert out.shape == (1, 12, 4)
    with pytest.raises(ConfigError, match="interpolation"):
        resize_pos_embed(pe, (4, 4), (6, 6), 0, mode="nearest")


def test_load_at_another_resolution(tmp_path):
    arrays = official_arrays(grid=(4, 4), seed=5)
    path = write_npz(tmp_path / "vit.npz", arrays)
    model = load_model(path, image_size=(24, 32))
    assert model.cfg.image_size == (24, 32) and model.pos_embed.shape == (1, 1 + 6 * 8, 32)
    pe = torch.from_numpy(arrays["Transformer/posembed_input/pos_embedding"])
    assert torch.equal(model.pos_embed[:, :1], pe[:, :1])
    assert torch.allclose(model.pos_embed, resize_pos_embed(pe, (4, 4), (6, 8)))
    assert model(torch.zeros(1, 3, 24, 32)).shape == (1, 7)
    same = load_model(path, image_size=16)
    assert torch.equal(same.pos_embed, pe)


def test_new_head_is_zero_and_rest_kept(tmp_path):
    path = write_npz(tmp_path / "vit.npz", official_arrays(seed=6))
    model = load_model(path, num_classes=3)
    assert model.head.weight.shape == (3, 32) and torch.count_nonzero(model.head.weight) == 0
    base = load_model(path)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, base.blocks[1].mlp.fc2.weight)


def test_adapt_refuses_architecture_change():
    model = VisionTransformer(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_layers=1, num_heads=4, mlp_dim=8))
    with pytest.raises(ConfigError, match=r"num_heads cannot change on loaded weights \(4 -> 8\)"):
        adapt(model, num_heads=8)


# ---------------------------------------------------------------------------------------------------------------
# vitlab checkpoints
# ---------------------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    cfg = ViTConfig(image_size=(16, 24), patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
                    num_classes=3, class_names=("a", "b", "c"), in_chans=1, mean=(0.3,), std=(0.4,))
    model = VisionTransformer(cfg)
    for p in model.parameters():
        p.data.normal_()
    save_checkpoint(torch.compile(model), tmp_path / "ck")  # the compiled wrapper's prefix is not saved
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["class_names"] == ["a", "b", "c"]
    again = load_model(tmp_path / "ck")
    assert again.cfg == cfg and not again.training
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


# ---------------------------------------------------------------------------------------------------------------
# Bad files: one clear error naming the file, nothing unpickled
# ---------------------------------------------------------------------------------------------------------------


def test_empty_truncated_unrelated_npz(tmp_path):
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.npz: the file is empty"):
        load_model(empty)
    good = write_npz(tmp_path / "good.npz", official_arrays())
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.npz: not a readable \.npz file"):
        load_model(truncated)
    text = tmp_path / "notes.npz"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match=r"notes\.npz: not an \.npz archive"):
        load_model(text)
    missing = tmp_path / "nothere.npz"
    with pytest.raises(CheckpointError, match=r"nothere\.npz: no such file"):
        load_model(missing)


def test_pickled_npz_is_refused_not_unpickled(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, **{"embedding/kernel": np.array([{"evil": 1}], dtype=object)})
    with pytest.raises(CheckpointError, match=r"pickled\.npz"):
        load_model(path)


def test_unrelated_npz(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, weights=np.zeros(3))
    with pytest.raises(CheckpointError, match=r"other\.npz: missing array 'embedding/kernel'"):
        load_model(path)


def test_npz_with_inconsistent_arrays(tmp_path):
    arrays = official_arrays()
    arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"] = np.zeros((32, 50), np.float32)
    path = write_npz(tmp_path / "bad.npz", arrays)
    with pytest.raises(CheckpointError, match=r"bad\.npz: blocks\.1\.mlp\.fc1\.weight has shape \(50, 32\)"):
        load_model(path)
    del arrays["Transformer/encoderblock_1/LayerNorm_2/scale"]
    path = write_npz(tmp_path / "incomplete.npz", arrays)
    with pytest.raises(CheckpointError, match=r"incomplete\.npz: missing array 'Transformer/encoderblock_1/LayerNorm_2/scale'"):
        load_model(path)


def test_non_square_npz_needs_its_grid(tmp_path):
    path = write_npz(tmp_path / "wide.npz", official_arrays(grid=(3, 5)))
    with pytest.raises(CheckpointError, match=r"wide\.npz: 15 position embeddings do not form a square grid"):
        load_model(path)
    assert load_model(path, source_grid=(3, 5)).cfg.image_size == (12, 20)


def test_bad_vitlab_checkpoints(tmp_path):
    model = VisionTransformer(ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_layers=1, num_heads=2, mlp_dim=8))
    ck = save_checkpoint(model, tmp_path / "ck")
    weights = ck / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(ck)
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: the file is empty"):
        load_model(ck)
    save_checkpoint(model, ck)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps(dict(cfg, num_layers=2)))
    with pytest.raises(CheckpointError, match=r"ck: weights do not fit the model: missing \['blocks\.1\."):
        load_model(ck)
    (ck / "config.json").write_text(json.dumps(dict(cfg, mlp_dim=16)))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mlp\.fc1\.weight has shape \(8, 8\) in the file, the model wants \(16, 8\)"):
        load_model(ck)
    (ck / "config.json").write_text(json.dumps(dict(cfg, patch_size=3)))
    with pytest.raises(CheckpointError, match=r"config\.json: patch_size \(3, 3\) does not divide image_size \(8, 8\)"):
        load_model(ck)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_model(ck)
    with pytest.raises(CheckpointError, match=r"not a vitlab checkpoint \(no config\.json\)"):
        load_model(tmp_path)
