"""The paper's convolutional baselines and the hybrid's stem: ResNets with GroupNorm and weight standardisation.

Two ResNets share the parts below (section 4.1, "Model Variants", and appendix D.1 of the paper):

- **BiT** (Kolesnikov et al. 2020, "Big Transfer"): a pre-activation ResNet-v2 whose batch norms are replaced by
  GroupNorm and whose convolutions standardise their weights. `bit-r50x1` is ResNet-50 (stages of 3, 4, 6, 3
  units), `bit-r26x1` ResNet-26 (2, 2, 2, 2), and `xK` multiplies every width by K. It is `ResNetV2` below,
  numerically the big_transfer PyTorch model (and timm's `resnetv2_50x1_bit`): weights standardised as
  (w - mean) / sqrt(var + 1e-10), GroupNorm eps 1e-5, symmetric padding, the stride on the 3×3 convolution.
- **The hybrid's stem** (`vit_jax/models_vit.py` and `models_resnet.py`): the post-activation bottleneck units of
  the official code, before the ViT. Its feature map's cells are the ViT's patches: R50+ViT-B/16 runs the root
  block (stride 4) and three stages (3, 4, 9), the fourth stage's units moved into the third, so that a 224 px
  image gives 14×14 cells of 1024 channels. It is `HybridStem`, numerically the official Flax model: weights
  standardised as (w - mean) / (std + 1e-5), GroupNorm eps 1e-6, TensorFlow's "SAME" padding.

Both count 32 groups per GroupNorm (fewer when a layer has fewer than 32 channels, which only the small
width factors of this machine's experiments reach).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import Config, ConfigError, check_inputs_and_classes, positive


# --------------------------------------------------------------------------------------------------------------
# The parts
# --------------------------------------------------------------------------------------------------------------


def same_padding(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow's "SAME" padding: output size ceil(n / stride), the odd pixel of padding after, not before."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
        total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


def standardize_weight(w: torch.Tensor, eps: float, form: str) -> torch.Tensor:
    """Weight standardisation (Qiao et al. 2019) over each output channel's fan-in.

    form "std": (w - mean) / (std + eps), the official ViT hybrid; "var": (w - mean) / sqrt(var + eps), BiT.
    """
    var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, correction=0)
    if form == "std":
        return (w - mean) / (var.sqrt() + eps)
    return (w - mean) / torch.sqrt(var + eps)


class StdConv2d(nn.Conv2d):
    """A bias-free convolution with standardised weights; `padding="same"` pads as TensorFlow does."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | str = 0, *, eps: float, form: str):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=0 if padding == "same" else padding, bias=False)
        self.same = padding == "same"
        self.eps, self.form = eps, form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            x = same_padding(x, self.kernel_size[0], self.stride[0])
        w = standardize_weight(self.weight, self.eps, self.form)
        return F.conv2d(x, w, None, self.stride, self.padding)


def lecun_normal_(w: torch.Tensor) -> None:
    """Flax's default kernel init: a normal truncated at 2σ, rescaled so that the variance is 1 / fan_in."""
    fan_in = w[0].numel()
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # the std of a unit normal truncated to [-2, 2]
    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


