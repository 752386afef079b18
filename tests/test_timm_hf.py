"""timm's and Hugging Face's ViTs, made and saved by their own libraries in the test (the fixtures their
libraries wrote are in tests/test_formats.py): configurations read from their files, logits equal to theirs, and
what vitlab refuses, naming the keys and why."""

from __future__ import annotations

import official
import pytest
import timm
import torch
import transformers
from checkpoints import hf_config, max_diff, randomise, save_state
from safetensors.torch import load_file

from vitlab.common import CheckpointError
from vitlab.weights import load_model

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


def test_the_fixtures_configs_are_read_from_their_libraries_files():
    timm_cfg, hf_cfg = load_model(official.path("timm_vit")).cfg, load_model(official.path("transformers_vit")).cfg
    assert (timm_cfg.num_heads, timm_cfg.gelu, timm_cfg.layer_norm_eps, timm_cfg.num_classes) == (4, "exact", 1e-6, 10)
    assert (hf_cfg.num_heads, hf_cfg.gelu, hf_cfg.layer_norm_eps, hf_cfg.mean) == (4, "exact", 1e-12, (0.5,) * 3)


def test_a_mismatched_checkpoint_is_refused_listing_missing_and_unexpected(tmp_path):
    hf = official.copy("transformers_vit", tmp_path)
    sd = load_file(str(hf / "model.safetensors"))
    del sd["vit.encoder.layer.1.intermediate.dense.bias"]
    sd["vit.encoder.layer.1.adapter.weight"] = torch.zeros(2)
    save_state(sd, hf / "model.safetensors")
    with pytest.raises(CheckpointError) as refused:
        load_model(hf)
    message = str(refused.value)
    assert str(hf) in message and "not a Hugging Face ViT vitlab can load, nothing loaded" in message
    assert "missing [vit.encoder.layer.1.intermediate.dense.bias]" in message
    assert "unexpected [vit.encoder.layer.1.adapter.weight]" in message
    (tmp_path / "pickled.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_model(tmp_path / "pickled.bin")
