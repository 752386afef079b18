"""Other people's checkpoint files: the official `vit_jax` .npz layout (both directions, from one name table),
timm's and Hugging Face's ViTs in safetensors. `vitlab.weights.load_model` reads them all through here.

Nothing here ever unpickles a file: `np.load(allow_pickle=False)` for npz, safetensors for the others.

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

timm's names are vitlab's own (vitlab took them from timm); what differs is the exact GELU and the input
normalisation in its `pretrained_cfg`. Hugging Face's (`ViTForImageClassification` has the `vit.` prefix,
`ViTModel` none and optionally a pooler):

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
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import nn

from .common import CheckpointError, ConfigError, atomic_write, atomic_write_text
from .model import VARIANTS, ViTConfig
from .resnet import hybrid_channels, hybrid_stride
from .runtime import unwrap

# The file names of a checkpoint directory: vitlab's, and those timm and transformers write.
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PICKLED = (".bin", ".pth", ".pt", ".ckpt")  # PyTorch's pickled checkpoints: refused by name, never opened

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
            arrays = {}
            for key in npz.files:
                try:
                    arrays[key] = npz[key]
                except ValueError as e:
                    if "allow_pickle" not in str(e):
                        raise
                    raise CheckpointError(f"{path}: array {key!r} holds pickled Python objects, which vitlab never "
                                          "loads (official checkpoints hold numbers only)") from None
            return arrays
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


def npz_config(arrays: dict[str, np.ndarray], path="npz", source_grid: tuple[int, int] | None = None,
               image_size: tuple[int, int] | None = None) -> ViTConfig:
    """The configuration of an official checkpoint, read from its array shapes; the patch grid of its position
    embeddings from `source_grid`, else from an `image_size` known to fit them (a sidecar's), else a square."""
    ph, pw, C, D = _require(arrays, "embedding/kernel", path, 4).shape
    layers = sorted(int(m.group(1)) for k in arrays if (m := re.match(r"Transformer/encoderblock_(\d+)/LayerNorm_0/scale$", k)))
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(f"{path}: encoder blocks {layers} are not numbered 0..L-1")
    _, H, Dh = _require(arrays, "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel", path, 3).shape
    mlp_dim = _require(arrays, "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel", path, 2).shape[1]
    classifier = "token" if "cls" in arrays else "gap"
    representation_size = arrays["pre_logits/kernel"].shape[1] if "pre_logits/kernel" in arrays else None
    num_classes = arrays["head/kernel"].shape[1] if "head/kernel" in arrays else 0
    tokens = _require(arrays, "Transformer/posembed_input/pos_embedding", path, 3).shape[1]
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
    source_grid = _source_grid(tokens - (classifier == "token"), path, source_grid, (ph * stride, pw * stride),
                               image_size)
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


# The one name table of the official layout: (vitlab name, official names, kind), where the kind says how the
# arrays become the tensor and back (`_CONVERSIONS`). Both directions read it, so they cannot drift apart.
NameTable = list[tuple[str, list[str], str]]


def npz_names(cfg: ViTConfig) -> NameTable:
    """Every array of the official checkpoint of `cfg`, in the file's order of concerns."""
    rows: NameTable = [
        ("patch_embed.proj.weight", ["embedding/kernel"], "conv"),
        ("patch_embed.proj.bias", ["embedding/bias"], "copy"),
        ("pos_embed", ["Transformer/posembed_input/pos_embedding"], "copy"),
        ("norm.weight", ["Transformer/encoder_norm/scale"], "copy"),
        ("norm.bias", ["Transformer/encoder_norm/bias"], "copy"),
    ]
    if cfg.classifier == "token":
        rows.append(("cls_token", ["cls"], "copy"))
    for i in range(cfg.num_layers):
        ours, b = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        a, m = b + "MultiHeadDotProductAttention_1/", b + "MlpBlock_3/"
        rows += [
            (ours + "norm1.weight", [b + "LayerNorm_0/scale"], "copy"),
            (ours + "norm1.bias", [b + "LayerNorm_0/bias"], "copy"),
            (ours + "attn.qkv.weight", [a + n + "/kernel" for n in ("query", "key", "value")], "qkv_kernel"),
            (ours + "attn.qkv.bias", [a + n + "/bias" for n in ("query", "key", "value")], "qkv_bias"),
            (ours + "attn.proj.weight", [a + "out/kernel"], "out_kernel"),
            (ours + "attn.proj.bias", [a + "out/bias"], "copy"),
            (ours + "norm2.weight", [b + "LayerNorm_2/scale"], "copy"),
            (ours + "norm2.bias", [b + "LayerNorm_2/bias"], "copy"),
            (ours + "mlp.fc1.weight", [m + "Dense_0/kernel"], "dense"),
            (ours + "mlp.fc1.bias", [m + "Dense_0/bias"], "copy"),
            (ours + "mlp.fc2.weight", [m + "Dense_1/kernel"], "dense"),
            (ours + "mlp.fc2.bias", [m + "Dense_1/bias"], "copy"),
        ]
    if cfg.representation_size:
        rows += [("pre_logits.fc.weight", ["pre_logits/kernel"], "dense"), ("pre_logits.fc.bias", ["pre_logits/bias"], "copy")]
    if cfg.num_classes:
        rows += [("head.weight", ["head/kernel"], "dense"), ("head.bias", ["head/bias"], "copy")]
    return rows + _stem_names(cfg)


def _stem_names(cfg: ViTConfig) -> NameTable:
    """The rows of a hybrid's ResNet stem ([] for a plain ViT): each stage's first unit listed with its
    projection, which it has when it changes the width or the stride."""
    if cfg.resnet_num_layers is None:
        return []
    stem = "patch_embed.backbone."
    rows = [(stem + "conv_root.weight", ["conv_root/kernel"], "conv"),
            (stem + "gn_root.weight", ["gn_root/scale"], "copy"), (stem + "gn_root.bias", ["gn_root/bias"], "copy")]
    for i, units in enumerate(cfg.resnet_num_layers):
        for j in range(units):
            ours, theirs = f"{stem}stages.{i}.units.{j}.", f"block{i + 1}/unit{j + 1}/"
            for conv in ["conv1", "conv2", "conv3"] + (["conv_proj"] if j == 0 else []):
                gn = conv.replace("conv", "gn")
                rows += [(ours + conv + ".weight", [theirs + conv + "/kernel"], "conv"),
                         (ours + gn + ".weight", [theirs + gn + "/scale"], "copy"),
                         (ours + gn + ".bias", [theirs + gn + "/bias"], "copy")]
    return rows


def _conversions(D: int, H: int) -> dict[str, tuple[Callable, Callable]]:
    """kind -> (official arrays -> tensor, tensor -> official arrays) for a ViT of width D and H heads."""
    return {
        "copy": (lambda a: a[0], lambda t: [t]),
        "dense": (lambda a: a[0].T, lambda t: [t.T]),  # (in, out) <-> (out, in)
        "conv": (lambda a: a[0].permute(3, 2, 0, 1), lambda t: [t.transpose(2, 3, 1, 0)]),  # (h,w,in,out) <-> (out,in,h,w)
        # q, k and v (D, H, D_h) each -> (H*D_h, D), stacked into the fused projection, and back
        "qkv_kernel": (lambda a: torch.cat([k.reshape(D, D).T for k in a]),
                       lambda t: [w.T.reshape(D, H, D // H) for w in np.split(t, 3)]),
        "qkv_bias": (lambda a: torch.cat([b.reshape(D) for b in a]),
                     lambda t: [b.reshape(H, D // H) for b in np.split(t, 3)]),
        "out_kernel": (lambda a: a[0].reshape(D, D).T, lambda t: [t.T.reshape(H, D // H, D)]),  # (H, D_h, D)
    }


def npz_to_state_dict(arrays: dict[str, np.ndarray], cfg: ViTConfig) -> dict[str, torch.Tensor]:
    """Map official arrays onto vitlab's parameter names, transposing Flax layouts to PyTorch's. A stem array the
    file lacks is left out, for the model's loader to report as missing; a missing ViT array is a KeyError."""
    convert = _conversions(cfg.hidden_size, cfg.num_heads)
    stem = {name for name, _, _ in _stem_names(cfg)}
    sd = {}
    for name, keys, kind in npz_names(cfg):
        if name in stem and not all(k in arrays for k in keys):
            continue
        sd[name] = convert[kind][0]([torch.from_numpy(np.asarray(arrays[k], dtype=np.float32)) for k in keys])
    return {k: v.contiguous() for k, v in sd.items()}


def state_dict_to_npz(model: nn.Module) -> dict[str, np.ndarray]:
    """The official arrays of a model: the inverse of `npz_to_state_dict`. (The official layout has no place for
    a BiT ResNet's or for the masked-patch-prediction head's weights: the latter are left out.)"""
    model = unwrap(model)
    cfg: ViTConfig = model.cfg
    if not isinstance(cfg, ViTConfig):
        raise ConfigError(f"{cfg.name or 'this model'} is not a ViT: the official npz layout holds ViTs only")
    sd = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in model.state_dict().items()}
    convert = _conversions(cfg.hidden_size, cfg.num_heads)
    out = {}
    for name, keys, kind in npz_names(cfg):
        if name in sd:
            out.update(zip(keys, convert[kind][1](sd[name])))
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# What a vitlab model knows that the official layout has no place for: written beside the npz as NAME.npz.json and
# read back when present, so that a round trip through the official layout predicts what the model predicted.
SIDECAR_FIELDS = ("image_size", "mean", "std", "class_names", "name", "gelu", "layer_norm_eps")


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(f"{path}.json")


def export_npz(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a model in the official vit_jax .npz layout (atomically), and beside it NAME.npz.json with what the
    layout cannot hold (the resolution, the input normalisation, the class names, the GELU form)."""
    arrays = state_dict_to_npz(model)
    path = Path(path)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)
    cfg = unwrap(model).cfg
    extra = {k: v for k, v in cfg.to_dict().items() if k in SIDECAR_FIELDS}
    atomic_write_text(sidecar_path(path), json.dumps(extra, indent=2) + "\n")
    return path


def read_sidecar(path: Path) -> dict:
    """The fields of the NAME.npz.json beside an npz ({} without one)."""
    extra = read_json(sidecar_path(path)) or {}
    unknown = sorted(set(extra) - set(SIDECAR_FIELDS))
    if unknown:
        raise CheckpointError(f"{sidecar_path(path)}: unknown field(s) {', '.join(unknown)}")
    return extra


def apply_sidecar(cfg: ViTConfig, path: Path) -> ViTConfig:
    """`cfg` (read from an npz's shapes) with the fields of the NAME.npz.json beside it, when there is one."""
    extra = read_sidecar(path)
    if not extra:
        return cfg
    try:
        new = cfg.replace(**extra)
    except ConfigError as e:
        raise CheckpointError(f"{sidecar_path(path)}: {e}") from None
    if new.num_patches != cfg.num_patches:
        raise CheckpointError(f"{sidecar_path(path)}: image_size {new.image_size} gives {new.num_patches} patches, "
                              f"the npz holds position embeddings for {cfg.num_patches}")
    return new


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


def read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else None


def is_foreign(meta: dict | None) -> bool:
    """Whether a config.json was written by timm or transformers rather than by vitlab."""
    return bool(meta) and bool({"model_type", "architectures", "architecture", "pretrained_cfg"} & set(meta))


def weights_in(directory: Path) -> dict[str, torch.Tensor]:
    """The safetensors weights of a timm or Hugging Face directory (one file, or shards with an index)."""
    if (directory / WEIGHTS_FILE).is_file():
        return read_safetensors(directory / WEIGHTS_FILE)
    index = directory / (WEIGHTS_FILE + ".index.json")
    if index.is_file():
        shards = sorted(set(((read_json(index) or {}).get("weight_map") or {}).values()))
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
    pickles = sorted(f.name for f in directory.iterdir() if f.suffix in PICKLED)
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


