"""The model: variants and their sizes, the official numerics, attention weights on request, config errors."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import vitlab
from vitlab.common import ConfigError
from vitlab.model import (
    drop_patches,
    VisionTransformer,
    ViTConfig,
    create_model,
    forward_flops,
    mimetic_init_,
    model_table,
    num_params,
    posemb_sincos_2d,
    variant_config,
)


def tiny(**kw) -> ViTConfig:
    fields = dict(image_size=16, patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, num_classes=5)
    fields.update(kw)
    return ViTConfig(**fields)


# ---------------------------------------------------------------------------------------------------------------
# Variants and sizes
# ---------------------------------------------------------------------------------------------------------------

# Exact counts at 224 px with 1000 classes. The paper's Table 1 rounds them: ViT-B 86M, ViT-H 632M; its "ViT-L
# 307M" is ViT-L/32's count (306.5M, the bigger patch embedding); ViT-L/16 has 304.3M.
PAPER_COUNTS = {
    "ViT-Ti/16": 5_717_416,
    "ViT-S/16": 22_050_664,
    "ViT-B/16": 86_567_656,
    "ViT-L/16": 304_326_632,
    "ViT-L/32": 306_535_400,
    "ViT-H/14": 632_045_800,
}


@pytest.mark.parametrize("name,count", PAPER_COUNTS.items())
def test_parameter_count_exact(name, count):
    assert num_params(variant_config(name)) == count


@pytest.mark.parametrize("name,millions", [("ViT-B/16", 86), ("ViT-L/32", 307), ("ViT-H/14", 632)])
def test_parameter_count_matches_paper_table_1(name, millions):
    assert abs(num_params(variant_config(name)) / 1e6 - millions) < 1  # the table rounds loosely (86.57 -> 86)


@pytest.mark.parametrize(
    "name,timm_name",
    [("vit-ti/16", "vit_tiny_patch16_224"), ("vit-s/16", "vit_small_patch16_224"), ("vit-b/16", "vit_base_patch16_224"),
     ("vit-l/16", "vit_large_patch16_224"), ("vit-h/14", "vit_huge_patch14_224")],
)
def test_parameter_count_equals_timm(name, timm_name):
    with torch.device("meta"):
        reference = timm.create_model(timm_name, pretrained=False, num_classes=1000)
    assert num_params(variant_config(name)) == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("name", ["vit-b/16", "ViT-B/16", "VIT-b_16", "b/16", "vit-ti/4", "ViT-L/16", "vit-h/14", "vit-s/32"])
def test_variant_names_case_insensitive(name):
    cfg = variant_config(name)
    size = name.replace("_", "/").split("/")[0].split("-")[-1].lower()
    assert cfg.hidden_size == {"ti": 192, "s": 384, "b": 768, "l": 1024, "h": 1280}[size]
    assert cfg.patch_size[0] == int(name.replace("_", "/").split("/")[-1])


def test_variant_table_is_the_papers():
    for name, (D, L, H, M) in {"vit-b/16": (768, 12, 12, 3072), "vit-l/16": (1024, 24, 16, 4096),
                               "vit-h/14": (1280, 32, 16, 5120)}.items():
        cfg = variant_config(name)
        assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_dim) == (D, L, H, M)


def test_create_model_overrides():
    model = create_model("vit-ti/4", image_size=28, in_chans=1, num_classes=10, num_layers=2)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert model.cfg.name == "ViT-Ti/4" and model.cfg.grid_size == (7, 7)


def test_flops_by_hand():
    cfg = tiny(num_classes=5)  # T = 17 tokens, N = 16 patches
    T, N, D, M = 17, 16, 32, 64
    macs = N * D * 3 * 16 + 2 * (T * D * 3 * D + 2 * T * T * D + T * D * D + 2 * T * D * M) + D * 5
    assert forward_flops(cfg) == 2 * macs


def test_model_table_rows():
    rows = model_table(224)
    assert [r["name"] for r in rows] == ["ViT-Ti/16", "ViT-S/16", "ViT-B/16", "ViT-L/16", "ViT-H/14"]
    b16 = rows[2]
    assert b16["params"] == 86_567_656 and b16["tokens"] == 197 and 34 < b16["gflops"] < 36


# ---------------------------------------------------------------------------------------------------------------
# Numerics: the official Flax model
# ---------------------------------------------------------------------------------------------------------------


def _timm_twin(cfg: ViTConfig, act: str):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    gap = cfg.classifier == "gap"
    return TimmViT(
        img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
        embed_dim=cfg.hidden_size, depth=cfg.num_layers, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.hidden_size,
        class_token=not gap, global_pool="avg" if gap else "token", fc_norm=False, act_layer=act,
    ).eval()


@pytest.mark.parametrize("gelu,act", [("tanh", "gelu_tanh"), ("exact", "gelu")])
@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_same_weights_same_logits_as_timm(gelu, act, classifier):
    """timm's module names match ours, so one state dict drives both; only the GELU form must agree."""
    cfg = tiny(gelu=gelu, classifier=classifier, image_size=(16, 24))
    torch.manual_seed(0)
    ours = VisionTransformer(cfg).eval()
    for p in ours.parameters():
        p.data.normal_(0, 0.3)
    reference = _timm_twin(cfg, act)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(3, 3, 16, 24)
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max() < 1e-5


