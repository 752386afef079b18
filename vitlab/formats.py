"""Other people's checkpoint files, part 1: the official .npz files, the ViT and hybrid ones of `vit_jax` (both
directions, from one name table) and BiT's published ResNets. Part 2, timm's and Hugging Face's safetensors, is
vitlab.timm_hf; `vitlab.weights.load_model` reads them all.

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

Two generations of the official code wrote these files, and vitlab reads both:

- The published files (ViT-B_16.npz, R50+ViT-B_16.npz, the AugReg files) were written by the pre-Linen Flax
  API, which numbered a block's submodules together (LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
  MlpBlock_3) and kept GroupNorm's scale and bias as (1, 1, 1, C).
- Today's `vit_jax` (Flax Linen) numbers each kind apart (LayerNorm_0, MultiHeadDotProductAttention_0,
  LayerNorm_1, MlpBlock_0) and keeps GroupNorm's as (C,). Its `checkpoint.load` reads the published files by
  renaming them (`convert_pre_linen`) and squeezing the GroupNorm arrays (`_fix_groupnorm`, Flax issue #1721);
  timm's `_load_weights` reads them as they are (its `_n2p` flattens the (1, 1, 1, C) arrays).

`export_npz` writes the published layout, array for array and shape for shape: the one both readers take.

A hybrid's npz (R50+ViT-B_16.npz) adds its ResNet stem, whose arrays also give its configuration (the width
from conv_root, the stages and their units from the blockI/unitJ names), and its `embedding` reads the stem's
feature map:

    conv_root/kernel (7, 7, C, w)                    patch_embed.backbone.conv_root.weight (w, C, 7, 7)
    gn_root/{scale,bias}                             patch_embed.backbone.gn_root.{weight,bias}
    blockI/unitJ/{conv1,conv2,conv3,conv_proj}/kernel   patch_embed.backbone.stages.(I-1).units.(J-1).<same>
    blockI/unitJ/{gn1,gn2,gn3,gn_proj}/{scale,bias}     patch_embed.backbone.stages.(I-1).units.(J-1).<same>

BiT's published files (BiT-M-R50x1.npz; big_transfer's `bit_pytorch/models.py` `load_from` is their reader) use
TensorFlow's names under `resnet/`, and give the width and the units per stage in the same way:

    root_block/standardized_conv2d/kernel            conv_root.weight
    blockI/unitJJ/{a,b,c}/group_norm/{gamma,beta}    stages.(I-1).units.(JJ-1).gn{1,2,3}.{weight,bias}
    blockI/unitJJ/{a,b,c}/standardized_conv2d/kernel stages.(I-1).units.(JJ-1).conv{1,2,3}.weight
    blockI/unitJJ/a/proj/standardized_conv2d/kernel  stages.(I-1).units.(JJ-1).conv_proj.weight
    group_norm/{gamma,beta}                          norm.{weight,bias}
    head/conv2d/kernel (1, 1, C, K), bias            head.{weight,bias} (a 1x1 convolution there, a Linear here)
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
from .model import ViTConfig
from .resnet import RESNET_DEPTHS, ResNetConfig, hybrid_channels, hybrid_stride
from .runtime import unwrap

# The file names of a checkpoint directory: vitlab's, and those timm and transformers write.
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PICKLED = (".bin", ".pth", ".pt", ".ckpt")  # PyTorch's pickled checkpoints: refused by name, never opened
# What an .npz of each known layout holds, for the error that names what an unknown one holds.
NPZ_LAYOUTS = ("the official ViT and hybrid files (embedding/kernel, Transformer/encoderblock_0/..., conv_root/...), "
               "BiT's (resnet/root_block/standardized_conv2d/kernel, resnet/block1/unit01/...)")


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
# Official npz files
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


def read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else None


def import_npz(path: Path, source_grid: tuple[int, int] | None = None) -> tuple[ViTConfig | ResNetConfig,
                                                                             dict[str, torch.Tensor], str]:
    """(config, vitlab weights, "npz" | "bit") of an .npz file: an official ViT or hybrid, or a BiT ResNet, told
    apart by their names; the NAME.npz.json beside it, if any, adds what the layout has no place for."""
    arrays = read_npz(path)
    spelled = str  # how the file spells a published name, for the errors
    if "embedding/kernel" in arrays:
        renamed = published_names(arrays)
        if renamed is not arrays:
            spelled = _linen_name
        arrays = renamed
        cfg = apply_sidecar(npz_config(arrays, path, source_grid, read_sidecar(path).get("image_size")), path)
        kind = "npz"
    elif BIT_ROOT in arrays:
        cfg, kind = apply_sidecar(bit_npz_config(arrays, path), path), "bit"
    else:
        raise CheckpointError(f"{path}: an .npz of a layout vitlab does not know: its first arrays are "
                              f"{shown(sorted(arrays), 4)}; known .npz layouts: {NPZ_LAYOUTS}")
    try:
        return cfg, npz_to_state_dict(arrays, cfg), kind
    except KeyError as e:
        raise CheckpointError(f"{path}: missing array {spelled(e.args[0])!r}: not a complete checkpoint") from None
    except RuntimeError as e:  # a reshape that does not fit: one layer's arrays disagree with the others
        raise CheckpointError(f"{path}: arrays do not fit one model ({str(e).splitlines()[0]})") from None


# Flax Linen's names of an encoder block's parts -> the published files' (pre-Linen) names: the inverse of what
# `vit_jax.checkpoint.load` does to the published files (flax.training.checkpoints.convert_pre_linen).
_LINEN_TO_PUBLISHED = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1", "LayerNorm_1": "LayerNorm_2",
                       "MlpBlock_0": "MlpBlock_3"}
_LINEN_BLOCK = re.compile(r"(Transformer/encoderblock_\d+/)(" + "|".join(_LINEN_TO_PUBLISHED) + ")/")


def _linen_name(key: str) -> str:
    """A published name as today's vit_jax spells it."""
    linen = {v: k for k, v in _LINEN_TO_PUBLISHED.items()}
    return re.sub(r"(encoderblock_\d+/)(\w+)/", lambda m: m.group(1) + linen.get(m.group(2), m.group(2)) + "/", key)