def group_norm(channels: int, eps: float) -> nn.GroupNorm:
    """GroupNorm with 32 groups (both BiT and Flax's default), or one per channel below 32 channels."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=eps)


# The official hybrid's numerics (Flax): see the module docstring.
_HYBRID = dict(eps=1e-5, form="std")
_HYBRID_GN_EPS = 1e-6


class ResidualUnit(nn.Module):
    """The official hybrid's bottleneck unit (`models_resnet.ResidualUnit`): conv-GN-ReLU twice, conv-GN, the
    projected or identity shortcut added, ReLU. The stride is on the 3×3 convolution. Names as in the npz."""

    def __init__(self, in_channels: int, features: int, stride: int):
        super().__init__()
        out = 4 * features
        self.conv_proj = self.gn_proj = None
        if in_channels != out or stride != 1:
            self.conv_proj = StdConv2d(in_channels, out, 1, stride, "same", **_HYBRID)
            self.gn_proj = group_norm(out, _HYBRID_GN_EPS)
        self.conv1 = StdConv2d(in_channels, features, 1, 1, "same", **_HYBRID)
        self.gn1 = group_norm(features, _HYBRID_GN_EPS)
        self.conv2 = StdConv2d(features, features, 3, stride, "same", **_HYBRID)
        self.gn2 = group_norm(features, _HYBRID_GN_EPS)
        self.conv3 = StdConv2d(features, out, 1, 1, "same", **_HYBRID)
        self.gn3 = group_norm(out, _HYBRID_GN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.conv_proj is None else self.gn_proj(self.conv_proj(x))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return F.relu(residual + y)


class Stage(nn.Module):
    """`num_units` units of one kind (ResidualUnit or PreActUnit), the first changing width and stride."""

    def __init__(self, unit: type[nn.Module], in_channels: int, features: int, num_units: int, stride: int):
        super().__init__()
        self.units = nn.ModuleList(
            unit(in_channels if i == 0 else 4 * features, features, stride if i == 0 else 1) for i in range(num_units)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x)
        return x


def make_stages(unit: type[nn.Module], width: int, num_layers: Sequence[int]) -> tuple[nn.ModuleList, int]:
    """The stages after the root block, and their output channels: stage i has `num_layers[i]` units of width
    width * 2^i (4x that out), the first at stride 1 and each next one at stride 2."""
    stages, channels = [], width
    for i, units in enumerate(num_layers):
        stages.append(Stage(unit, channels, width * 2**i, units, 1 if i == 0 else 2))
        channels = 4 * width * 2**i
    return nn.ModuleList(stages), channels


def root_width(width_factor: float) -> int:
    """The root block's width, as the official code and BiT round it: int(64 * width_factor)."""
    return int(64 * width_factor)


# The hybrid's root blocks: "7x7" is the paper's (a 7×7 stride-2 convolution, then a 3×3 stride-2 max-pool:
# stride 4); "3x3" a 3×3 stride-1 convolution and no pooling (stride 1), the root of He et al.'s CIFAR ResNets
# (2016, section 4.2) for images of 32 px, where the paper's root would leave 8×8 cells of a 32 px image after
# one convolution.
RESNET_ROOTS = {"7x7": 4, "3x3": 1}  # root -> its stride


def hybrid_stride(num_layers: Sequence[int], root: str = "7x7") -> int:
    """The stem's total stride: the root block's (4 for the paper's, 1 for "3x3"), times 2 for every stage after
    the first."""
    return RESNET_ROOTS[root] * 2 ** max(len(num_layers) - 1, 0)


def hybrid_channels(num_layers: Sequence[int], width_factor: float) -> int:
    """The channels of the stem's output: the root's width, or 4 x the last stage's width."""
    width = root_width(width_factor)
    return width if not num_layers else 4 * width * 2 ** (len(num_layers) - 1)


class HybridStem(nn.Module):
    """The ResNet before the hybrid ViT (section 3.1, "Hybrid Architecture"): the root block (the paper's: 7×7
    stride-2 convolution, GroupNorm, ReLU, 3×3 stride-2 max-pool; or with root "3x3", a 3×3 stride-1
    convolution, GroupNorm, ReLU) then `num_layers` stages of residual units, the first at stride 1 and each next
    one halving the resolution and doubling the width.
    """

    def __init__(self, in_chans: int, num_layers: Sequence[int], width_factor: float, root: str = "7x7"):
        super().__init__()
        width = root_width(width_factor)
        self.pool = root == "7x7"
        kernel, stride = (7, 2) if self.pool else (3, 1)
        self.conv_root = StdConv2d(in_chans, width, kernel, stride, "same", **_HYBRID)
        self.gn_root = group_norm(width, _HYBRID_GN_EPS)
        self.stages, self.out_channels = make_stages(ResidualUnit, width, num_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn_root(self.conv_root(x)))  # (B, w, H/2, W/2); "3x3": (B, w, H, W)
        if self.pool:
            x = F.max_pool2d(same_padding(x, 3, 2, value=-math.inf), 3, 2)  # (B, w, H/4, W/4)
        for stage in self.stages:
            x = stage(x)
        return x  # (B, C, H/s, W/s)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Flax's defaults, as the official model initialises: LeCun-normal kernels, GroupNorm scale 1 and
        bias 0, except the last GroupNorm of each unit, whose scale starts at 0 (each unit starts as identity)."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                lecun_normal_(m.weight)
            elif isinstance(m, nn.GroupNorm):
                nn.init.zeros_(m.weight) if name.endswith("gn3") else nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------------------------
