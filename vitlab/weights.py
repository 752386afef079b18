"""Loading and saving weights: vitlab checkpoints, the official `vit_jax` .npz files, position-embedding resizing.

A vitlab checkpoint is a directory with `config.json` (the `ViTConfig`) and `model.safetensors`. Nothing here
ever unpickles a file: safetensors for our weights, `np.load(allow_pickle=False)` for the official ones.

The official layout, and the transposes between it and PyTorch (Flax keeps kernels as (in, out), convolutions
as (H, W, C_in, C_out), and attention projections split per head):

    embedding/kernel (P, P, C, D)                    patch_embed.proj.weight (D, C, P, P)
    cls (1, 1, D)                                    cls_token
    Transformer/posembed_input/pos_embedding         pos_embed (1, N+1, D)
    Transformer/encoderblock_i/LayerNorm_0           blocks.i.norm1            (scale -> weight)
      MultiHeadDotProductAttention_1/{query,key,value}/kernel (D, H, D_h)   blocks.i.attn.qkv (3D, D), fused
      MultiHeadDotProductAttention_1/out/kernel (H, D_h, D)                 blocks.i.attn.proj (D, D)
      LayerNorm_2                                    blocks.i.norm2
      MlpBlock_3/Dense_{0,1}                         blocks.i.mlp.fc{1,2}
    Transformer/encoder_norm                         norm
    pre_logits/kernel (D, R)                         pre_logits.fc
    head/kernel (R or D, K)                          head
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import nn

from .model import ConfigError, ViTConfig, VisionTransformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


# --------------------------------------------------------------------------------------------------------------
# Atomic writes: a process killed at any moment leaves either the old file or the new one, never half of one.
# --------------------------------------------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call `write(tmp_path)`, flush it to disk, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file owner-only; a checkpoint is an ordinary file
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


# --------------------------------------------------------------------------------------------------------------
# vitlab checkpoints
# --------------------------------------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def save_checkpoint(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write `config.json` and `model.safetensors` into `directory`, each atomically."""
    model = unwrap(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_safetensors(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(directory / CONFIG_FILE, json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    return directory


def read_config(directory: str | os.PathLike) -> ViTConfig:
    """The `ViTConfig` saved in a checkpoint directory."""
    path = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: not a vitlab checkpoint (no {CONFIG_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    try:
        return ViTConfig.from_dict(data)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    try:
        return load_safetensors(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


# --------------------------------------------------------------------------------------------------------------
# Official npz files (vit_jax layout)
# --------------------------------------------------------------------------------------------------------------

_BLOCK = "Transformer/encoderblock_{}/"
_MHA = "MultiHeadDotProductAttention_1/"


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an .npz file, never unpickling; a CheckpointError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # every .npz is a zip archive
        raise CheckpointError(f"{path}: not an .npz archive (it does not start like a zip file)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise CheckpointError(f"{path}: a single .npy array, not an .npz archive of named arrays")
            return {k: npz[k] for k in npz.files}
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable .npz file ({str(e).splitlines()[0] or type(e).__name__})") from None


def _require(arrays: dict, key: str, path, ndim: int) -> np.ndarray:
    if key not in arrays:
        raise CheckpointError(f"{path}: missing array {key!r}: not an official ViT checkpoint")
    a = arrays[key]
    if a.ndim != ndim:
        raise CheckpointError(f"{path}: array {key!r} has shape {a.shape}, expected {ndim} dimensions")
    return a


def npz_config(arrays: dict[str, np.ndarray], path="npz", source_grid: tuple[int, int] | None = None) -> ViTConfig:
    """The configuration of an official checkpoint, read from its array shapes."""
    ph, pw, C, D = _require(arrays, "embedding/kernel", path, 4).shape
    layers = sorted(int(m.group(1)) for k in arrays if (m := re.match(r"Transformer/encoderblock_(\d+)/LayerNorm_0/scale$", k)))
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(f"{path}: encoder blocks {layers} are not numbered 0..L-1")
    _, H, Dh = _require(arrays, _BLOCK.format(0) + _MHA + "query/kernel", path, 3).shape
    mlp_dim = _require(arrays, _BLOCK.format(0) + "MlpBlock_3/Dense_0/kernel", path, 2).shape[1]
    classifier = "token" if "cls" in arrays else "gap"
    representation_size = arrays["pre_logits/kernel"].shape[1] if "pre_logits/kernel" in arrays else None
    num_classes = arrays["head/kernel"].shape[1] if "head/kernel" in arrays else 0
    tokens = _require(arrays, "Transformer/posembed_input/pos_embedding", path, 3).shape[1]
    num_patches = tokens - (classifier == "token")
    if source_grid is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise CheckpointError(
                f"{path}: {num_patches} position embeddings do not form a square grid; pass the source grid"
            )
        source_grid = (side, side)
    if source_grid[0] * source_grid[1] != num_patches:
        raise CheckpointError(f"{path}: grid {source_grid} does not hold {num_patches} position embeddings")
    try:
        return ViTConfig(
            image_size=(source_grid[0] * ph, source_grid[1] * pw),
            patch_size=(ph, pw),
            in_chans=C,
            num_classes=num_classes,
            hidden_size=D,
            num_layers=len(layers),
            num_heads=H,
            mlp_dim=mlp_dim,
            classifier=classifier,
            representation_size=representation_size,
            gelu="tanh",
            mean=(0.5,) * C,  # the official input pipeline maps pixels to [-1, 1]
            std=(0.5,) * C,
        )
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def npz_to_state_dict(arrays: dict[str, np.ndarray], cfg: ViTConfig) -> dict[str, torch.Tensor]:
    """Map official arrays onto vitlab's parameter names, transposing Flax layouts to PyTorch's."""

    def t(key):  # float32 tensor of an array
        return torch.from_numpy(np.asarray(arrays[key], dtype=np.float32))

    D = cfg.hidden_size
    sd = {
        "patch_embed.proj.weight": t("embedding/kernel").permute(3, 2, 0, 1),  # (P,P,C,D) -> (D,C,P,P)
        "patch_embed.proj.bias": t("embedding/bias"),
        "pos_embed": t("Transformer/posembed_input/pos_embedding"),
        "norm.weight": t("Transformer/encoder_norm/scale"),
        "norm.bias": t("Transformer/encoder_norm/bias"),
    }
    if cfg.classifier == "token":
        sd["cls_token"] = t("cls")
    for i in range(cfg.num_layers):
        b, a, m = _BLOCK.format(i), _BLOCK.format(i) + _MHA, _BLOCK.format(i) + "MlpBlock_3/"
        sd.update({
            f"blocks.{i}.norm1.weight": t(b + "LayerNorm_0/scale"),
            f"blocks.{i}.norm1.bias": t(b + "LayerNorm_0/bias"),
            # (D, H, D_h) -> (H*D_h, D) for each of q, k, v, stacked into the fused projection
            f"blocks.{i}.attn.qkv.weight": torch.cat([t(a + n + "/kernel").reshape(D, D).T for n in ("query", "key", "value")]),
            f"blocks.{i}.attn.qkv.bias": torch.cat([t(a + n + "/bias").reshape(D) for n in ("query", "key", "value")]),
            f"blocks.{i}.attn.proj.weight": t(a + "out/kernel").reshape(D, D).T,  # (H, D_h, D) -> (D, H*D_h)
            f"blocks.{i}.attn.proj.bias": t(a + "out/bias"),
            f"blocks.{i}.norm2.weight": t(b + "LayerNorm_2/scale"),
            f"blocks.{i}.norm2.bias": t(b + "LayerNorm_2/bias"),
            f"blocks.{i}.mlp.fc1.weight": t(m + "Dense_0/kernel").T,
            f"blocks.{i}.mlp.fc1.bias": t(m + "Dense_0/bias"),
            f"blocks.{i}.mlp.fc2.weight": t(m + "Dense_1/kernel").T,
            f"blocks.{i}.mlp.fc2.bias": t(m + "Dense_1/bias"),
        })
    if cfg.representation_size:
        sd["pre_logits.fc.weight"] = t("pre_logits/kernel").T
        sd["pre_logits.fc.bias"] = t("pre_logits/bias")
    if cfg.num_classes:
        sd["head.weight"] = t("head/kernel").T
        sd["head.bias"] = t("head/bias")
    return {k: v.contiguous() for k, v in sd.items()}


def state_dict_to_npz(model: nn.Module) -> dict[str, np.ndarray]:
    """The official arrays of a model: the inverse of `npz_to_state_dict`."""
    model = unwrap(model)
    cfg: ViTConfig = model.cfg
    sd = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in model.state_dict().items()}
    D, H = cfg.hidden_size, cfg.num_heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    if cfg.classifier == "token":
        out["cls"] = sd["cls_token"]
    for i in range(cfg.num_layers):
        b, a, m = _BLOCK.format(i), _BLOCK.format(i) + _MHA, _BLOCK.format(i) + "MlpBlock_3/"
        p = f"blocks.{i}."
        qkv_w = np.split(sd[p + "attn.qkv.weight"], 3)
        qkv_b = np.split(sd[p + "attn.qkv.bias"], 3)
        for n, w, bias in zip(("query", "key", "value"), qkv_w, qkv_b):
            out[a + n + "/kernel"] = w.T.reshape(D, H, D // H)
            out[a + n + "/bias"] = bias.reshape(H, D // H)
        out[a + "out/kernel"] = sd[p + "attn.proj.weight"].T.reshape(H, D // H, D)
        out[a + "out/bias"] = sd[p + "attn.proj.bias"]
        out[b + "LayerNorm_0/scale"] = sd[p + "norm1.weight"]
        out[b + "LayerNorm_0/bias"] = sd[p + "norm1.bias"]
        out[b + "LayerNorm_2/scale"] = sd[p + "norm2.weight"]
        out[b + "LayerNorm_2/bias"] = sd[p + "norm2.bias"]
        out[m + "Dense_0/kernel"] = sd[p + "mlp.fc1.weight"].T
        out[m + "Dense_0/bias"] = sd[p + "mlp.fc1.bias"]
        out[m + "Dense_1/kernel"] = sd[p + "mlp.fc2.weight"].T
        out[m + "Dense_1/bias"] = sd[p + "mlp.fc2.bias"]
    if cfg.representation_size:
        out["pre_logits/kernel"] = sd["pre_logits.fc.weight"].T
        out["pre_logits/bias"] = sd["pre_logits.fc.bias"]
    if cfg.num_classes:
        out["head/kernel"] = sd["head.weight"].T
        out["head/bias"] = sd["head.bias"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def export_npz(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a model in the official vit_jax .npz layout (atomically)."""
    arrays = state_dict_to_npz(model)
    path = Path(path)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)
    return path


# --------------------------------------------------------------------------------------------------------------
# Resolution change (section 3.2, "Fine-tuning and higher resolution")
# --------------------------------------------------------------------------------------------------------------


def resize_pos_embed(
    pos_embed: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Resize (1, prefix + h*w, D) position embeddings to a new grid by 2-D interpolation.

    The [class] token's embedding is kept apart, unchanged. "bilinear" is the official code's
    `scipy.ndimage.zoom(grid, zoom, order=1)`: linear interpolation whose corner samples land on the old corners,
    i.e. `align_corners=True`. "bicubic" is timm's choice (align_corners=False). The same grid returns the input.
    """
    if mode not in ("bilinear", "bicubic"):
        raise ConfigError(f"pos_embed interpolation must be 'bilinear' or 'bicubic', got {mode!r}")
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    n = pos_embed.shape[1] - num_prefix_tokens
    if old_grid[0] * old_grid[1] != n:
        raise CheckpointError(f"position embeddings: {n} grid tokens do not fit grid {old_grid}")
    if old_grid == new_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    D = grid.shape[-1]
    grid = grid.reshape(1, *old_grid, D).permute(0, 3, 1, 2).float()  # (1, D, h, w)
    grid = F.interpolate(grid, size=new_grid, mode=mode, align_corners=(mode == "bilinear"))
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


# --------------------------------------------------------------------------------------------------------------
# One entry point for every source
# --------------------------------------------------------------------------------------------------------------


def _fit_state_dict(sd: dict[str, torch.Tensor], cfg: ViTConfig, source) -> VisionTransformer:
    """Build the model `cfg` describes and load `sd` into it, resizing the position grid when it changed."""
    model = VisionTransformer(cfg)
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


def load_model(
    source: str | os.PathLike,
    image_size: int | tuple[int, int] | None = None,
    num_classes: int | None = None,
    *,
    gelu: str | None = None,
    pos_embed_interp: str = "bilinear",
    source_grid: tuple[int, int] | None = None,
    **overrides,
) -> VisionTransformer:
    """A model in eval mode from a vitlab checkpoint directory or an official .npz file.

    `image_size` resizes the position embeddings in 2-D; `num_classes` replaces the head by a new zero-initialised
    one when it differs from the checkpoint's; `gelu="exact"` for weights trained with exact GELU (timm, HF).
    """
    path = Path(source)
    if path.is_dir():
        cfg = read_config(path)
        sd = read_safetensors(path / WEIGHTS_FILE)
    elif path.suffix == ".npz":
        arrays = read_npz(path)
        cfg = npz_config(arrays, path, source_grid)
        try:
            sd = npz_to_state_dict(arrays, cfg)
        except KeyError as e:
            raise CheckpointError(f"{path}: missing array {e.args[0]!r}: not a complete ViT checkpoint") from None
        except RuntimeError as e:  # a reshape that does not fit: one layer's arrays disagree with the others
            raise CheckpointError(f"{path}: arrays do not fit one ViT ({str(e).splitlines()[0]})") from None
    elif not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    else:
        raise CheckpointError(f"{path}: not a vitlab checkpoint directory or an official .npz file")

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


@torch.no_grad()
def adapt(model: VisionTransformer, *, pos_embed_interp: str = "bilinear", **changes) -> VisionTransformer:
    """The same weights in a model with some config fields changed: a new resolution (the position embeddings
    interpolated in 2-D), a new number of classes (a fresh zero head, as for fine-tuning), dropout, GELU form."""
    model = unwrap(model)
    old = model.cfg
    try:
        new = old.replace(**changes)
    except ConfigError as e:
        raise ConfigError(f"cannot adapt {old.name or 'the model'}: {e}") from None
    architecture = ("patch_size", "in_chans", "hidden_size", "num_layers", "num_heads", "mlp_dim", "classifier", "representation_size")
    for field in architecture:
        if getattr(new, field) != getattr(old, field):
            raise ConfigError(f"{field} cannot change on loaded weights ({getattr(old, field)} -> {getattr(new, field)})")
    out = VisionTransformer(new)
    sd = dict(model.state_dict())
    sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], old.grid_size, new.grid_size, old.num_prefix_tokens, pos_embed_interp)
    if new.num_classes != old.num_classes:
        for k in [k for k in sd if k.startswith("head.")]:
            del sd[k]
        sd.update({k: v for k, v in out.state_dict().items() if k.startswith("head.")})
    out.load_state_dict(sd)
    return out.train(model.training)