def test_tanh_gelu_is_the_default_and_differs_from_exact():
    cfg = tiny()
    assert cfg.gelu == "tanh" and cfg.layer_norm_eps == 1e-6
    torch.manual_seed(0)
    model = VisionTransformer(cfg).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.5)
    exact = VisionTransformer(cfg.replace(gelu="exact")).eval()
    exact.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (model(x) - exact(x)).abs().max() > 1e-4  # the forms differ by up to ~1e-3 per unit
    act = model.blocks[0].mlp.act
    z = torch.linspace(-4, 4, 101)
    tanh_form = 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    assert torch.allclose(act(z), tanh_form, atol=1e-6)


def test_the_compiled_tanh_gelu_is_the_same_function_and_gradient(monkeypatch):
    """Under torch.compile the tanh GELU is computed through a sigmoid (1 + tanh(z) = 2 sigmoid(2z)): the values
    and gradients of the official form, in float32 and rounded to bf16 as PyTorch's own GELU rounds."""
    act = VisionTransformer(tiny()).blocks[0].mlp.act
    z = torch.linspace(-8, 8, 4001, dtype=torch.float64).float().requires_grad_()
    eager = F.gelu(z, approximate="tanh")
    (eager_grad,) = torch.autograd.grad(eager.sum(), z)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    compiled = act(z)
    (compiled_grad,) = torch.autograd.grad(compiled.sum(), z)
    assert (compiled - eager).abs().max() < 1e-6 and (compiled_grad - eager_grad).abs().max() < 1e-5
    zb = z.detach().bfloat16()
    reference = F.gelu(zb, approximate="tanh").float()
    assert ((act(zb).float() - reference).abs() <= 2 ** -7 * reference.abs() + 1e-6).all()  # at most 1 bf16 ulp


def test_layer_norm_eps_is_flax_default():
    model = VisionTransformer(tiny())
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {1e-6}


def test_initialisation_is_official():
    torch.manual_seed(0)
    model = VisionTransformer(tiny(representation_size=16, hidden_size=64, mlp_dim=128))
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert torch.count_nonzero(model.cls_token) == 0
    assert 0.015 < model.pos_embed.std().item() < 0.025  # N(0, 0.02)
    bias = model.blocks[0].mlp.fc1.bias
    assert 0 < bias.abs().max().item() < 1e-5  # N(0, 1e-6)
    w = model.blocks[0].mlp.fc1.weight  # xavier uniform: bound sqrt(6 / (fan_in + fan_out))
    assert w.abs().max().item() <= math.sqrt(6 / (64 + 128)) + 1e-7
    pw = model.patch_embed.proj.weight  # LeCun normal truncated at 2 sigma: variance 1 / fan_in
    assert abs(pw.var().item() * 3 * 16 - 1) < 0.15


def test_gap_has_no_class_token():
    model = VisionTransformer(tiny(classifier="gap"))
    assert model.cls_token is None and model.pos_embed.shape == (1, 16, 32)
    assert model.forward_features(torch.zeros(1, 3, 16, 16)).shape == (1, 16, 32)


def test_representation_size_pre_logits():
    model = VisionTransformer(tiny(representation_size=12)).eval()
    x = torch.randn(2, 3, 16, 16)
    features = model.forward_features(x)
    pre = model.forward_head(features, pre_logits=True)
    assert pre.shape == (2, 12) and pre.abs().max() <= 1  # tanh
    expected = torch.tanh(features[:, 0] @ model.pre_logits.fc.weight.T + model.pre_logits.fc.bias)
    assert torch.allclose(pre, expected, atol=1e-6)


