"""Other people's checkpoint files, part 2: timm's and Hugging Face's ViTs, in safetensors (a file, or the
directory its library wrote with its config.json). `vitlab.weights.load_model` reads them through here; part 1,
the official npz files, is vitlab.formats.

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

Nothing here unpickles a file: safetensors only, and PyTorch's pickled files are refused by name.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .common import CheckpointError, ConfigError
from .formats import PICKLED, WEIGHTS_FILE, read_json, read_safetensors, shown, source_grid_of
from .model import VARIANTS, ViTConfig

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


def _layer_count(keys, pattern: str, path) -> int:
    layers = sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})
    if not layers:
        raise CheckpointError(f"{path}: no encoder layers found")
    return layers[-1] + 1  # layers missing in between are reported as missing keys


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
            f"{path}: not a {what} vitlab can load, nothing loaded: missing {shown(missing)}, unexpected "
            f"{shown(unexpected)}" + "".join(f"; {n}" for n in notes)
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
    grid = source_grid_of(sd["pos_embed"].shape[1] - prefix, path, source_grid, (ph, pw),
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
    grid = source_grid_of(sd[f"{p}embeddings.position_embeddings"].shape[1] - 1, path, source_grid, (ph, pw),
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
    raise CheckpointError(f"{path}: neither timm nor Hugging Face ViT names: its first tensors are "
                          f"{shown(sorted(keys), 4)}; known safetensors layouts: {SAFETENSORS_LAYOUTS}")


# What a safetensors file of each known layout holds, for the error that names what an unknown one holds.
SAFETENSORS_LAYOUTS = ("vitlab's (beside its config.json), timm's ViT (patch_embed.proj.weight, blocks.0.attn.qkv."
                       "weight, ...), Hugging Face's ViT (vit.embeddings.patch_embeddings.projection.weight, ...)")