# BiT: the pre-activation ResNet-v2
# --------------------------------------------------------------------------------------------------------------

_BIT = dict(eps=1e-10, form="var")
_BIT_GN_EPS = 1e-5


@dataclass
class ResNetConfig(Config):
    """Everything that defines a BiT ResNet; saved as `config.json` (with "family": "bit")."""

    image_size: tuple[int, int] = (224, 224)  # the resolution it trains and evaluates at (any fits the weights)
    in_chans: int = 3
    num_classes: int = 1000  # 0: no head, the model returns the pooled features
    num_layers: tuple[int, ...] = (3, 4, 6, 3)  # units per stage
    width_factor: float = 1.0  # the K of "R50xK"
    mean: tuple[float, ...] | None = None  # None: 0.5 per channel, inputs in [-1, 1] as BiT's
    std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] | None = None
    name: str | None = None  # e.g. "BiT-R50x1"

    family = "bit"  # config.json says so: {"family": "bit", ...} (a ViT's has no family); not a field
    # The fields loaded weights fix (transfer.adapt changes the others).
    ARCHITECTURE = ("num_layers", "width_factor", "in_chans")
    RULES = (
        ("in_chans", positive, "a positive int"),
        ("num_classes", lambda v: v >= 0, "an int >= 0"),
    )

    def check(self) -> None:
        check_layers(self.num_layers, "num_layers", allow_empty=False)
        check_width(self.width_factor, "width_factor")
        check_inputs_and_classes(self)
        if min(self.image_size) < 32:
            raise ConfigError(f"image_size {self.image_size} is too small for a ResNet (its stride is 32)")


def check_layers(value: tuple[int, ...], field: str, allow_empty: bool) -> None:
    if any(v < 1 for v in value) or len(value) > 4 or (not value and not allow_empty):
        raise ConfigError(f"{field} must be {'up to' if allow_empty else '1 to'} 4 positive ints (units per "
                          f"stage), got {value!r}")


def check_width(value: float, field: str) -> None:
    if not int(64 * value) >= 1:
        raise ConfigError(f"{field} must be a number with int(64 * {field}) >= 1, got {value!r}")


class PreActUnit(nn.Module):
    """BiT's pre-activation bottleneck: GN-ReLU before each of the three convolutions; the shortcut is the input
    itself, or when the shape changes a 1×1 convolution of the first pre-activation."""

    def __init__(self, in_channels: int, features: int, stride: int):
        super().__init__()
        out = 4 * features
        self.gn1 = group_norm(in_channels, _BIT_GN_EPS)
        self.conv1 = StdConv2d(in_channels, features, 1, **_BIT)
        self.gn2 = group_norm(features, _BIT_GN_EPS)
        self.conv2 = StdConv2d(features, features, 3, stride, 1, **_BIT)
        self.gn3 = group_norm(features, _BIT_GN_EPS)
        self.conv3 = StdConv2d(features, out, 1, **_BIT)
        self.conv_proj = StdConv2d(in_channels, out, 1, stride, **_BIT) if in_channels != out or stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = F.relu(self.gn1(x))
        residual = x if self.conv_proj is None else self.conv_proj(preact)
        y = self.conv1(preact)
        y = self.conv2(F.relu(self.gn2(y)))
        y = self.conv3(F.relu(self.gn3(y)))
        return y + residual


