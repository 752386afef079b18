"""The checkpoint fixtures written by the code that writes the real files (tests/fixtures/make_official.py, run by
hand): vit_jax's ViTs and hybrids, BiT, timm and transformers, each with the logits its own library computed.

This module only reads them: their paths, their configurations as MANIFEST.json records them (the known answers of
the configuration vitlab reads from the arrays), their expected logits, and copies of their arrays that a test may
change to make a broken file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).parent / "fixtures" / "official"
MANIFEST: dict[str, dict] = json.loads((FIXTURES / "MANIFEST.json").read_text())["fixtures"]
VIT_JAX = [name for name in MANIFEST if name.startswith("vit_jax_")]
HYBRIDS = [name for name in VIT_JAX if "resnet" in MANIFEST[name]]
# The largest logit difference allowed against a fixture's own library, float32: 2e-4 where a ResNet runs.
TOLERANCE = {name: 2e-4 if "resnet" in m or name.startswith("big_transfer") else 1e-4 for name, m in MANIFEST.items()}


def path(name: str) -> Path:
    """The fixture's file (.npz) or directory (timm's and transformers' config.json + model.safetensors)."""
    return FIXTURES / name if (FIXTURES / name).is_dir() else FIXTURES / f"{name}.npz"


def copy(name: str, directory: Path) -> Path:
    """A copy of the fixture in `directory` (to write beside it or change it)."""
    source = path(name)
    target = directory / source.name
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copyfile(source, target)
    return target


def expected(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (B, C, H, W) already normalised, the logits its library computed for them)."""
    with np.load(FIXTURES / MANIFEST[name].get("logits", f"{name}.logits.npz")) as f:
        return torch.from_numpy(f["inputs"]), torch.from_numpy(f["logits"])


def arrays(name: str) -> dict[str, np.ndarray]:
    with np.load(path(name), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


def grid(name: str) -> tuple[int, int] | None:
    """The patch grid of a plain ViT fixture, which the file does not record (None for a hybrid: its grids are
    square)."""
    m = MANIFEST[name]
    if name not in VIT_JAX or "resnet" in m:
        return None
    return (m["image_size"][0] // m["patch"][0], m["image_size"][1] // m["patch"][1])


# The published files' (pre-Linen) names of an encoder block's parts, for today's (Linen) ones: what
# `vit_jax/checkpoint.load` (flax's convert_pre_linen) undoes, written out here as the known answer.
LINEN_TO_PUBLISHED = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1", "LayerNorm_1": "LayerNorm_2",
                      "MlpBlock_0": "MlpBlock_3"}


def published(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A Linen fixture's arrays under the published names, GroupNorm arrays (1, 1, 1, C) as the published files
    have them."""
    out = {}
    for key, value in arrays.items():
        parts = key.split("/")
        if parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
            parts[2] = LINEN_TO_PUBLISHED.get(parts[2], parts[2])
        if len(parts) > 1 and parts[-2].startswith("gn") and parts[-1] in ("scale", "bias"):
            value = value.reshape(1, 1, 1, -1)
        out["/".join(parts)] = value
    return out