def published_names(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of an official ViT under the published files' names: as they are, or renamed from the names
    today's (Linen) vit_jax writes, which a file has when its first block has MultiHeadDotProductAttention_0."""
    if not any(k.startswith("Transformer/encoderblock_0/MultiHeadDotProductAttention_0/") for k in arrays):
        return arrays
    return {_LINEN_BLOCK.sub(lambda m: m.group(1) + _LINEN_TO_PUBLISHED[m.group(2)] + "/", k): v
            for k, v in arrays.items()}


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
    source_grid = source_grid_of(tokens - (classifier == "token"), path, source_grid, (ph * stride, pw * stride),
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



# The one name table of each layout: (vitlab name, official names, kind), where the kind says how the arrays
# become the tensor and back (`_conversions`). Both directions read it, so they cannot drift apart.
NameTable = list[tuple[str, list[str], str]]


def npz_names(cfg: ViTConfig | ResNetConfig) -> NameTable:
    """Every array of the official checkpoint of `cfg` (a BiT ResNet's: `bit_npz_names`), in the published
    files' names, in the file's order of concerns."""
    if isinstance(cfg, ResNetConfig):
        return bit_npz_names(cfg)
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
    projection, which it has when it changes the width or the stride. GroupNorm arrays are of kind "gn"."""
    if cfg.resnet_num_layers is None:
        return []
    stem = "patch_embed.backbone."
    rows = [(stem + "conv_root.weight", ["conv_root/kernel"], "conv"),
            (stem + "gn_root.weight", ["gn_root/scale"], "gn"), (stem + "gn_root.bias", ["gn_root/bias"], "gn")]
    for i, units in enumerate(cfg.resnet_num_layers):
        for j in range(units):
            ours, theirs = f"{stem}stages.{i}.units.{j}.", f"block{i + 1}/unit{j + 1}/"
            for conv in ["conv1", "conv2", "conv3"] + (["conv_proj"] if j == 0 else []):
                gn = conv.replace("conv", "gn")
                rows += [(ours + conv + ".weight", [theirs + conv + "/kernel"], "conv"),
                         (ours + gn + ".weight", [theirs + gn + "/scale"], "gn"),
                         (ours + gn + ".bias", [theirs + gn + "/bias"], "gn")]
    return rows


BIT_ROOT = "resnet/root_block/standardized_conv2d/kernel"


def bit_npz_config(arrays: dict[str, np.ndarray], path="npz") -> ResNetConfig:
    """The configuration of a BiT ResNet's published npz, read from its arrays: the width factor from the root
    convolution's output channels (64 per unit of width), the stages and their units from the blockI/unitJJ names,
    the classes from the head (none without one). The resolution is not in the file: 224, BiT's upstream one."""
    root = _require(arrays, BIT_ROOT, path, 4)
    in_chans, width = root.shape[2:]
    units: dict[int, set[int]] = {}
    for k in arrays:
        if m := re.match(r"resnet/block(\d+)/unit(\d+)/a/standardized_conv2d/kernel$", k):
            units.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    stages = sorted(units)
    if not stages or stages != list(range(1, len(stages) + 1)) or any(
            sorted(units[i]) != list(range(1, len(units[i]) + 1)) for i in stages):
        raise CheckpointError(f"{path}: the ResNet's blocks and units {dict(sorted(units.items()))} are not numbered "
                              "1..n")
    num_layers = tuple(len(units[i]) for i in stages)
    factor = width / 64 if width % 64 else width // 64
    depth = 3 * sum(num_layers) + 2  # three convolutions per unit, the root's and the head's
    head = arrays.get("resnet/head/conv2d/kernel")
    try:
        return ResNetConfig(in_chans=in_chans, num_layers=num_layers, width_factor=factor,
                            num_classes=0 if head is None else head.shape[-1],
                            name=f"BiT-R{depth}x{factor}" if RESNET_DEPTHS.get(depth) == num_layers else None)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def bit_npz_names(cfg: ResNetConfig) -> NameTable:
    """Every array of a BiT ResNet's published npz (the names `bit_pytorch` `ResNetV2.load_from` reads)."""
    p = "resnet/"
    rows: NameTable = [("conv_root.weight", [BIT_ROOT], "conv")]
    for i, units in enumerate(cfg.num_layers):
        for j in range(units):
            ours, theirs = f"stages.{i}.units.{j}.", f"{p}block{i + 1}/unit{j + 1:02d}/"
            for n, part in enumerate("abc", 1):
                rows += [(f"{ours}gn{n}.weight", [f"{theirs}{part}/group_norm/gamma"], "gn"),
                         (f"{ours}gn{n}.bias", [f"{theirs}{part}/group_norm/beta"], "gn"),
                         (f"{ours}conv{n}.weight", [f"{theirs}{part}/standardized_conv2d/kernel"], "conv")]
            if j == 0:  # each stage's first unit changes the width (and after the first, the stride): a projection
                rows.append((f"{ours}conv_proj.weight", [f"{theirs}a/proj/standardized_conv2d/kernel"], "conv"))
    rows += [("norm.weight", [f"{p}group_norm/gamma"], "gn"), ("norm.bias", [f"{p}group_norm/beta"], "gn")]
    if cfg.num_classes:
        rows += [("head.weight", [f"{p}head/conv2d/kernel"], "head_conv"), ("head.bias", [f"{p}head/conv2d/bias"], "copy")]
    return rows


def _squeeze_gn(a: torch.Tensor) -> torch.Tensor:
    """A GroupNorm scale or bias as (C,): the published files' (1, 1, 1, C) flattened (other shapes kept, for the
    shape check to report)."""
    return a.reshape(a.shape[-1]) if a.ndim and a.numel() == a.shape[-1] else a


def _conversions(cfg) -> dict[str, tuple[Callable, Callable]]:
    """kind -> (official arrays -> tensor, tensor -> official arrays); for a ViT of width D and H heads, the
    attention's kinds too."""
    kinds = {
        "copy": (lambda a: a[0], lambda t: [t]),
        "dense": (lambda a: a[0].T, lambda t: [t.T]),  # (in, out) <-> (out, in)
        "conv": (lambda a: a[0].permute(3, 2, 0, 1), lambda t: [t.transpose(2, 3, 1, 0)]),  # (h,w,in,out) <-> (out,in,h,w)
        # GroupNorm: (1, 1, 1, C) in the published hybrid files (pre-Linen Flax), (C,) in today's Flax and in BiT's
        # files; written as each published layout has it
        "gn": (lambda a: _squeeze_gn(a[0]),
               lambda t: [t if isinstance(cfg, ResNetConfig) else t.reshape(1, 1, 1, -1)]),
        "head_conv": (lambda a: a[0].reshape(a[0].shape[-2:]).T, lambda t: [t.T[None, None]]),  # (1,1,C,K) <-> (K,C)
    }
    if isinstance(cfg, ViTConfig):
        D, H = cfg.hidden_size, cfg.num_heads
        kinds.update({  # q, k and v (D, H, D_h) each -> (H*D_h, D), stacked into the fused projection, and back
            "qkv_kernel": (lambda a: torch.cat([k.reshape(D, D).T for k in a]),
                           lambda t: [w.T.reshape(D, H, D // H) for w in np.split(t, 3)]),
            "qkv_bias": (lambda a: torch.cat([b.reshape(D) for b in a]),
                         lambda t: [b.reshape(H, D // H) for b in np.split(t, 3)]),
            "out_kernel": (lambda a: a[0].reshape(D, D).T, lambda t: [t.T.reshape(H, D // H, D)]),  # (H, D_h, D)
        })
    return kinds


def npz_to_state_dict(arrays: dict[str, np.ndarray], cfg: ViTConfig | ResNetConfig) -> dict[str, torch.Tensor]:
    """Map official arrays (under the published names) onto vitlab's parameter names, transposing Flax's and
    TensorFlow's layouts to PyTorch's. An array of a ResNet the file lacks is left out, for the model's loader to
    report as missing; a missing ViT array is a KeyError."""
    convert = _conversions(cfg)
    optional = {name for name, _, _ in (_stem_names(cfg) if isinstance(cfg, ViTConfig) else npz_names(cfg))}
    sd = {}
    for name, keys, kind in npz_names(cfg):
        if name in optional and not all(k in arrays for k in keys):
            continue
        sd[name] = convert[kind][0]([torch.from_numpy(np.asarray(arrays[k], dtype=np.float32)) for k in keys])
    return {k: v.contiguous() for k, v in sd.items()}


def state_dict_to_npz(model: nn.Module) -> dict[str, np.ndarray]:
    """The official arrays of a model, in the published files' layout: the inverse of `npz_to_state_dict`. (The
    official layout has no place for the masked-patch-prediction head's weights: they are left out.)"""
    model = unwrap(model)
    cfg = model.cfg
    if getattr(cfg, "resnet_root", "7x7") != "7x7":
        raise ConfigError(f"the official layout has no hybrid with a {cfg.resnet_root} root block (its code builds the "
                          "paper's 7x7 one): its vitlab checkpoint or an ONNX export (NAME.onnx) carries it")
    sd = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in model.state_dict().items()}
    convert = _conversions(cfg)
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
    """Write a model as the official files are (atomically): a ViT or hybrid in vit_jax's published layout, a BiT
    ResNet in BiT's; and beside it NAME.npz.json with what the layout cannot hold (the resolution, the input
    normalisation, the class names, the GELU form)."""
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


def apply_sidecar(cfg: ViTConfig | ResNetConfig, path: Path) -> ViTConfig | ResNetConfig:
    """`cfg` (read from an npz's shapes) with the fields of the NAME.npz.json beside it, when there is one."""
    extra = read_sidecar(path)
    if isinstance(cfg, ResNetConfig):
        extra = {k: v for k, v in extra.items() if k not in ("gelu", "layer_norm_eps")}
    if not extra:
        return cfg
    try:
        new = cfg.replace(**extra)
    except ConfigError as e:
        raise CheckpointError(f"{sidecar_path(path)}: {e}") from None
    if isinstance(cfg, ViTConfig) and new.num_patches != cfg.num_patches:
        raise CheckpointError(f"{sidecar_path(path)}: image_size {new.image_size} gives {new.num_patches} patches, "
                              f"the npz holds position embeddings for {cfg.num_patches}")
    return new


# --------------------------------------------------------------------------------------------------------------
# Shared with vitlab.timm_hf
# --------------------------------------------------------------------------------------------------------------


def source_grid_of(num_patches: int, path, source_grid, patch: tuple[int, int], image_size=None) -> tuple[int, int]:
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


def shown(keys: list[str], limit: int = 8) -> str:
    """At most `limit` names, in brackets, and how many more."""
    return "[" + ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "") + "]"
