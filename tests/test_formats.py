"""Other people's checkpoint files: official npz (ViT and hybrid) against timm's loader and back, timm and Hugging
Face safetensors against their own libraries, and the files vitlab refuses, each in one line."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import transformers
from checkpoints import Payload, hf_config, max_diff, randomise, save_state
from official import hybrid_arrays, official_arrays, write_npz
from safetensors.torch import load_file

from vitlab.common import CheckpointError
from vitlab.formats import export_npz, read_npz, state_dict_to_npz
from vitlab.model import VisionTransformer, ViTConfig
from vitlab.resnet import StdConv2d
from vitlab.transfer import adapt
from vitlab.weights import load_model, read_config, save_checkpoint


def test_timm_token_vit_without_config_equals_timm(tmp_path):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    # width 128 with 2 heads: 64 per head, the rule that stands in for a missing config.json
    reference = randomise(TimmViT(img_size=16, patch_size=4, embed_dim=128, depth=2, num_heads=2, mlp_ratio=2,
                                  num_classes=5))
    ours = load_model(save_state(reference, tmp_path / "vit.safetensors"))
    cfg = ours.cfg
    assert (cfg.gelu, cfg.layer_norm_eps, cfg.num_heads, cfg.classifier) == ("exact", 1e-6, 2, "token")
    assert cfg.num_classes == 5
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert max_diff(ours(x), reference(x)) < 1e-4


def test_timm_directory_with_its_config_equals_timm(tmp_path):
    reference = randomise(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(16, 24), patch_size=4,
                                            embed_dim=32, depth=2, num_heads=4, num_classes=6), seed=1)
    timm.models.save_for_hf(reference, tmp_path / "hub", safe_serialization=True)
    ours = load_model(tmp_path / "hub")
    assert ours.cfg.num_heads == 4 and ours.cfg.image_size == (16, 24)  # heads and grid from timm's config.json
    assert ours.cfg.mean == (0.5, 0.5, 0.5)  # the pretrained_cfg's normalisation
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        assert max_diff(ours(x), reference(x)) < 1e-4


def test_timm_avg_pool_without_class_token_or_fc_norm_is_vitlab_gap(tmp_path):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    reference = randomise(TimmViT(img_size=16, patch_size=4, embed_dim=64, depth=1, num_heads=1, num_classes=3,
                                  global_pool="avg", class_token=False, fc_norm=False), seed=2)
    ours = load_model(save_state(reference, tmp_path / "gap.safetensors"))
    assert ours.cfg.classifier == "gap"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert max_diff(ours(x), reference(x)) < 1e-4


def test_timm_fc_norm_is_refused_naming_the_keys_and_why(tmp_path):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    model = TimmViT(img_size=16, patch_size=4, embed_dim=64, depth=1, num_heads=1, num_classes=3, global_pool="avg",
                    class_token=False)  # fc_norm on by default with avg pooling, the final norm an identity
    with pytest.raises(CheckpointError) as refused:
        load_model(save_state(model, tmp_path / "fcnorm.safetensors"))
    message = str(refused.value)
    assert "nothing loaded" in message and "missing [norm.bias, norm.weight]" in message
    assert "unexpected [fc_norm.bias, fc_norm.weight]" in message and "LayerNorm after pooling" in message


def test_hf_classification_model_equals_transformers(tmp_path):
    reference = randomise(transformers.ViTForImageClassification(hf_config()), seed=3)
    reference.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert (ours.cfg.gelu, ours.cfg.layer_norm_eps, ours.cfg.num_classes) == ("exact", 1e-12, 4)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert max_diff(ours(x), reference(pixel_values=x).logits) < 1e-4


def test_hf_gelu_and_eps_come_from_its_config(tmp_path):
    reference = randomise(transformers.ViTForImageClassification(
        hf_config(hidden_act="gelu_new", layer_norm_eps=1e-5, id2label={i: f"c{i}" for i in range(4)})), seed=4)
    reference.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf" / "model.safetensors")  # the file: its config.json beside it is read
    assert (ours.cfg.gelu, ours.cfg.layer_norm_eps, ours.cfg.class_names) == ("tanh", 1e-5, ("c0", "c1", "c2", "c3"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert max_diff(ours(x), reference(pixel_values=x).logits) < 1e-4


def test_hf_vit_model_pooler_is_the_pre_logits_layer(tmp_path):
    reference = randomise(transformers.ViTModel(hf_config(), add_pooling_layer=True), seed=5)
    reference.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert ours.cfg.representation_size == 32 and ours.cfg.num_classes == 0
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = reference(pixel_values=x)
        assert max_diff(ours(x), out.pooler_output) < 1e-4  # no head: the model returns its pre-logits
        assert max_diff(ours.forward_features(x), out.last_hidden_state) < 1e-4


def test_a_mismatched_checkpoint_is_refused_listing_missing_and_unexpected(tmp_path):
    randomise(transformers.ViTForImageClassification(hf_config()), seed=6).save_pretrained(tmp_path / "hf")
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del sd["vit.encoder.layer.1.intermediate.dense.bias"]
    sd["vit.encoder.layer.1.adapter.weight"] = torch.zeros(2)
    save_state(sd, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError) as refused:
        load_model(tmp_path / "hf")
    message = str(refused.value)
    assert str(tmp_path / "hf") in message and "not a Hugging Face ViT vitlab can load, nothing loaded" in message
    assert "missing [vit.encoder.layer.1.intermediate.dense.bias]" in message
    assert "unexpected [vit.encoder.layer.1.adapter.weight]" in message

    with pytest.raises(CheckpointError, match="neither timm nor Hugging Face ViT names"):
        load_model(save_state(torch.nn.Linear(2, 2), tmp_path / "linear.safetensors"))
    (tmp_path / "pickled.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_model(tmp_path / "pickled.bin")


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
    sentinel = tmp_path / "sentinel"
    path = tmp_path / "weights.npz"
    arrays = official_arrays()
    arrays["embedding/kernel"] = np.array([Payload(sentinel)], dtype=object)
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match=r"array 'embedding/kernel' holds pickled Python objects"):
        load_model(path)
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
    assert not sentinel.exists()


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


def timm_hybrid(path, *, layers, hidden, depth, heads, mlp, image, num_classes):
    """timm's own hybrid ViT (ResNetV2 stem, HybridEmbed) loaded with timm's own npz loader: the oracle."""
    from functools import partial

    from timm.layers import HybridEmbed, StdConv2dSame
    from timm.models.resnetv2 import ResNetV2, create_resnetv2_stem
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    from timm.models.vision_transformer import _load_weights

    conv = partial(StdConv2dSame, eps=1e-8)
    if layers:
        backbone = ResNetV2(layers=layers, num_classes=0, global_pool="", preact=False, stem_type="same",
                            conv_layer=conv, width_factor=1)
    else:
        backbone = create_resnetv2_stem(3, stem_type="same", preact=False, conv_layer=conv)
    model = TimmViT(img_size=image, patch_size=1, num_classes=num_classes, embed_dim=hidden, depth=depth,
                    num_heads=heads, mlp_ratio=mlp / hidden,
                    embed_layer=partial(HybridEmbed, backbone=backbone))
    _load_weights(model, str(path))
    return model.eval()


def as_timm_numerics(model):
    """The same model with timm's hybrid numerics: weights standardised as (w - m) / sqrt(var + 1e-8), GroupNorm
    eps 1e-5 (the official code: (w - m) / (std + 1e-5) and eps 1e-6)."""
    for m in model.modules():
        if isinstance(m, StdConv2d):
            m.eps, m.form = 1e-8, "var"
        elif isinstance(m, torch.nn.GroupNorm):
            m.eps = 1e-5
    return model


@pytest.mark.slow
@pytest.mark.parametrize("layers", [(3, 4, 9), (2, 2, 2, 2), (1, 2), ()])
def test_hybrid_npz_logits_equal_timm(tmp_path, layers):
    """An official hybrid npz, written key by key: its stem's depths come from its arrays (any, not only
    (3, 4, 9)), and the logits are timm's for the same file."""
    width, stride = 64, 4 * 2 ** max(len(layers) - 1, 0)
    image = 2 * stride if len(layers) > 2 else 4 * stride
    grid = (image // stride,) * 2
    arrays = hybrid_arrays(num_layers=layers, width=width, hidden=32, layers=2, heads=4, mlp=64, grid=grid,
                           num_classes=7, scale=0.2)
    path = write_npz(tmp_path / "R_hybrid.npz", arrays)
    ours = load_model(path, gelu="exact")  # timm runs the exact GELU
    assert ours.cfg.resnet_num_layers == layers and ours.cfg.resnet_width_factor == 1
    assert ours.cfg.image_size == (image, image) and ours.cfg.patch_size == (1, 1)
    theirs = timm_hybrid(path, layers=layers, hidden=32, depth=2, heads=4, mlp=64, image=image, num_classes=7)
    x = torch.randn(3, 3, image, image)
    with torch.no_grad():
        expected = theirs(x)
        official = ours(x)
        same_numerics = as_timm_numerics(ours)(x)
    assert expected.std() > 0.1
    # with timm's epsilons the two are the same computation
    assert (same_numerics - expected).abs().max() < 1e-4
    # with the official ones (ours by default) they differ by what the epsilons make, and no more
    assert (official - expected).abs().max() < 2e-3 * expected.abs().max()


def test_hybrid_npz_round_trip_and_config(tmp_path):
    arrays = hybrid_arrays(num_layers=(1, 2), width=32, hidden=32, layers=1, heads=2, mlp=32, grid=(2, 2),
                           num_classes=3)
    path = write_npz(tmp_path / "h.npz", arrays)
    model = load_model(path)
    assert model.cfg.resnet_width_factor == 0.5 and model.cfg.image_size == (16, 16)
    export_npz(model, tmp_path / "again.npz")
    again = np.load(tmp_path / "again.npz")
    assert sorted(again.files) == sorted(arrays)
    for k in arrays:
        np.testing.assert_array_equal(again[k], arrays[k], err_msg=k)
    save_checkpoint(model, tmp_path / "ckpt")
    assert read_config(tmp_path / "ckpt") == model.cfg
    # a new resolution: the position embeddings interpolated over the stem's grid
    bigger = adapt(model, image_size=32)
    assert bigger.pos_embed.shape == (1, 4 * 4 + 1, 32) and bigger(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_hybrid_npz_with_missing_units_is_refused(tmp_path):
    arrays = hybrid_arrays(num_layers=(2,), width=32, hidden=32, layers=1, heads=2, mlp=32, grid=(2, 2))
    for k in [k for k in arrays if k.startswith("block1/unit1/")]:
        del arrays[k]
    with pytest.raises(CheckpointError, match="not numbered"):
        load_model(write_npz(tmp_path / "h.npz", arrays))


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

