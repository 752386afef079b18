"""A model as an ONNX graph, for runtimes other than PyTorch (onnxruntime, TensorRT, browsers).

The graph takes float32 images (B, C, H, W) already normalised, (pixels / 255 - mean) / std, at the model's
resolution, for any batch size B, and returns the logits (B, K) (the pre-logits features for a model without a
head). The normalisation and the rest of what a runtime needs to feed it are recorded in the model's metadata
(`metadata_props`): `mean`, `std`, `image_size`, `class_names` as JSON, and `vitlab_config`, the whole config.

It is exported by `torch.export` (PyTorch's default ONNX exporter since 2.9, which needs `onnx` and `onnxscript`)
in float32, in eval mode, at opset 18: LayerNormalization is an ONNX operator from opset 17.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from .common import UserError, atomic_write
from .runtime import unwrap

OPSET = 18
INPUT, OUTPUT = "images", "logits"


def export_onnx(model: nn.Module, path: str | os.PathLike, opset: int = OPSET) -> Path:
    """Write `model` (a ViT, hybrid or BiT ResNet) as an ONNX graph with a dynamic batch axis, atomically."""
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs onnx and onnxscript: pip install 'vitlab[onnx]'") from None
    model = copy.deepcopy(unwrap(model)).float().cpu().eval()
    cfg = model.cfg
    if sum(p.numel() for p in model.state_dict().values()) * 4 >= 2**31:  # protobuf's limit for one file
        raise UserError(f"{cfg.name or 'the model'} has over 2 GB of float32 weights: more than one ONNX file holds")
    example = torch.zeros(2, cfg.in_chans, *cfg.image_size)  # two, so that the batch axis is not taken as 1
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT],
                                    output_names=[OUTPUT], dynamic_shapes=({0: batch},), external_data=False,
                                    verbose=False)
    graph = program.model_proto
    C = cfg.in_chans
    metadata = dict(mean=list(cfg.mean or (0.5,) * C), std=list(cfg.std or (0.5,) * C),
                    image_size=list(cfg.image_size), class_names=list(cfg.class_names or []),
                    input=f"{INPUT}: float32 (B, {C}, {cfg.image_size[0]}, {cfg.image_size[1]}), "
                          "(pixels / 255 - mean) / std", vitlab_config=cfg.to_dict())
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value if isinstance(value, str) else json.dumps(value))
    graph.doc_string = f"vitlab {cfg.name or type(model).__name__}"
    path = Path(path)
    atomic_write(path, lambda tmp: onnx.save_model(graph, str(tmp)))
    return path


def onnx_metadata(path: str | os.PathLike) -> dict:
    """The metadata `export_onnx` recorded, its JSON values decoded."""
    import onnx

    out = {}
    for prop in onnx.load(str(path), load_external_data=False).metadata_props:
        try:
            out[prop.key] = json.loads(prop.value)
        except ValueError:
            out[prop.key] = prop.value
    return out
