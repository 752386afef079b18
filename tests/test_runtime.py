"""vitlab.runtime: the normalisation, the forward pass on uint8 images, eval mode restored."""

from __future__ import annotations

import pytest
import torch

from vitlab import runtime
from vitlab.common import ConfigError
from vitlab.model import VisionTransformer, ViTConfig


def test_normalize():
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1)
    out = runtime.normalize(x, mean=(0.5, 0.5, 0.2), std=(0.5, 0.5, 0.5))
    assert out.dtype == torch.float32 and torch.allclose(out.flatten(), torch.tensor([-1.0, 1.0, 0.0]))


def test_forward_normalises_with_the_models_statistics_on_its_device_and_precision():
    model = VisionTransformer(ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_layers=1, num_heads=2,
                                        mlp_dim=16, num_classes=3, in_chans=1, mean=(0.25,), std=(0.5,))).eval()
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        expected = model((images.float() / 255 - 0.25) / 0.5)
        assert torch.equal(runtime.forward(model, images), expected)
        assert runtime.forward(model, images, "bf16").dtype == torch.bfloat16  # autocast: a bf16 head
        features = runtime.forward(model, images, call=model.forward_features)
    assert features.shape == (2, 5, 16)


def test_eval_mode_restores_the_training_flag_even_on_error():
    model = torch.nn.Linear(2, 2).train()
    with pytest.raises(RuntimeError):
        with runtime.eval_mode(model):
            assert not model.training
            raise RuntimeError
    assert model.training


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_is_bf16_where_the_hardware_computes_in_it(monkeypatch, native):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert runtime.resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert runtime.resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert runtime.resolve_precision("bf16", cpu) == "bf16"  # asked for: honoured, and flagged where emulated
    assert runtime.emulated_bf16("bf16", cpu) is not native
    assert not runtime.emulated_bf16("fp32", cpu) and not runtime.emulated_bf16("bf16", torch.device("cuda"))
    with pytest.raises(ConfigError, match="precision must be"):
        runtime.resolve_precision("fp16", cpu)
