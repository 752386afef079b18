"""vitlab checkpoints: the round trip, and the bad ones refused in one line naming the file."""

from __future__ import annotations

import json

import pytest
import torch

from vitlab.common import CheckpointError
from vitlab.model import VisionTransformer, ViTConfig
from vitlab.weights import load_model, save_checkpoint


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
    assert again.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------
# Bad files: one clear error naming the file, nothing unpickled
# ---------------------------------------------------------------------------------------------------------------


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