class ResNetV2(nn.Module):
    """BiT: root (7×7 stride-2 convolution, 3×3 stride-2 max-pool), stages, GroupNorm-ReLU, global average pool,
    a zero-initialised head. `forward_features` / `forward_head` as the ViT's, for the evaluators."""

    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.cfg = cfg
        width = root_width(cfg.width_factor)
        self.conv_root = StdConv2d(cfg.in_chans, width, 7, 2, 3, **_BIT)
        self.stages, channels = make_stages(PreActUnit, width, cfg.num_layers)
        self.norm = group_norm(channels, _BIT_GN_EPS)
        self.num_features = channels
        self.head = nn.Linear(channels, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """He-normal convolutions (fan-out), GroupNorm scale 1 and bias 0, a zero head (as BiT's)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_root(x)  # (B, w, H/2, W/2)
        x = F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, 2)  # (B, w, H/4, W/4); BiT pads with zeros
        for stage in self.stages:
            x = stage(x)
        return F.relu(self.norm(x))  # (B, C, H/32, W/32)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))  # (B, C)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------------------------------------------
# Names, and cost
# --------------------------------------------------------------------------------------------------------------

# Units per stage of the ResNets the papers name. The hybrids keep a ResNet's units but stop after fewer
# stages, moving the units of the dropped stages into the last one kept (section 4.1: "for the hybrids ... we
# remove stage 4, place the same number of layers in stage 3"): R50 at stride 16 is (3, 4, 9).
RESNET_DEPTHS: dict[int, tuple[int, ...]] = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}

_BIT_RE = re.compile(r"^(?:bit[-_])?r(\d+)x(\d+(?:\.\d+)?)$", re.IGNORECASE)


def is_bit_name(name: str) -> bool:
    return isinstance(name, str) and bool(_BIT_RE.match(name.strip()))


def bit_config(name: str, **overrides) -> ResNetConfig:
    """The config of a named BiT ResNet ("bit-r50x1", "BiT-R26x2", "r50x1") with fields overridden."""
    match = _BIT_RE.match(name.strip()) if isinstance(name, str) else None
    if not match or int(match.group(1)) not in RESNET_DEPTHS:
        raise ConfigError(f"unknown model {name!r}: expected bit-r{{{','.join(map(str, RESNET_DEPTHS))}}}xK, "
                          "e.g. bit-r50x1, bit-r26x1")
    depth, k = int(match.group(1)), float(match.group(2))
    fields = dict(num_layers=RESNET_DEPTHS[depth], width_factor=int(k) if k.is_integer() else k,
                  name=f"BiT-R{depth}x{match.group(2)}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ResNetConfig)})
    if unknown:
        raise ConfigError(f"{', '.join(unknown)} do{'es' if len(unknown) == 1 else ''} not apply to a BiT ResNet "
                          f"({name})")
    fields.update(overrides)
    return ResNetConfig(**fields)


def hybrid_layers(depth: int, stages: int) -> tuple[int, ...]:
    """The units per stage of an R{depth} stem cut after `stages` stages (0: the root block alone)."""
    if depth not in RESNET_DEPTHS:
        raise ConfigError(f"no ResNet-{depth}: expected one of {', '.join(map(str, RESNET_DEPTHS))}")
    full = RESNET_DEPTHS[depth]
    if stages == 0:
        return ()
    return full[: stages - 1] + (sum(full[stages - 1:]),)


@torch.no_grad()
def count_macs(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-adds of the convolutions and linear layers of one forward pass of a (1, C, H, W) input, counted
    on the meta device (no memory, no arithmetic). Norms, activations and pooling are not counted."""
    total = 0

    def hook(m, args, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += out[0].numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        module(torch.zeros(1, *input_shape, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total


def resnet_macs(cfg: ResNetConfig) -> int:
    with torch.device("meta"):
        model = ResNetV2(cfg)
    return count_macs(model, (cfg.in_chans, *cfg.image_size))


def stem_macs(in_chans: int, num_layers: Sequence[int], width_factor: float, image_size: tuple[int, int],
              root: str = "7x7") -> int:
    with torch.device("meta"):
        stem = HybridStem(in_chans, num_layers, width_factor, root)
    return count_macs(stem, (in_chans, *image_size))