def test_no_head_returns_representation():
    model = VisionTransformer(tiny(num_classes=0))
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 32)


@pytest.mark.parametrize("image_size,patch_size", [((16, 24), 4), ((12, 20), (3, 5)), (15, 5), (8, 8)])
def test_non_square_images_and_patches(image_size, patch_size):
    cfg = tiny(image_size=image_size, patch_size=patch_size)
    model = VisionTransformer(cfg)
    h, w = cfg.image_size
    assert model(torch.zeros(2, 3, h, w)).shape == (2, 5)
    assert model.pos_embed.shape[1] == 1 + (h // cfg.patch_size[0]) * (w // cfg.patch_size[1])


def test_patch_embedding_is_a_linear_map_of_flattened_patches():
    """Eq. 1: each patch, flattened, times E; the convolution is only a fast way to do it."""
    model = VisionTransformer(tiny(in_chans=2))
    x = torch.randn(1, 2, 16, 16)
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4)  # (1, C, 4, 4, P, P)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(1, 16, 2 * 16)  # row-major patches, (C, P, P) flattened
    E = model.patch_embed.proj.weight.reshape(32, -1)
    expected = patches @ E.T + model.patch_embed.proj.bias
    assert torch.allclose(model.patch_embed(x), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Attention weights on request
# ---------------------------------------------------------------------------------------------------------------


def test_attention_weights_match_plain_softmax():
    torch.manual_seed(0)
    model = VisionTransformer(tiny()).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits, maps = model(x, return_attention=[1])
        assert set(maps) == {1}
        # recompute layer 1's input and its attention by hand
        z = torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(x)], 1) + model.pos_embed
        z, _ = model.blocks[0](z)
        y = model.blocks[1].norm1(z)
        attn = model.blocks[1].attn
        W, b = attn.qkv.weight, attn.qkv.bias
        q, k = (y @ W[:32].T + b[:32]), (y @ W[32:64].T + b[32:64])
        q = q.view(2, 17, 4, 8).transpose(1, 2)
        k = k.view(2, 17, 4, 8).transpose(1, 2)
        expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    assert maps[1].shape == (2, 4, 17, 17)
    assert torch.allclose(maps[1], expected, atol=1e-5)
    assert torch.allclose(maps[1].sum(-1), torch.ones(2, 4, 17), atol=1e-5)
    assert torch.allclose(logits, model(x), atol=1e-5)  # the explicit path gives the fused path's output


def test_attention_all_layers_and_negative_index():
    model = VisionTransformer(tiny(num_layers=3)).eval()
    x = torch.randn(1, 3, 16, 16)
    _, all_maps = model(x, return_attention=True)
    assert sorted(all_maps) == [0, 1, 2]
    _, last = model(x, return_attention=[-1])
    assert list(last) == [2] and torch.allclose(last[2], all_maps[2])
    with pytest.raises(ConfigError, match="layer 3 out of range"):
        model(x, return_attention=[3])


def test_attention_is_computed_only_for_requested_layers(monkeypatch):
    model = VisionTransformer(tiny(num_layers=3)).eval()
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(vitlab.model, "_fused_pays", lambda q: True)  # as on a GPU, or for long sequences
    model(torch.randn(1, 3, 16, 16), return_attention=[0])
    assert len(calls) == 2  # layers 1 and 2 stayed on the fused kernel
    calls.clear()
    model(torch.randn(1, 3, 16, 16))
    assert len(calls) == 3


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


def test_config_dict_round_trip():
    cfg = tiny(image_size=(16, 24), class_names=[f"c{i}" for i in range(5)], representation_size=8, in_chans=1)
    again = ViTConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.mean == (0.5,) and again.image_size == (16, 24)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(image_size=30, patch_size=16), r"patch_size \(16, 16\) does not divide image_size \(30, 30\)"),
        (dict(image_size=(16, 18), patch_size=4), r"patch_size \(4, 4\) does not divide image_size \(16, 18\).*width 18"),
        (dict(hidden_size=30, num_heads=4), r"num_heads 4 does not divide hidden_size 30"),
        (dict(classifier="mean"), r"classifier must be 'token' or 'gap', got 'mean'"),
        (dict(gelu="relu"), r"gelu must be 'tanh' or 'exact'"),
        (dict(num_layers=0), r"num_layers must be a positive int, got 0"),
        (dict(dropout_rate=1.5), r"dropout_rate must be in \[0, 1\)"),
        (dict(in_chans=1, mean=(0.5, 0.5, 0.5)), r"mean has 3 values for in_chans 1"),
        (dict(class_names=["a"]), r"class_names has 1 names for num_classes 5"),
        (dict(image_size="big"), r"image_size must be an int or a pair"),
    ],
)
def test_config_errors_name_the_field(kw, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**kw)


