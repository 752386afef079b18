"""vitlab checkpoints, and `load_model`: one entry point for every checkpoint vitlab reads.

A vitlab checkpoint is a directory with `config.json` (the `ViTConfig`, or a BiT `ResNetConfig`) and
`model.safetensors`. `load_model` also reads the official `vit_jax` .npz files and BiT's (vitlab.formats), timm's
and Hugging Face's ViTs (vitlab.timm_hf), any of those on the Hugging Face hub as `hf-hub:ORG/NAME` (vitlab.hub),
and adapts what it loaded to a new resolution or head (vitlab.transfer). Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file as save_safetensors
from torch import nn

from .common import CheckpointError, ConfigError, atomic_write, atomic_write_text
from .formats import CONFIG_FILE, NPZ_LAYOUTS, PICKLED, WEIGHTS_FILE, import_npz, read_json, read_safetensors
from .hub import is_hub_id, snapshot
from .model import ViTConfig, VisionTransformer, build_model, config_from_dict
from .resnet import ResNetConfig
from .runtime import unwrap
from .timm_hf import SAFETENSORS_LAYOUTS, import_safetensors, is_foreign, weights_in
from .transfer import adapt


def save_checkpoint(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write `config.json` and `model.safetensors` into `directory`, each atomically."""
    model = unwrap(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_safetensors(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(directory / CONFIG_FILE, json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    return directory


def read_config(directory: str | os.PathLike) -> ViTConfig | ResNetConfig:
    """The config saved in a checkpoint directory: a `ViTConfig`, or a `ResNetConfig` for a BiT ResNet."""
    path = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: not a vitlab checkpoint (no {CONFIG_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None



def _fit_state_dict(sd: dict[str, torch.Tensor], cfg, source) -> nn.Module:
    """Build the model `cfg` describes and load `sd` into it."""
    model = build_model(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not fit the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for k, v in expected.items():
        if sd[k].shape != v.shape:
            raise CheckpointError(f"{source}: {k} has shape {tuple(sd[k].shape)} in the file, the model wants {tuple(v.shape)}")
    model.load_state_dict(sd)
    return model


def _read_source(path: Path, source_grid, num_heads) -> tuple[ViTConfig, dict[str, torch.Tensor], str]:
    """(config, vitlab weights, kind) of any source: "vitlab", "npz", "bit", "timm" or "hf"."""
    if path.is_dir():
        meta = read_json(path / CONFIG_FILE)
        if is_foreign(meta) or (meta is None and any(path.glob("*.safetensors*"))):
            return import_safetensors(weights_in(path), meta, path, source_grid=source_grid, num_heads=num_heads,
                                      preprocessor=read_json(path / "preprocessor_config.json"))
        if meta is None and any(f.suffix in PICKLED for f in path.iterdir()):
            weights_in(path)  # refuses, naming the pickled files
        return read_config(path), read_safetensors(path / WEIGHTS_FILE), "vitlab"
    if path.suffix in PICKLED:
        raise CheckpointError(f"{path}: a pickled checkpoint; vitlab reads safetensors only and never unpickles a file")
    magic = None if path.suffix in (".npz", ".safetensors") else _magic(path)  # else its first bytes say what it is
    if path.suffix == ".npz" or magic == "npz":
        return import_npz(path, source_grid)
    if path.suffix == ".safetensors" or magic == "safetensors":  # the config.json beside it, if any, says whose
        meta = read_json(path.parent / CONFIG_FILE)
        if meta is not None and not is_foreign(meta):
            return read_config(path.parent), read_safetensors(path), "vitlab"
        return import_safetensors(read_safetensors(path), meta, path, source_grid=source_grid, num_heads=num_heads,
                                  preprocessor=read_json(path.parent / "preprocessor_config.json"))
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    raise CheckpointError(f"{path}: not a checkpoint layout vitlab knows (neither an .npz archive nor safetensors); "
                          f"known: a checkpoint directory, hf-hub:ORG/NAME, .npz files ({NPZ_LAYOUTS}), "
                          f".safetensors files ({SAFETENSORS_LAYOUTS})")


def _magic(path: Path) -> str | None:
    """What a file's first bytes say it is: "npz" (a zip archive), "safetensors" (a length, then a JSON header)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return None
    if head[:4] == b"PK\x03\x04":
        return "npz"
    return "safetensors" if len(head) == 9 and head[8:9] == b"{" else None


def load_model(
    source: str | os.PathLike,
    image_size: int | tuple[int, int] | None = None,
    num_classes: int | None = None,
    *,
    gelu: str | None = None,
    pos_embed_interp: str = "bilinear",
    source_grid: tuple[int, int] | None = None,
    num_heads: int | None = None,
    **overrides,
) -> VisionTransformer:
    """A model in eval mode from a vitlab checkpoint directory, an official .npz file (ViT, hybrid or BiT), a timm
    or Hugging Face ViT in safetensors (a file, or a directory with the config.json its library wrote), or any of
    these on the Hugging Face hub, `hf-hub:ORG/NAME`.

    `image_size` resizes the position embeddings in 2-D; `num_classes` replaces the head by a new zero-initialised
    one when it differs from the checkpoint's; `gelu="exact"` for official weights run as timm runs them.
    `num_heads` for timm or Hugging Face weights without a config.json whose width is not 64 per head.
    """
    path = snapshot(source) if is_hub_id(source) else Path(source)
    cfg, sd, _ = _read_source(path, source_grid, num_heads)
    model = _fit_state_dict(sd, cfg, path)
    changes = dict(overrides)
    if gelu is not None:
        changes["gelu"] = gelu
    if image_size is not None:
        changes["image_size"] = image_size
    if num_classes is not None and num_classes != cfg.num_classes:
        changes["num_classes"] = num_classes
        changes["class_names"] = None
    if changes:
        model = adapt(model, pos_embed_interp=pos_embed_interp, **changes)
    return model.eval()
