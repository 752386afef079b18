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

A hybrid's npz (R50+ViT-B_16.npz) adds its ResNet stem, whose arrays also give its configuration (the width
from conv_root, the stages and their units from the blockI/unitJ names), and its `embedding` reads the stem's
feature map:

    conv_root/kernel (7, 7, C, w)                    patch_embed.backbone.conv_root.weight (w, C, 7, 7)
    gn_root/{scale,bias}                             patch_embed.backbone.gn_root.{weight,bias}
    blockI/unitJ/{conv1,conv2,conv3,conv_proj}/kernel   patch_embed.backbone.stages.(I-1).units.(J-1).<same>
    blockI/unitJ/{gn1,gn2,gn3,gn_proj}/{scale,bias}     patch_embed.backbone.stages.(I-1).units.(J-1).<same>

timm and Hugging Face checkpoints (safetensors, with the `config.json` their libraries write beside them) are
imported too; `load_model` tells the three namings apart. timm's names are vitlab's own (vitlab took them from
timm); what differs is the exact GELU and the input normalisation in its `pretrained_cfg`. Hugging Face's
(`ViTForImageClassification` has the `vit.` prefix, `ViTModel` none and optionally a pooler):

    embeddings.cls_token                             cls_token
    embeddings.position_embeddings                   pos_embed
    embeddings.patch_embeddings.projection           patch_embed.proj
    encoder.layer.i.layernorm_before                 blocks.i.norm1
    encoder.layer.i.attention.attention.{query,key,value}   blocks.i.attn.qkv, the three stacked on the output axis
    encoder.layer.i.attention.output.dense           blocks.i.attn.proj
    encoder.layer.i.layernorm_after                  blocks.i.norm2
    encoder.layer.i.intermediate.dense               blocks.i.mlp.fc1
    encoder.layer.i.output.dense                     blocks.i.mlp.fc2
    layernorm                                        norm
    pooler.dense (then tanh)                         pre_logits.fc: the pooler *is* the pre-logits layer
    classifier                                       head
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

