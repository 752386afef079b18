"""vitlab: the Vision Transformer of Dosovitskiy et al. (ICLR 2021), as a whole system."""

from .model import ConfigError, ViTConfig, VisionTransformer, create_model, variant_config
from .weights import CheckpointError, adapt, export_npz, load_model, resize_pos_embed, save_checkpoint

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ViTConfig",
    "VisionTransformer",
    "adapt",
    "create_model",
    "export_npz",
    "load_model",
    "resize_pos_embed",
    "save_checkpoint",
    "variant_config",
]
__version__ = "0.1.0"