def test_unknown_variant_and_field():
    with pytest.raises(ConfigError, match=r"unknown model 'vit-x/16'"):
        variant_config("vit-x/16")
    with pytest.raises(ConfigError, match=r"unknown model 'vit-b'"):
        create_model("vit-b")
    with pytest.raises(ConfigError, match=r"unknown ViTConfig field\(s\): widht"):
        create_model("vit-ti/16", widht=3)
    with pytest.raises(ConfigError, match=r"unknown ViTConfig field\(s\): hidden"):
        ViTConfig.from_dict({"hidden": 3})
    with pytest.raises(ConfigError, match=r"patch_size \(16, 16\) does not divide image_size \(28, 28\)"):
        create_model("vit-b/16", image_size=28)


def test_public_api():
    assert vitlab.create_model is create_model
    for name in ("load_model", "save_checkpoint", "export_npz", "resize_pos_embed", "ViTConfig"):
        assert hasattr(vitlab, name)


def test_short_sequences_on_cpu_take_the_written_out_path_with_the_same_result(monkeypatch):
    """On CPUs the fused kernel is the slow one for short sequences (model._fused_pays): up to 128 tokens in
    float32, 256 in bf16; both paths compute Eq. 6."""
    torch.manual_seed(0)
    model = VisionTransformer(tiny()).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(4, 3, 16, 16)
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        written_out = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            written_out_bf16 = model(x).float()
    assert calls == []
    monkeypatch.setattr(vitlab.model, "_fused_pays", lambda q: True)
    with torch.no_grad():
        fused = model(x)
    assert len(calls) == 2
    torch.testing.assert_close(written_out, fused, rtol=1e-5, atol=1e-5)
    assert (written_out_bf16 - fused).abs().max() < 0.05 * fused.abs().max()
    monkeypatch.undo()
    for dtype, longest in ((torch.float32, 128), (torch.bfloat16, 256)):
        assert not vitlab.model._fused_pays(torch.empty(1, 2, longest, 8, dtype=dtype))
        assert vitlab.model._fused_pays(torch.empty(1, 2, longest + 1, 8, dtype=dtype))
        assert vitlab.model._fused_pays(torch.empty(1, 2, 8, 8, dtype=dtype, device="meta"))  # not a CPU


# ---------------------------------------------------------------------------------------------------------------
# Stochastic depth and fixed position embeddings
# ---------------------------------------------------------------------------------------------------------------


