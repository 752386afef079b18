"""vitlab: the Vision Transformer of Dosovitskiy et al. (ICLR 2021), as a whole system.

The public names below are imported on first use (PEP 562), so that `import vitlab` and the `vitlab` command
start without loading torch until something needs it.
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_EXPORTS = {
    "CheckpointError": "common",
    "ConfigError": "common",
    "DataError": "common",
    "ResNetConfig": "resnet",
    "ResNetV2": "resnet",
    "ViTConfig": "model",
    "VisionTransformer": "model",
    "adapt": "transfer",
    "bit_config": "resnet",
    "create_model": "model",
    "export_npz": "formats",
    "export_onnx": "onnx_export",
    "load_model": "weights",
    "model_config": "model",
    "predict": "evaluate",
    "preprocess": "evaluate",
    "resize_pos_embed": "model",
    "save_checkpoint": "weights",
    "variant_config": "model",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vitlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
