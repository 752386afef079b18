"""Transfer: timm and Hugging Face checkpoints imported, fine-tuning as the training loop with pretrained weights
(a new zero head, position embeddings resized, SGD + cosine), ImageNet-ReaL accuracy, the downstream data specs.

The foreign checkpoints are built here from timm's and transformers' own model classes with random weights, and
written as their libraries write them; the oracle is the same library's forward pass.
"""

import json
import math
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tiny import TINY, tiny_world, write_fashion_mnist, fashion_dir, world  # noqa: F401 (fixtures)
from vitlab import cli, data
from vitlab.evaluate import real_accuracy, read_real_labels
from vitlab.model import ConfigError, ViTConfig, VisionTransformer
from vitlab.train import FINE_TUNE, TrainConfig, fine_tune, learning_rate, train
from vitlab.weights import CheckpointError, adapt, load_model, resize_pos_embed, save_checkpoint

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def randomise(model, seed=0, scale=0.2):
    """Random weights everywhere (heads are zero-initialised, which would hide a wrong head mapping)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def max_diff(a, b):
    return (a - b).abs().max().item()


def save_state(state, path):
    """A state dict (or a module's) as one safetensors file, as `safetensors.torch.save_file` writes it."""
    state = state.state_dict() if isinstance(state, torch.nn.Module) else state
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


# --------------------------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# Hugging Face
# --------------------------------------------------------------------------------------------------------------


def hf_config(**kw):
    fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
                  patch_size=4, num_labels=4)
    return transformers.ViTConfig(**dict(fields, **kw))


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


# --------------------------------------------------------------------------------------------------------------
# The fine-tuning head and the schedule
# --------------------------------------------------------------------------------------------------------------


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


def tiny_source(tmp_path, in_chans=1, representation_size=None, zero_head=False):
    """A saved tiny vitlab checkpoint at 16 px (tests/tiny.py's model), random weights."""
    cfg = TrainConfig(**TINY).model_config(num_classes=10)
    cfg = cfg.replace(in_chans=in_chans, mean=None, std=None, representation_size=representation_size)
    model = randomise(VisionTransformer(cfg), seed=8, scale=0.1)
    if zero_head:
        torch.nn.init.zeros_(model.head.weight)
        torch.nn.init.zeros_(model.head.bias)
    return save_checkpoint(model, tmp_path / "source")


def test_gradient_accumulation_equals_the_large_batch_when_fine_tuning(tmp_path):
    source = tiny_source(tmp_path)
    common = dict(init=str(source), data="fashion-mnist", batch_size=32, steps=3, lr=0.1, num_workers=0, crop="none",
                  flip=False)
    train(fine_tune(**common, accum_steps=1, out=str(tmp_path / "large")))
    train(fine_tune(**common, accum_steps=4, out=str(tmp_path / "accumulated")))
    large, accumulated = load_model(tmp_path / "large"), load_model(tmp_path / "accumulated")
    for (k, a), (_, b) in zip(large.state_dict().items(), accumulated.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)


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


def test_real_accuracy_on_a_hand_made_case():
    predictions = [1, 2, 3, 0, 4]
    real = [[1], [0, 2], [], [5], [4, 1]]  # hit, hit, left out, miss, hit
    assert real_accuracy(predictions, real) == (pytest.approx(3 / 4), 4)
    assert math.isnan(real_accuracy([0], [[]])[0])


def test_eval_reports_real_accuracy_in_sorted_file_name_order(tmp_path, capsys):
    root = tmp_path / "imagenet"
    rng = np.random.default_rng(0)
    files = {"train/a/t0.png": 0, "train/b/t1.png": 1,  # the val images: class folders, names out of order
             "val/a/ILSVRC2012_val_00000003.png": 0, "val/a/ILSVRC2012_val_00000001.png": 0,
             "val/b/ILSVRC2012_val_00000002.png": 1, "val/b/ILSVRC2012_val_00000004.png": 1}
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / name)
    model = randomise(VisionTransformer(ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_layers=1,
                                                  num_heads=2, mlp_dim=16, num_classes=2)), seed=10)
    ckpt = save_checkpoint(model, tmp_path / "ck")
    splits = data.build(f"folder:{root}", image_size=(8, 8), in_chans=3, train_transform=data.TrainAug())
    images = torch.stack([image for image, _ in (splits.eval[i] for i in range(4))])
    with torch.no_grad():  # dataset order: a/..01, a/..03, b/..02, b/..04
        predicted = model(data.normalize(images, model.cfg.mean, model.cfg.std)).argmax(-1).tolist()
    real_sorted = [[predicted[0]], [1 - predicted[2]], [predicted[1], 1 - predicted[1]], []]  # files 1, 2, 3, 4
    (tmp_path / "real.json").write_text(json.dumps(real_sorted))
    in_dataset_order = [real_sorted[0], real_sorted[2], real_sorted[1], []]
    assert read_real_labels(tmp_path / "real.json", splits.eval, 2) == in_dataset_order
    assert cli.main(["eval", str(ckpt), "--data", f"folder:{root}", "--real-labels", str(tmp_path / "real.json"),
                     "--json", str(tmp_path / "eval.json")]) == 0
    assert "ReaL top1: 0.6667 (3 images with ReaL labels)" in capsys.readouterr().out  # 1 hit, 1 miss, 1 hit
    assert json.loads((tmp_path / "eval.json").read_text())["real_n"] == 3
    (tmp_path / "short.json").write_text("[[0]]")
    assert cli.main(["eval", str(ckpt), "--data", f"folder:{root}", "--real-labels", str(tmp_path / "short.json")]) == 2
    assert "has 1 entries, the evaluation split 4 images" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# Downstream data specs
# --------------------------------------------------------------------------------------------------------------


class FakeFlowers:
    """torchvision's Flowers102 interface (split, _labels, classes, (PIL image, label) items), no download."""

    classes = [f"flower {i}" for i in range(102)]

    def __init__(self, root, split, download):
        n = {"train": 204, "val": 102, "test": 51}[split]
        self._labels = [i % 102 for i in range(n)]
        self.split = split

    def __len__(self):
        return len(self._labels)

    def __getitem__(self, i):
        return Image.new("RGB", (20 + i % 3, 24), (i % 256, 0, 0)), self._labels[i]


def test_flowers_and_pets_specs(monkeypatch, tmp_path):
    import torchvision.datasets

    monkeypatch.setenv("VITLAB_CACHE_DIR", str(tmp_path))
    assert data.parse_spec("Pets").kind == "pets" and data.parse_spec("flowers102").kind == "flowers102"
    monkeypatch.setattr(torchvision.datasets, "Flowers102", FakeFlowers)
    splits = data.build("flowers102", image_size=(16, 16), in_chans=3, train_transform=None)
    assert (splits.num_classes, splits.train_size, splits.eval_name, len(splits.eval)) == (102, 204, "val", 102)
    assert splits.class_names[3] == "flower 3"
    image, label = splits.train[5]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and label == 5
    assert data.labels_of(splits.train).tolist() == [i % 102 for i in range(204)]
    assert len(data.build("flowers102", image_size=16, in_chans=1, train_transform=None, split="test").eval) == 51

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "OxfordIIITPet", offline)
    with pytest.raises(data.DataError) as error:
        data.build("pets", image_size=16, in_chans=3, train_transform=None)
    assert str(error.value).startswith("could not download pets into ") and "\n" not in str(error.value)