def test_drop_path_rates_rise_linearly_with_depth():
    model = VisionTransformer(tiny(num_layers=5, stochastic_depth=0.2))
    rates = [getattr(block.drop_path, "rate", 0.0) for block in model.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert isinstance(model.blocks[0].drop_path, torch.nn.Identity)  # rate 0: no module, no random draw


def test_drop_path_is_the_identity_in_eval_and_drops_whole_branches_in_training():
    model = VisionTransformer(tiny(num_layers=3, stochastic_depth=0.5))
    x = torch.randn(4, 3, 16, 16)
    plain = VisionTransformer(tiny(num_layers=3))
    plain.load_state_dict(model.state_dict())
    assert torch.equal(model.eval()(x), plain.eval()(x))  # eval: exactly the model without it

    drop = model.blocks[2].drop_path  # rate 0.5
    drop.train()
    y = torch.ones(4000, 5, 7)
    torch.manual_seed(0)
    out = drop(y)
    per_image = out.flatten(1)
    assert ((per_image == 0).all(1) | (per_image == 2.0).all(1)).all()  # a whole branch kept (x 1/(1-p)) or dropped
    assert (per_image[:, 0] == 0).float().mean().item() == pytest.approx(0.5, abs=0.03)

    block = model.blocks[2].train()  # in a block: the residual stream goes on unchanged where a branch is dropped
    tokens = torch.randn(2000, 3, 32)
    torch.manual_seed(1)
    out = block(tokens)[0]
    untouched = (out == tokens).flatten(1).all(1)  # both branches dropped: probability 0.25
    assert untouched.float().mean().item() == pytest.approx(0.25, abs=0.04)


def test_sincos2d_position_embeddings_by_hand():
    pe = posemb_sincos_2d((2, 3), 8, num_prefix_tokens=1)
    assert pe.shape == (1, 7, 8) and not pe[0, 0].any()  # the [class] token's is zero
    omega = [1.0, 1e-4]  # 1 / 10000^(k / (D/4 - 1)) for k = 0, 1
    for row in range(2):
        for col in range(3):
            expected = ([math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
                        + [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega])
            assert pe[0, 1 + row * 3 + col].tolist() == pytest.approx(expected, abs=1e-7)


def test_sincos2d_model_has_fixed_embeddings_at_any_resolution():
    model = VisionTransformer(tiny(posemb="sincos2d", classifier="gap"))
    assert "pos_embed" not in dict(model.named_parameters()) and "pos_embed" in model.state_dict()
    assert torch.equal(model.pos_embed, posemb_sincos_2d((4, 4), 32))
    with pytest.raises(ConfigError, match="divisible by 4"):
        tiny(posemb="sincos2d", hidden_size=30, num_heads=3)


def test_mimetic_init_sets_the_attention_products_to_the_closed_form():
    D, heads, h = 64, 4, 16
    torch.manual_seed(0)
    model = VisionTransformer(tiny(hidden_size=D, num_heads=heads, mlp_dim=128, num_layers=3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mimetic_init_(model)
    bound = math.sqrt(3 / D)  # Z is uniform in [-bound, bound]: variance 1/D
    for block in model.blocks:
        w = block.attn.qkv.weight
        noise = (block.attn.proj.weight @ w[2 * D:] + 0.4 * torch.eye(D)) / 0.4  # W_o W_v = 0.4 Z - 0.4 I
        assert noise.abs().max().item() <= bound + 1e-5 and noise.std().item() * D**0.5 == pytest.approx(1, abs=0.05)
        for head in range(heads):
            q, k = w[head * h:(head + 1) * h], w[D + head * h:D + (head + 1) * h]
            s = torch.linalg.svdvals(q.T @ k)  # W_q^T W_k: the top h of 0.7 Z + 0.7 I's singular values
            assert s[h:].max().item() < 1e-5 and s[:h].min().item() > 0.7  # rank h, above the identity's 0.7
            assert (q * k).sum().item() > 0.7 * h  # trace(W_q^T W_k): near +identity, not a random 0
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"blocks.{i}.attn.{p}.weight" for i in range(3) for p in ("qkv", "proj")}

    # what it is for: at initialisation each token attends to itself far more than to the others
    x = torch.randn(8, 3, 16, 16)
    for init, low, high in (("official", 0.0, 0.1), ("mimetic", 0.3, 1.0)):
        torch.manual_seed(0)
        model = VisionTransformer(tiny(hidden_size=D, num_heads=heads, mlp_dim=128, classifier="gap")).eval()
        if init == "mimetic":
            mimetic_init_(model)
        with torch.no_grad():
            maps = model(x, return_attention=[0])[1][0]  # (B, heads, 16, 16): 1/16 = 0.0625 if uniform
        assert low < maps.diagonal(dim1=-2, dim2=-1).mean().item() < high, init


def test_patch_dropout_keeps_a_random_share_of_each_images_patches_in_training_only():
    x = torch.arange(2 * 17 * 3, dtype=torch.float32).view(2, 17, 3)  # a [class] token and 16 patches per image
    torch.manual_seed(0)
    kept = drop_patches(x, 0.25, num_prefix_tokens=1)
    assert kept.shape == (2, 1 + 12, 3) and torch.equal(kept[:, 0], x[:, 0])  # the [class] token always stays
    for b in range(2):
        rows = [int(r[0]) // 3 - 17 * b for r in kept[b, 1:]]
        assert rows == sorted(rows) and len(set(rows)) == 12 and min(rows) >= 1  # distinct patches, in order
    model = VisionTransformer(tiny(patch_dropout=0.5))
    images = torch.randn(3, 3, 16, 16)
    plain = VisionTransformer(tiny())
    plain.load_state_dict(model.state_dict())
    assert torch.equal(model.eval()(images), plain.eval()(images))  # the identity in eval
    model.train()
    assert model.forward_features(images).shape == (3, 1 + 8, 32)  # half of the 16 patches in training
    with pytest.raises(ConfigError, match="patch_dropout does not apply to masked patch prediction"):
        tiny(patch_dropout=0.5, mpp_classes=8, num_classes=0)
