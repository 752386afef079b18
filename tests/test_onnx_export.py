"""`vitlab export CKPT model.onnx`: onnxruntime's logits against vitlab's and against the official fixtures' own
(float32), any batch size, and the input normalisation in the graph's metadata."""

from __future__ import annotations

import numpy as np
import official
import onnxruntime
import pytest
import torch
from checkpoints import max_diff

from vitlab import cli
from vitlab.onnx_export import INPUT, onnx_metadata
from vitlab.weights import load_model


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_jax_vit", "vit_jax_r1-1_hybrid"])
def test_onnxruntime_reproduces_the_official_logits(tmp_path, capsys, name):
    assert cli.main(["export", str(official.path(name)), str(tmp_path / "model.onnx")]) == 0, capsys.readouterr().err
    assert "ONNX opset 18" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == INPUT and session.get_inputs()[0].shape[0] == "batch"
    x, logits = official.expected(name)
    ours = load_model(official.path(name))
    (theirs,) = session.run(None, {INPUT: x.numpy()})
    with torch.no_grad():
        assert max_diff(torch.from_numpy(theirs), ours(x)) < 1e-4  # onnxruntime = vitlab
    assert max_diff(torch.from_numpy(theirs), logits) < official.TOLERANCE[name]  # = the official code
    five = torch.randn(5, *x.shape[1:])  # another batch size than the export's
    (out,) = session.run(None, {INPUT: five.numpy()})
    with torch.no_grad():
        assert out.shape == (5, 7) and max_diff(torch.from_numpy(out), ours(five)) < 1e-4

    meta = onnx_metadata(tmp_path / "model.onnx")
    assert meta["mean"] == [0.5] * 3 and meta["std"] == [0.5] * 3
    assert meta["image_size"] == official.MANIFEST[name]["image_size"]
    assert meta["vitlab_config"]["hidden_size"] == 32 and "(pixels / 255 - mean) / std" in meta["input"]
    assert np.isfinite(theirs).all()
