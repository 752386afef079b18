"""The ResNets: weight standardisation and GroupNorm against their formulas, TensorFlow's SAME padding, the
hybrid's shapes and its official npz against timm's hybrid, BiT against timm's BiT, names, cost, training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from vitlab.common import ConfigError
from vitlab.formats import export_npz
from vitlab.model import (
    build_model,
    create_model,
    forward_flops,
    model_config,
    num_params,
    variant_config,
)
from vitlab.resnet import (
    ResNetConfig,
    ResNetV2,
    StdConv2d,
    bit_config,
    group_norm,
    same_padding,
    standardize_weight,
)
from vitlab.transfer import adapt
from vitlab.weights import load_model, save_checkpoint


def test_weight_standardisation_is_the_formula_per_output_channel():
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64) * 0.3 + 0.1
    flat = w.numpy().reshape(5, -1)
    mean, std = flat.mean(axis=1, keepdims=True), flat.std(axis=1, keepdims=True)  # population std, as jnp.std
    official = (flat - mean) / (std + 1e-5)  # vit_jax models_resnet.weight_standardize
    bit = (flat - mean) / np.sqrt(std**2 + 1e-10)  # big_transfer's StdConv2d
    np.testing.assert_allclose(standardize_weight(w, 1e-5, "std").numpy().reshape(5, -1), official, rtol=1e-12)
    np.testing.assert_allclose(standardize_weight(w, 1e-10, "var").numpy().reshape(5, -1), bit, rtol=1e-12)
    out = standardize_weight(w, 1e-10, "var").numpy().reshape(5, -1)
    np.testing.assert_allclose(out.mean(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(out.std(axis=1), 1, atol=1e-9)


def test_std_conv_convolves_with_the_standardised_kernel():
    conv = StdConv2d(3, 4, 3, 1, 1, eps=1e-5, form="std")
    x = torch.randn(2, 3, 8, 8)
    expected = F.conv2d(x, standardize_weight(conv.weight, 1e-5, "std"), padding=1)
    torch.testing.assert_close(conv(x), expected)
    # the standardisation makes the convolution blind to the kernel's scale and offset
    with torch.no_grad():
        before = conv(x)
        conv.weight.mul_(7.0).add_(3.0)
    torch.testing.assert_close(conv(x), before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("channels,groups", [(64, 32), (256, 32), (16, 16)])
def test_group_norm_is_the_formula(channels, groups):
    gn = group_norm(channels, eps=1e-6)
    assert gn.num_groups == groups
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    x = torch.randn(3, channels, 5, 4, dtype=torch.float64)
    g = x.numpy().reshape(3, groups, -1)
    mean, var = g.mean(axis=2, keepdims=True), g.var(axis=2, keepdims=True)
    normed = ((g - mean) / np.sqrt(var + 1e-6)).reshape(x.shape)
    expected = normed * gn.weight.detach().double().numpy()[:, None, None] + gn.bias.detach().double().numpy()[:, None, None]
    np.testing.assert_allclose(gn.double()(x).detach().numpy(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n,k,s,before,after", [(224, 7, 2, 2, 3), (56, 3, 2, 0, 1), (56, 3, 1, 1, 1),
                                                 (7, 1, 2, 0, 0), (9, 3, 2, 1, 1)])
def test_same_padding_is_tensorflows(n, k, s, before, after):
    x = torch.ones(1, 1, n, n)
    padded = same_padding(x, k, s)
    assert padded.shape[-1] == n + before + after
    assert padded[0, 0, 0, :before].sum() == 0 and padded[0, 0, n // 2, before:before + n].sum() == n
    assert F.max_pool2d(padded, k, s).shape[-1] == math.ceil(n / s)


# --------------------------------------------------------------------------------------------------------------
# The hybrid
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,image,layers,patch,stride,tokens,channels", [
    ("r50+vit-b/16", 224, (3, 4, 9), 1, 16, 14 * 14, 1024),  # the paper's hybrid
    ("r50+vit-b/16", 384, (3, 4, 9), 1, 16, 24 * 24, 1024),
    ("r26+vit-s/32", 224, (2, 2, 2, 2), 1, 32, 7 * 7, 2048),
    ("r50+vit-l/32", 224, (3, 4, 6, 3), 1, 32, 7 * 7, 2048),
    ("r+vit-ti/16", 224, (), 4, 4, 14 * 14, 64),  # the root block alone
    ("r26+vit-ti/8", 32, (2, 6), 1, 8, 4 * 4, 512),
])
def test_hybrid_token_count_and_shapes(name, image, layers, patch, stride, tokens, channels):
    cfg = variant_config(name, image_size=image, hidden_size=64, num_heads=2, num_layers=1, mlp_dim=64,
                         num_classes=5)
    assert cfg.resnet_num_layers == layers and cfg.patch_size == (patch, patch) and cfg.stem_stride == stride
    assert cfg.num_patches == tokens
    with torch.device("meta"):
        model = create_model(name, image_size=image, hidden_size=64, num_heads=2, num_layers=1, mlp_dim=64,
                             num_classes=5)
        x = torch.zeros(2, 3, image, image)
        features = model.patch_embed.backbone(x)
        assert features.shape == (2, channels, image // stride, image // stride)
        assert model.patch_embed(x).shape == (2, tokens, 64)
        assert model.forward_features(x).shape == (2, tokens + 1, 64)
        assert model(x).shape == (2, 5)
    assert model.pos_embed.shape == (1, tokens + 1, 64)


def test_hybrid_names_and_errors():
    assert variant_config("R50+ViT-B/16").name == "R50+ViT-B/16"
    with pytest.raises(ConfigError, match="multiple of its stem's stride"):
        variant_config("r50+vit-b/2")
    with pytest.raises(ConfigError, match="no ResNet-34"):
        variant_config("r34+vit-b/16")
    with pytest.raises(ConfigError, match="stem stride 16"):
        variant_config("r50+vit-b/16", image_size=200)
    with pytest.raises(ConfigError, match="resnet_num_layers"):
        variant_config("r50+vit-b/16", resnet_num_layers=(1, 0))


def test_the_3x3_root_keeps_the_resolution_and_the_stages_set_the_stride():
    cfg = variant_config("r26+vit-ti/4", image_size=32, resnet_num_layers=(1, 1, 1), resnet_root="3x3",
                         resnet_width_factor=0.25, hidden_size=32, num_heads=2, num_layers=1, mlp_dim=64, num_classes=3)
    assert cfg.stem_stride == 4 and cfg.patch_size == (1, 1) and cfg.grid_size == (8, 8)
    model = build_model(cfg)
    stem = model.patch_embed.backbone
    assert stem.conv_root.kernel_size == (3, 3) and stem.conv_root.stride == (1, 1) and not stem.pool
    x = torch.randn(2, 3, 32, 32)
    root = F.relu(stem.gn_root(F.conv2d(x, standardize_weight(stem.conv_root.weight, 1e-5, "std"), padding=1)))
    assert root.shape == (2, 16, 32, 32)  # a 3x3 stride-1 convolution with SAME padding, no max-pool
    expected = root
    for stage in stem.stages:
        expected = stage(expected)
    torch.testing.assert_close(stem(x), expected)
    assert stem(x).shape == (2, 4 * 16 * 4, 8, 8) and model(x).shape == (2, 3)
    # the convolutions' multiply-adds at full resolution: the root's 32x32x27x16, then each unit's four convolutions
    root_macs = 32 * 32 * 3 * 9 * 16
    unit1 = 32 * 32 * (16 * 16 + 16 * 16 * 9 + 16 * 64 + 16 * 64)
    unit2 = 32 * 32 * 64 * 32 + 16 * 16 * (32 * 32 * 9 + 32 * 128 + 64 * 128)
    unit3 = 16 * 16 * 128 * 64 + 8 * 8 * (64 * 64 * 9 + 64 * 256 + 128 * 256)
    vit_cfg = variant_config("vit-ti/4", image_size=32, hidden_size=32, num_heads=2, num_layers=1, mlp_dim=64,
                             num_classes=3)
    vit_macs = forward_flops(vit_cfg) // 2 - 64 * 32 * 3 * 16  # without its patch embedding (Eq. 1)
    assert forward_flops(cfg) // 2 == root_macs + unit1 + unit2 + unit3 + 64 * 32 * 256 + vit_macs
    # the root names the stride: the paper's root with the same stages is 16, which a 4 px patch is not a multiple of
    with pytest.raises(ConfigError, match="stride 16"):
        variant_config("r26+vit-ti/4", resnet_num_layers=(1, 1, 1))
    with pytest.raises(ConfigError, match="resnet_root"):
        variant_config("vit-ti/4", resnet_root="3x3")
    with pytest.raises(ConfigError, match="3x3 root block"):
        export_npz(model, "unused.npz")


def test_r50_vit_b16_size_equals_timm():
    cfg = variant_config("r50+vit-b/16", num_classes=1000)
    theirs = timm.create_model("vit_base_r50_s16_224", num_classes=1000)
    assert num_params(cfg) == sum(p.numel() for p in theirs.parameters()) == 98_659_112


# --------------------------------------------------------------------------------------------------------------
# BiT
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,layers,width", [("bit-r50x1", (3, 4, 6, 3), 1), ("BiT-R26x1", (2, 2, 2, 2), 1),
                                                ("bit-r50x3", (3, 4, 6, 3), 3), ("bit-r26x0.5", (2, 2, 2, 2), 0.5)])
def test_bit_names(name, layers, width):
    cfg = model_config(name)
    assert isinstance(cfg, ResNetConfig) and cfg.num_layers == layers and cfg.width_factor == width


def test_bit_r50x1_size_and_cost_equal_resnet50s():
    cfg = bit_config("bit-r50x1")
    assert num_params(cfg) == sum(p.numel() for p in timm.create_model("resnetv2_50x1_bit").parameters())
    assert forward_flops(cfg) / 2 / 1e9 == pytest.approx(4.1, abs=0.05)  # ResNet-50's 4.1 GMACs at 224 px


def test_bit_equals_timm_bit():
    """Our BiT is timm's resnetv2_50x1_bit (big_transfer's model): same weights, same logits up to the
    standardisation's epsilon (1e-10 in big_transfer, 1e-8 in timm)."""
    ours = ResNetV2(bit_config("bit-r26x1", num_classes=6)).eval()
    from functools import partial

    from timm.layers import StdConv2d as TimmStdConv2d
    from timm.models.resnetv2 import ResNetV2 as TimmResNetV2

    # what timm's resnetv2_50x1_bit builds, with ResNet-26's stages
    theirs = TimmResNetV2(layers=(2, 2, 2, 2), num_classes=6, stem_type="fixed",
                          conv_layer=partial(TimmStdConv2d, eps=1e-8)).eval()
    names = {"conv_root.weight": "stem.conv.weight", "norm.weight": "norm.weight", "norm.bias": "norm.bias"}
    for k in ours.state_dict():
        if k.startswith("stages."):
            t = k.replace(".units.", ".blocks.").replace("conv_proj", "downsample.conv")
            for i in "123":
                t = t.replace(f"gn{i}.", f"norm{i}.")
            names[k] = t
    with torch.no_grad():
        sd = {}
        for k, v in ours.state_dict().items():
            if k.startswith("head."):
                continue
            sd[names[k]] = torch.randn_like(v) * (0.1 if ".bias" in k else 1) + (1 if "gn" in k and "weight" in k else 0)
        head_w, head_b = torch.randn(6, ours.num_features) * 0.05, torch.randn(6) * 0.1
        theirs.load_state_dict({**sd, "head.fc.weight": head_w[:, :, None, None], "head.fc.bias": head_b})
        ours.load_state_dict({**{k: sd[names[k]] for k in names}, "head.weight": head_w, "head.bias": head_b})
        x = torch.randn(2, 3, 96, 96)
        expected = theirs(x)
        assert expected.std() > 0.1
        torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=1e-4)