from .model import ConfigError, ViTConfig, VisionTransformer, build_model, config_from_dict
from .resnet import ResNetConfig, hybrid_channels, hybrid_stride

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
    source_grid = _source_grid(tokens - (classifier == "token"), path, source_grid, (ph, pw))
    hybrid, stride = {}, 1
    if "conv_root/kernel" in arrays:  # a hybrid: the stem's shape is in its arrays
        in_chans, width = _require(arrays, "conv_root/kernel", path, 4).shape[2:]
        units: dict[int, set[int]] = {}
        for k in arrays:
            if m := re.match(r"block(\d+)/unit(\d+)/conv1/kernel$", k):
                units.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        stages = sorted(units)
        if stages != list(range(1, len(stages) + 1)) or any(
                sorted(units[i]) != list(range(1, len(units[i]) + 1)) for i in stages):
            raise CheckpointError(f"{path}: the ResNet stem's blocks and units {dict(sorted(units.items()))} are not "
                                  "numbered 1..n")
        num_layers = tuple(len(units[i]) for i in stages)
        hybrid = dict(resnet_num_layers=num_layers, resnet_width_factor=width / 64)
        stride = hybrid_stride(num_layers)
        if C != hybrid_channels(num_layers, width / 64):
            raise CheckpointError(f"{path}: embedding/kernel reads {C} channels, the ResNet stem of {num_layers} "
                                  f"units and width {width} gives {hybrid_channels(num_layers, width / 64)}")
        C = in_chans  # the image's, not the feature map's
    try:
        return ViTConfig(
            image_size=(source_grid[0] * ph * stride, source_grid[1] * pw * stride),
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
            **hybrid,
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
    for name, key in _stem_names(cfg).items():  # a projection the stem needs but the file lacks: a missing key
        if key in arrays:
            sd[name] = t(key).permute(3, 2, 0, 1) if key.endswith("/kernel") else t(key)  # (h, w, in, out) -> (out, in, h, w)
    return {k: v.contiguous() for k, v in sd.items()}


def _stem_names(cfg: ViTConfig) -> dict[str, str]:
    """vitlab name -> official name of every array a hybrid's ResNet stem can have ({} for a plain ViT): each
    stage's first unit listed with its projection, which it has when it changes the width or the stride."""
    if cfg.resnet_num_layers is None:
        return {}
    out = {"patch_embed.backbone.conv_root.weight": "conv_root/kernel",
           "patch_embed.backbone.gn_root.weight": "gn_root/scale", "patch_embed.backbone.gn_root.bias": "gn_root/bias"}
    for i, units in enumerate(cfg.resnet_num_layers):
        for j in range(units):
            ours, theirs = f"patch_embed.backbone.stages.{i}.units.{j}.", f"block{i + 1}/unit{j + 1}/"
            for conv in ["conv1", "conv2", "conv3"] + (["conv_proj"] if j == 0 else []):
                gn = conv.replace("conv", "gn")
                out[ours + conv + ".weight"] = theirs + conv + "/kernel"
                out[ours + gn + ".weight"] = theirs + gn + "/scale"
                out[ours + gn + ".bias"] = theirs + gn + "/bias"
    return out


def state_dict_to_npz(model: nn.Module) -> dict[str, np.ndarray]:
    """The official arrays of a model: the inverse of `npz_to_state_dict`. (The official layout has no place for
    a BiT ResNet's or for the masked-patch-prediction head's weights: the latter are left out.)"""
    model = unwrap(model)
    cfg: ViTConfig = model.cfg
    if not isinstance(cfg, ViTConfig):
        raise ConfigError(f"{cfg.name or 'this model'} is not a ViT: the official npz layout holds ViTs only")
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
    for name, key in _stem_names(cfg).items():
        if name in sd:
            out[key] = sd[name].transpose(2, 3, 1, 0) if key.endswith("/kernel") else sd[name]
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
# timm and Hugging Face checkpoints
# --------------------------------------------------------------------------------------------------------------

# Every ViT of the paper has heads of 64 dimensions except ViT-H, 16 heads of 80 (Table 1). The number of heads
# leaves no trace in the shapes of fused or per-projection (D, D) weights, so it comes from the config.json beside
# the weights, else from this rule.
_WIDTH_TO_HEADS = {1280: 16}


def _infer_heads(width: int, path, given: int | None) -> int:
    if given:
        return int(given)
    if width in _WIDTH_TO_HEADS:
        return _WIDTH_TO_HEADS[width]
    if width % 64:
        raise CheckpointError(f"{path}: the number of heads is not in the weights and width {width} is not a "
                              "multiple of 64: pass num_heads")
    return width // 64


def _variant_name(cfg: ViTConfig) -> str | None:
    """"ViT-B/16" when the widths are one of the paper's variants (square patches), else None."""
    from .model import VARIANTS

    for size, fields in VARIANTS.items():
        if all(getattr(cfg, k) == v for k, v in fields.items()) and cfg.patch_size[0] == cfg.patch_size[1]:
            return f"ViT-{size}/{cfg.patch_size[0]}"
    return None


def _source_grid(num_patches: int, path, source_grid, patch: tuple[int, int], image_size=None) -> tuple[int, int]:
    """The patch grid of `num_patches` position embeddings: given, else from the image size the source's config
    names, else a square."""
    if source_grid is None and image_size is not None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)[-2:]
        if h % patch[0] == 0 and w % patch[1] == 0 and (h // patch[0]) * (w // patch[1]) == num_patches:
            source_grid = (h // patch[0], w // patch[1])
    if source_grid is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise CheckpointError(
                f"{path}: {num_patches} position embeddings do not form a square grid; pass the source grid"
            )
        source_grid = (side, side)
    source_grid = tuple(source_grid)
    if source_grid[0] * source_grid[1] != num_patches:
        raise CheckpointError(f"{path}: grid {source_grid} does not hold {num_patches} position embeddings")
    return source_grid


def _layer_count(keys, pattern: str, path) -> int:
    layers = sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})
    if not layers:
        raise CheckpointError(f"{path}: no encoder layers found")
    return layers[-1] + 1  # layers missing in between are reported as missing keys


def _shown(keys: list[str], limit: int = 8) -> str:
    return "[" + ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "") + "]"


