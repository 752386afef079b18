"""Checkpoints of other libraries and small vitlab ones, built in the tests: random weights everywhere (a head left
at zero would hide a wrong head mapping), saved as their libraries save them."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from tiny import TINY

from vitlab.config import TrainConfig
from vitlab.model import VisionTransformer
from vitlab.weights import save_checkpoint


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


def hf_config(**kw):
    fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
                  patch_size=4, num_labels=4)
    return transformers.ViTConfig(**dict(fields, **kw))


def tiny_source(tmp_path, in_chans=1, representation_size=None, zero_head=False):
    """A saved tiny vitlab checkpoint at 16 px (tests/tiny.py's model), random weights."""
    cfg = TrainConfig(**TINY).model_config(num_classes=10)
    cfg = cfg.replace(in_chans=in_chans, mean=None, std=None, representation_size=representation_size)
    model = randomise(VisionTransformer(cfg), seed=8, scale=0.1)
    if zero_head:
        torch.nn.init.zeros_(model.head.weight)
        torch.nn.init.zeros_(model.head.bias)
    return save_checkpoint(model, tmp_path / "source")


class Payload:
    """An object whose unpickling writes a file: proof that a file was unpickled."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (Path.write_text, (Path(self.sentinel), "unpickled"))