def test_bit_checkpoint_round_trip_and_new_head(tmp_path):
    model = ResNetV2(bit_config("bit-r26x0.25", num_classes=4, image_size=32))
    assert not model.head.weight.any()  # BiT's zero head
    with torch.no_grad():
        model.head.weight.normal_()
    save_checkpoint(model, tmp_path / "bit")
    assert json.loads((tmp_path / "bit" / "config.json").read_text())["family"] == "bit"
    loaded = load_model(tmp_path / "bit")
    assert isinstance(loaded, ResNetV2) and loaded.cfg == model.cfg
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    other = load_model(tmp_path / "bit", num_classes=7, image_size=64)
    assert other(torch.randn(1, 3, 64, 64)).shape == (1, 7) and not other.head.weight.any()
    with pytest.raises(ConfigError, match="num_layers cannot change"):
        adapt(loaded, num_layers=(1, 1, 1, 1))
    # BiT's published layout (tests/test_formats.py reads a file of BiT's own), and back: the same model
    again = load_model(export_npz(loaded, tmp_path / "bit.npz"))
    assert again.cfg == model.cfg
    torch.testing.assert_close(again(x), loaded(x), rtol=0, atol=0)


def test_bit_config_errors():
    with pytest.raises(ConfigError, match="unknown model"):
        model_config("bit-r34x1")
    with pytest.raises(ConfigError, match="hidden_size does not apply to a BiT ResNet"):
        bit_config("bit-r50x1", hidden_size=3)
    with pytest.raises(ConfigError, match="width_factor"):
        bit_config("bit-r50x1", width_factor=0.001)
    with pytest.raises(ConfigError, match="too small"):
        bit_config("bit-r50x1", image_size=16)