def _map_names(sd: dict[str, torch.Tensor], table: dict[str, list[str]], path, what: str,
               ignored: tuple[str, ...] = (), hints: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """vitlab's state dict from `sd` through `table` (vitlab name -> the source names stacked into it).

    All or nothing: every source name the table wants must be there and every tensor of the file must be used
    (but the `ignored` ones), else a CheckpointError lists the missing and the unexpected names.
    """
    wanted = {name for names in table.values() for name in names}
    missing = sorted(wanted - set(sd))
    unexpected = sorted(k for k in set(sd) - wanted if not any(k.endswith(i) for i in ignored))
    if missing or unexpected:
        notes = sorted({note for key, note in (hints or {}).items() if any(key in k for k in unexpected + missing)})
        raise CheckpointError(
            f"{path}: not a {what} vitlab can load, nothing loaded: missing {_shown(missing)}, unexpected "
            f"{_shown(unexpected)}" + "".join(f"; {n}" for n in notes)
        )
    out = {}
    for name, names in table.items():
        parts = [sd[n].float() for n in names]
        if len(parts) > 1 and len({tuple(p.shape) for p in parts}) > 1:
            raise CheckpointError(f"{path}: {', '.join(names)} differ in shape ({[tuple(p.shape) for p in parts]})")
        out[name] = (torch.cat(parts) if len(parts) > 1 else parts[0]).contiguous()
    return out


def _vit_table(cfg: ViTConfig, names: dict[str, str], block, head: str | None,
               pre_logits: str | None) -> dict[str, list[str]]:
    """The name table of a ViT: `names` maps vitlab's per-model names, `block` formats per-layer source names."""
    table = {k: [v] for k, v in names.items()}
    for i in range(cfg.num_layers):
        for ours, theirs in block(i).items():
            table[f"blocks.{i}.{ours}"] = theirs if isinstance(theirs, list) else [theirs]
    if cfg.classifier != "token":
        table.pop("cls_token", None)
    for prefix, source in (("pre_logits.fc", pre_logits if cfg.representation_size else None),
                           ("head", head if cfg.num_classes else None)):
        if source:
            table[f"{prefix}.weight"], table[f"{prefix}.bias"] = [f"{source}.weight"], [f"{source}.bias"]
    return table


def _weight_pairs(mapping: dict[str, str]) -> dict[str, str]:
    return {f"{a}.{p}": f"{b}.{p}" for a, b in mapping.items() for p in ("weight", "bias")}


# timm: the names that make a timm ViT something vitlab does not compute, and why.
_TIMM_HINTS = {
    "fc_norm": "timm's avg-pool models apply LayerNorm after pooling (fc_norm); vitlab's gap pools after the "
               "encoder's LayerNorm, so they are refused",
    "ls1.": "layer scale (init_values) is not part of the paper's ViT",
    "reg_token": "register tokens are not part of the paper's ViT",
    "attn_pool": "attention pooling (global_pool='map') is not part of the paper's ViT",
    "norm_pre": "a LayerNorm before the encoder (pre_norm, CLIP) is not part of the paper's ViT",
    "q_norm": "query/key normalisation is not part of the paper's ViT",
    "qkv.bias": "attention without biases (qkv_bias=False) is not part of the paper's ViT",
}


def timm_to_state_dict(sd: dict[str, torch.Tensor], meta: dict | None = None, path="timm",
                       source_grid: tuple[int, int] | None = None,
                       num_heads: int | None = None) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """The config and vitlab weights of a timm `VisionTransformer` state dict (`meta`: timm's config.json).

    Token-pooling ViTs load, and avg-pooling ones without a [class] token or fc_norm (the official "gap"
    models); refused with the reason: fc_norm, avg pooling beside a [class] token, attention pooling, layer
    scale, registers, pre-norm, q/k norm, no biases, position embeddings without the [class] token's.
    GELU is exact and LayerNorm eps 1e-6 (timm's ViT); mean and std from `pretrained_cfg`, else 0.5, the
    official models' [-1, 1] (DeiT-style weights want ImageNet's statistics: pass mean and std).
    """
    meta = meta or {}
    args = meta.get("model_args") or {}
    pretrained = meta.get("pretrained_cfg") or {}
    pool = args.get("global_pool", meta.get("global_pool"))
    has_cls = "cls_token" in sd
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        raise CheckpointError(f"{path}: no patch_embed.proj.weight or pos_embed: not a timm VisionTransformer")
    if pool not in (None, "", "token", "avg"):
        raise CheckpointError(f"{path}: timm global_pool={pool!r}: vitlab pools by the [class] token or the mean")
    if pool == "avg" and has_cls:
        raise CheckpointError(f"{path}: timm global_pool='avg' beside a [class] token: vitlab's gap models have "
                              "no [class] token")
    if args.get("no_embed_class"):
        raise CheckpointError(f"{path}: timm no_embed_class: the [class] token has no position embedding here")
    act = args.get("act_layer", "gelu")
    if act not in ("gelu", "gelu_tanh"):
        raise CheckpointError(f"{path}: timm act_layer={act!r}: vitlab's MLP uses GELU")
    D, C, ph, pw = sd["patch_embed.proj.weight"].shape
    prefix = int(has_cls)
    grid = _source_grid(sd["pos_embed"].shape[1] - prefix, path, source_grid, (ph, pw),
                        pretrained.get("input_size") or args.get("img_size"))
    num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    mean, std = pretrained.get("mean"), pretrained.get("std")
    labels = meta.get("label_names")
    try:
        cfg = ViTConfig(
            image_size=(grid[0] * ph, grid[1] * pw), patch_size=(ph, pw), in_chans=C, num_classes=num_classes,
            hidden_size=D, num_layers=_layer_count(sd, r"blocks\.(\d+)\.", path),
            num_heads=_infer_heads(D, path, num_heads or args.get("num_heads")),
            mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in sd else 4 * D,
            classifier="token" if has_cls else "gap",
            representation_size=sd["pre_logits.fc.weight"].shape[0] if "pre_logits.fc.weight" in sd else None,
            gelu="tanh" if act == "gelu_tanh" else "exact", layer_norm_eps=1e-6,
            mean=tuple(mean) if mean else None, std=tuple(std) if std else None,
            class_names=tuple(labels) if isinstance(labels, list) and len(labels) == num_classes else None,
        )
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    cfg = cfg.replace(name=_variant_name(cfg))
    names = dict(cls_token="cls_token", pos_embed="pos_embed",
                 **_weight_pairs({"patch_embed.proj": "patch_embed.proj", "norm": "norm"}))
    block = lambda i: _weight_pairs({m: f"blocks.{i}.{m}" for m in
                                     ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")})
    table = _vit_table(cfg, names, block, head="head", pre_logits="pre_logits.fc")
    return cfg, _map_names(sd, table, path, "timm ViT", hints=_TIMM_HINTS)


# transformers 5 names the layers differently in memory (and maps them back to these names when it saves).
_HF_V5_NAMES = [
    (r"\blayers\.(\d+)\.attention\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
    (r"\blayers\.(\d+)\.attention\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
    (r"\blayers\.(\d+)\.attention\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
    (r"\blayers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"\blayers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"\blayers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"\blayers\.(\d+)\.layernorm_", r"encoder.layer.\1.layernorm_"),
]
_HF_ACTS = {"gelu": "exact", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def hf_to_state_dict(sd: dict[str, torch.Tensor], meta: dict | None = None, path="hf",
                     source_grid: tuple[int, int] | None = None, num_heads: int | None = None,
                     preprocessor: dict | None = None) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """The config and vitlab weights of a Hugging Face `ViTForImageClassification` or `ViTModel` state dict.

    `meta` is the model's config.json: `hidden_act` ("gelu" is the exact GELU) and `layer_norm_eps` come from it,
    else transformers' defaults (exact GELU, eps 1e-12). `preprocessor` (preprocessor_config.json) gives
    image_mean and image_std, else 0.5. ViTModel's pooler (Dense + tanh on the [class] token) becomes the
    pre-logits layer. A mask token (masked image modelling) is not part of the classifier and is ignored.
    """
    meta, preprocessor = meta or {}, preprocessor or {}
    if meta.get("model_type", "vit") != "vit":
        raise CheckpointError(f"{path}: model_type {meta['model_type']!r} is not a Hugging Face ViT")
    for pattern, legacy in _HF_V5_NAMES:
        sd = {re.sub(pattern, legacy, k): v for k, v in sd.items()}
    p = "vit." if "vit.embeddings.patch_embeddings.projection.weight" in sd else ""
    if f"{p}embeddings.patch_embeddings.projection.weight" not in sd or f"{p}embeddings.position_embeddings" not in sd:
        raise CheckpointError(f"{path}: no embeddings.patch_embeddings.projection.weight: not a Hugging Face ViT")
    act = meta.get("hidden_act", "gelu")
    if act not in _HF_ACTS:
        raise CheckpointError(f"{path}: hidden_act {act!r}: vitlab's MLP uses GELU (gelu or gelu_new)")
    pooler = next((k[: -len(".dense.weight")] for k in (f"{p}pooler.dense.weight", "pooler.dense.weight")
                   if k in sd), None)
    if pooler and meta.get("pooler_act", "tanh") != "tanh":
        raise CheckpointError(f"{path}: pooler_act {meta['pooler_act']!r}: the pre-logits layer is Dense + tanh")
    if pooler and "classifier.weight" in sd:
        raise CheckpointError(f"{path}: a pooler beside the classifier: ViTForImageClassification's classifier "
                              "reads the [class] token, not the pooler, so the two do not make one vitlab model")
    D, C, ph, pw = sd[f"{p}embeddings.patch_embeddings.projection.weight"].shape
    grid = _source_grid(sd[f"{p}embeddings.position_embeddings"].shape[1] - 1, path, source_grid, (ph, pw),
                        meta.get("image_size"))
    num_classes = sd["classifier.weight"].shape[0] if "classifier.weight" in sd else 0
    labels = meta.get("id2label") or {}
    try:
        names = [labels.get(str(i), labels.get(i)) for i in range(num_classes)]
        default = all(n == f"LABEL_{i}" for i, n in enumerate(names))
        class_names = None if default or None in names else tuple(names)
    except AttributeError:
        class_names = None
    mean, std = preprocessor.get("image_mean"), preprocessor.get("image_std")
    layer0 = f"{p}encoder.layer.0."
    try:
        cfg = ViTConfig(
            image_size=(grid[0] * ph, grid[1] * pw), patch_size=(ph, pw), in_chans=C, num_classes=num_classes,
            hidden_size=D, num_layers=_layer_count(sd, rf"{re.escape(p)}encoder\.layer\.(\d+)\.", path),
            num_heads=_infer_heads(D, path, num_heads or meta.get("num_attention_heads")),
            mlp_dim=sd[layer0 + "intermediate.dense.weight"].shape[0] if layer0 + "intermediate.dense.weight" in sd
            else meta.get("intermediate_size", 4 * D),
            classifier="token", representation_size=sd[pooler + ".dense.weight"].shape[0] if pooler else None,
            gelu=_HF_ACTS[act], layer_norm_eps=float(meta.get("layer_norm_eps", 1e-12)),
            mean=tuple(mean) if mean else None, std=tuple(std) if std else None, class_names=class_names,
        )
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    cfg = cfg.replace(name=_variant_name(cfg))
    e = f"{p}embeddings."
    names = {"cls_token": e + "cls_token", "pos_embed": e + "position_embeddings",
             **_weight_pairs({"patch_embed.proj": e + "patch_embeddings.projection", "norm": f"{p}layernorm"})}

    def block(i):
        b = f"{p}encoder.layer.{i}."
        out = _weight_pairs({"norm1": b + "layernorm_before", "attn.proj": b + "attention.output.dense",
                             "norm2": b + "layernorm_after", "mlp.fc1": b + "intermediate.dense",
                             "mlp.fc2": b + "output.dense"})
        for part in ("weight", "bias"):  # q, k and v stacked as the fused projection's rows (head-major, as ours)
            out[f"attn.qkv.{part}"] = [f"{b}attention.attention.{n}.{part}" for n in ("query", "key", "value")]
        return out

    table = _vit_table(cfg, names, block, head="classifier", pre_logits=pooler and pooler + ".dense")
    return cfg, _map_names(sd, table, path, "Hugging Face ViT", ignored=("embeddings.mask_token",))


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else None


def _foreign(meta: dict | None) -> bool:
    """Whether a config.json was written by timm or transformers rather than by vitlab."""
    return bool(meta) and bool({"model_type", "architectures", "architecture", "pretrained_cfg"} & set(meta))


def _weights_in(directory: Path) -> dict[str, torch.Tensor]:
    """The safetensors weights of a timm or Hugging Face directory (one file, or shards with an index)."""
    if (directory / WEIGHTS_FILE).is_file():
        return read_safetensors(directory / WEIGHTS_FILE)
    index = directory / (WEIGHTS_FILE + ".index.json")
    if index.is_file():
        shards = sorted(set(((_read_json(index) or {}).get("weight_map") or {}).values()))
        if not shards:
            raise CheckpointError(f"{index}: no weight_map")
        sd = {}
        for shard in shards:
            sd.update(read_safetensors(directory / shard))
        return sd
    files = sorted(directory.glob("*.safetensors"))
    if len(files) == 1:
        return read_safetensors(files[0])
    if len(files) > 1:
        raise CheckpointError(f"{directory}: holds several .safetensors files ({', '.join(f.name for f in files)}): "
                              "name one")
    pickles = sorted(f.name for f in directory.iterdir() if f.suffix in (".bin", ".pth", ".pt", ".ckpt"))
    if pickles:
        raise CheckpointError(f"{directory}: only pickled weights ({', '.join(pickles)}); vitlab reads safetensors "
                              "only and never unpickles a file")
    raise CheckpointError(f"{directory}: no {WEIGHTS_FILE}")


def import_safetensors(sd: dict[str, torch.Tensor], meta: dict | None, path, *, source_grid=None, num_heads=None,
                       preprocessor: dict | None = None) -> tuple[ViTConfig, dict[str, torch.Tensor], str]:
    """(config, vitlab weights, "timm" | "hf") of a timm or Hugging Face ViT, told apart by its names."""
    keys = set(sd)
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys):
        return (*hf_to_state_dict(sd, meta, path, source_grid, num_heads, preprocessor), "hf")
    if "patch_embed.proj.weight" in keys:
        return (*timm_to_state_dict(sd, meta, path, source_grid, num_heads), "timm")
    raise CheckpointError(f"{path}: neither timm nor Hugging Face ViT names (e.g. {_shown(sorted(keys), 4)})")


def head_is_zero(model: nn.Module) -> bool:
    """Whether the model has a head and it is all zero: constant logits, e.g. the official ImageNet-21k files'."""
    head = unwrap(model).head
    return isinstance(head, nn.Linear) and not head.weight.any() and not head.bias.any()


# --------------------------------------------------------------------------------------------------------------
# One entry point for every source
# --------------------------------------------------------------------------------------------------------------


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
    """(config, vitlab weights, kind) of any source: "vitlab", "npz", "timm" or "hf"."""
    if path.is_dir():
        meta = _read_json(path / CONFIG_FILE)
        if _foreign(meta) or (meta is None and any(path.glob("*.safetensors*"))):
            return import_safetensors(_weights_in(path), meta, path, source_grid=source_grid, num_heads=num_heads,
                                      preprocessor=_read_json(path / "preprocessor_config.json"))
        return read_config(path), read_safetensors(path / WEIGHTS_FILE), "vitlab"
    if path.suffix == ".npz":
        arrays = read_npz(path)
        cfg = npz_config(arrays, path, source_grid)
        try:
            return cfg, npz_to_state_dict(arrays, cfg), "npz"
        except KeyError as e:
            raise CheckpointError(f"{path}: missing array {e.args[0]!r}: not a complete ViT checkpoint") from None
        except RuntimeError as e:  # a reshape that does not fit: one layer's arrays disagree with the others
            raise CheckpointError(f"{path}: arrays do not fit one ViT ({str(e).splitlines()[0]})") from None
    if path.suffix == ".safetensors":  # a file: the config.json beside it, if any, says whose it is
        meta = _read_json(path.parent / CONFIG_FILE)
        if meta is not None and not _foreign(meta):
            return read_config(path.parent), read_safetensors(path), "vitlab"
        return import_safetensors(read_safetensors(path), meta, path, source_grid=source_grid, num_heads=num_heads,
                                  preprocessor=_read_json(path.parent / "preprocessor_config.json"))
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.suffix in (".bin", ".pth", ".pt", ".ckpt"):
        raise CheckpointError(f"{path}: a pickled checkpoint; vitlab reads safetensors only and never unpickles a file")
    raise CheckpointError(f"{path}: not a vitlab checkpoint directory, an official .npz file, or timm or Hugging "
                          "Face safetensors")


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
    """A model in eval mode from a vitlab checkpoint directory, an official .npz file, or a timm or Hugging Face
    ViT in safetensors (a file, or a directory with the config.json its library wrote).

    `image_size` resizes the position embeddings in 2-D; `num_classes` replaces the head by a new zero-initialised
    one when it differs from the checkpoint's; `gelu="exact"` for official weights run as timm runs them.
    `num_heads` for timm or Hugging Face weights without a config.json whose width is not 64 per head.
    """
    path = Path(source)
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


@torch.no_grad()
def adapt(model: nn.Module, *, pos_embed_interp: str = "bilinear", new_head: bool = False, **changes) -> nn.Module:
    """The same weights in a model with some config fields changed: a new resolution (the position embeddings
    interpolated in 2-D), a new number of classes or `new_head` (a fresh zero head, as for fine-tuning),
    `representation_size=None` (the pre-logits layer dropped, and a new head), `mpp_classes=0` (the masked patch
    prediction's [mask] embedding and head dropped), dropout, GELU form. A BiT ResNet takes any resolution as
    it is; only its head changes."""
    model = unwrap(model)
    old = model.cfg
    try:
        new = old.replace(**changes)
    except ConfigError as e:
        raise ConfigError(f"cannot adapt {old.name or 'the model'}: {e}") from None
    architecture = ("num_layers", "width_factor", "in_chans") if isinstance(old, ResNetConfig) else (
        "patch_size", "in_chans", "hidden_size", "num_layers", "num_heads", "mlp_dim", "classifier",
        "resnet_num_layers", "resnet_width_factor")
    for field in architecture:
        if getattr(new, field) != getattr(old, field):
            raise ConfigError(f"{field} cannot change on loaded weights ({getattr(old, field)} -> {getattr(new, field)})")
    out = build_model(new)
    sd = dict(model.state_dict())
    if isinstance(old, ResNetConfig):
        return _new_head(out, sd, new_head or new.num_classes != old.num_classes).train(model.training)
    if new.representation_size not in (None, old.representation_size):
        raise ConfigError(f"representation_size can only be dropped on loaded weights ({old.representation_size} "
                          f"-> {new.representation_size})")
    if new.mpp_classes not in (0, old.mpp_classes):
        raise ConfigError(f"mpp_classes can only be dropped on loaded weights ({old.mpp_classes} -> {new.mpp_classes})")
    if new.mpp_classes != old.mpp_classes:  # pre-trained by masked patch prediction: its own parts dropped
        for k in [k for k in sd if k == "mask_token" or k.startswith("mpp_head.")]:
            del sd[k]
    sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], old.grid_size, new.grid_size, old.num_prefix_tokens, pos_embed_interp)
    if new.representation_size != old.representation_size:  # the pre-logits layer dropped (section 3.1)
        for k in [k for k in sd if k.startswith("pre_logits.")]:
            del sd[k]
        new_head = True  # the head read the dropped layer's output
    return _new_head(out, sd, new_head or new.num_classes != old.num_classes).train(model.training)


def _new_head(out: nn.Module, sd: dict[str, torch.Tensor], new_head: bool) -> nn.Module:
    """Load `sd` into `out`, with `out`'s own fresh (zero) head when `new_head`."""
    if new_head:
        for k in [k for k in sd if k.startswith("head.")]:
            del sd[k]
        sd.update({k: v for k, v in out.state_dict().items() if k.startswith("head.")})
    out.load_state_dict(sd)
    return out
