"""vitlab: the Vision Transformer of Dosovitskiy et al. (ICLR 2021), as a whole system."""

from .model import ConfigError, ViTConfig, VisionTransformer, create_model, model_config, variant_config
from .resnet import ResNetConfig, ResNetV2, bit_config
from .weights import CheckpointError, adapt, export_npz, load_model, resize_pos_embed, save_checkpoint

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ResNetConfig",
    "ResNetV2",
    "ViTConfig",
    "VisionTransformer",
    "adapt",
    "bit_config",
    "create_model",
    "export_npz",
    "load_model",
    "model_config",
    "resize_pos_embed",
    "save_checkpoint",
    "variant_config",
]
__version__ = "0.1.0"
