"""The Vision Transformer of Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021).

Read it next to the paper's section 3.1 (Eq. 1-4) and appendix B.1. Numerically it is the official Flax model
(google-research/vision_transformer, `vit_jax/models_vit.py`):

- LayerNorm with eps 1e-6 (Flax's default; PyTorch's is 1e-5);
- GELU in its tanh form, which is what Flax's `nn.gelu` computes by default. timm and Hugging Face use the
  exact (erf) GELU, so their weights want `gelu="exact"`;
- the encoder ends with its own LayerNorm (`encoder_norm`), and with `classifier="gap"` the tokens are averaged
  *after* it;
- the head is zero-initialised, and an optional `representation_size` adds the pre-logits layer
  (Dense + tanh) the paper uses when pre-training.

The hybrid (section 3.1) is the same model with `resnet_num_layers` set: its patch embedding reads the feature
map of a ResNet stem (vitlab/resnet.py). Masked patch prediction (appendix B.1.2, vitlab/mpp.py) adds a [mask]
embedding and a mean-colour head (`mpp_classes`, `forward_mpp`).

Attention goes through `F.scaled_dot_product_attention` (fused kernels); the attention weights are computed
only for the layers a caller asks for, per call (`model(x, return_attention=[11])`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import CheckpointError, Config, ConfigError, check_inputs_and_classes, positive
from .resnet import (
    HybridStem,
    ResNetConfig,
    ResNetV2,
    bit_config,
    check_layers,
    check_width,
    hybrid_channels,
    hybrid_layers,
    hybrid_stride,
    is_bit_name,
    lecun_normal_,
    resnet_macs,
    stem_macs,
)


@dataclass
class ViTConfig(Config):
    """Everything that defines a ViT; saved as `config.json` beside every checkpoint's weights."""

    image_size: tuple[int, int] = (224, 224)  # (H, W); an int means square
    patch_size: tuple[int, int] = (16, 16)  # (P_h, P_w); an int means square
    in_chans: int = 3
    num_classes: int = 1000  # 0: no head, the model returns the (pre-logits) representation
    hidden_size: int = 768  # D
    num_layers: int = 12  # L
    num_heads: int = 12
    mlp_dim: int = 3072
    classifier: Literal["token", "gap"] = "token"  # "token": the [class] token; "gap": mean of the patch tokens
    representation_size: int | None = None  # the pre-logits Dense + tanh layer (pre-training heads)
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    # Stochastic depth (Huang et al. 2016; "How to train your ViT", AugReg's `sd`): each block's residual branches
    # are dropped per image with a rate rising linearly from 0 in the first block to this in the last.
    stochastic_depth: float = 0.0
    # Patch dropout (Liu et al. 2022; timm's patch_drop_rate): in training, each image keeps a random (1 - rate) of
    # its patch tokens after the position embeddings are added; the others are left out of the encoder, so a step
    # costs about that much less. The identity in eval.
    patch_dropout: float = 0.0
    # "learned": the paper's 1-D embeddings; "sincos2d": fixed 2-D sine-cosine ones (big_vision's posemb="sincos2d",
    # Beyer et al. 2022), computed from the grid, not trained; the [class] token's is zero.
    posemb: Literal["learned", "sincos2d"] = "learned"
    gelu: Literal["tanh", "exact"] = "tanh"  # "tanh": the official Flax model; "exact": timm and Hugging Face
    layer_norm_eps: float = 1e-6
    # The input normalisation the weights expect: official checkpoints take images in [-1, 1].
    mean: tuple[float, ...] | None = None  # None: 0.5 per channel
    std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] | None = None
    name: str | None = None  # the variant it was built from, e.g. "ViT-B/16"
    # The hybrid (section 3.1, "Hybrid Architecture"): the patches are cells of a ResNet's feature map, the
    # official `config.resnet`: units per stage (() for the root block alone) and the width factor.
    # None: a plain ViT, whose patches are cut from the image.
    resnet_num_layers: tuple[int, ...] | None = None
    resnet_width_factor: float = 1.0
    # The stem's root block: "7x7", the paper's (stride 4), or "3x3" (stride 1, for 32 px images; vitlab.resnet).
    resnet_root: Literal["7x7", "3x3"] = "7x7"
    # Masked patch prediction (appendix B.1.2): a learned [mask] embedding and a head predicting each corrupted
    # patch's mean colour, one of mpp_classes (512 for 3 bits per RGB channel). 0: a plain classifier.
    mpp_classes: int = 0

    # The fields loaded weights fix: their shapes (transfer.adapt changes the others).
    ARCHITECTURE = ("patch_size", "in_chans", "hidden_size", "num_layers", "num_heads", "mlp_dim", "classifier",
                    "posemb", "resnet_num_layers", "resnet_width_factor", "resnet_root")
    RULES = (
        ("in_chans hidden_size num_layers num_heads mlp_dim representation_size", positive, "a positive int"),
        ("num_classes mpp_classes", lambda v: v >= 0, "an int >= 0"),
        ("dropout_rate attention_dropout_rate stochastic_depth patch_dropout", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
        ("layer_norm_eps", lambda v: v > 0, "> 0"),
    )

    def check(self) -> None:
        if self.resnet_num_layers is not None:
            check_layers(self.resnet_num_layers, "resnet_num_layers", allow_empty=True)
            check_width(self.resnet_width_factor, "resnet_width_factor")
        stride = self.stem_stride
        for (h, p, axis) in zip(self.image_size, self.patch_size, ("height", "width")):
            if p < 1 or h < 1 or h % (p * stride):
                raise ConfigError(
                    f"patch_size {self.patch_size} does not divide image_size {self.image_size} ({axis} {h} % {p} != 0)"
                    if stride == 1 else
                    f"image_size {self.image_size} is not a multiple of the hybrid's stem stride {stride} x "
                    f"patch_size {self.patch_size} ({axis} {h} % {p * stride} != 0)"
                )
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"num_heads {self.num_heads} does not divide hidden_size {self.hidden_size}")
        if self.patch_dropout and self.mpp_classes:
            raise ConfigError("patch_dropout does not apply to masked patch prediction, which predicts every patch")
        if self.posemb == "sincos2d" and self.hidden_size % 4:
            raise ConfigError(f"posemb sincos2d needs a hidden_size divisible by 4, got {self.hidden_size}")
        check_inputs_and_classes(self)

    @property
    def stem_stride(self) -> int:
        """How much the hybrid's ResNet stem reduces the image before the patches are cut (1: no stem)."""
        return 1 if self.resnet_num_layers is None else hybrid_stride(self.resnet_num_layers, self.resnet_root)


    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid (H/P_h, W/P_w); for a hybrid, of the stem's feature map (H/(sP_h), W/(sP_w))."""
        return self.grid_of(self.image_size)

    def grid_of(self, image_size: Sequence[int]) -> tuple[int, int]:
        """The patch grid of images of `image_size` (H, W)."""
        s = self.stem_stride
        return (image_size[0] // (s * self.patch_size[0]), image_size[1] // (s * self.patch_size[1]))

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.classifier == "token" else 0


# --------------------------------------------------------------------------------------------------------------
# The variants: the paper's Table 1 (Base, Large, Huge), with Tiny and Small from DeiT and "How to train your
# ViT" (Steiner et al. 2021), as big_vision's `decode_variant` has them.
# --------------------------------------------------------------------------------------------------------------

VARIANTS: dict[str, dict[str, int]] = {
    "Ti": dict(hidden_size=192, num_layers=12, num_heads=3, mlp_dim=768),
    "S": dict(hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536),
    "B": dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072),
    "L": dict(hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096),
    "H": dict(hidden_size=1280, num_layers=32, num_heads=16, mlp_dim=5120),
}

_VARIANT_RE = re.compile(r"^(?:(r\d*)\+)?(?:vit[-_])?(ti|s|b|l|h)[/_-](\d+)$", re.IGNORECASE)


def variant_config(name: str, **overrides) -> ViTConfig:
    """The config of a named variant with fields overridden: "ViT-B/16", "vit-ti/4" (case-insensitive), or a
    hybrid "R50+ViT-B/16", "r26+vit-s/32", "R+ViT-Ti/16" (the root block alone).

    A hybrid's number is its effective patch size, the stem's stride times the patch cut from its feature map:
    R50+ViT-B/16 is the official model, three stages (3, 4, 9) of stride 16 and 1×1 patches; R26+ViT-S/32 four
    stages (2, 2, 2, 2). The stem keeps as many stages as its stride allows (4 for the root block, x2 per stage
    after the first, at most four) and puts the units of the stages it drops into its last one.
    """
    match = _VARIANT_RE.match(name.strip()) if isinstance(name, str) else None
    if not match:
        raise ConfigError(
            f"unknown model {name!r}: expected vit-{{ti,s,b,l,h}}/PATCH (e.g. vit-b/16, vit-ti/4), a hybrid "
            "r50+vit-b/16, or a BiT ResNet bit-r50x1"
        )
    size = {"ti": "Ti", "s": "S", "b": "B", "l": "L", "h": "H"}[match.group(2).lower()]
    patch = int(match.group(3))
    if patch < 1:
        raise ConfigError(f"patch size in {name!r} must be >= 1")
    fields = dict(VARIANTS[size], patch_size=patch, name=f"ViT-{size}/{patch}")
    if not match.group(1) and {"resnet_num_layers", "resnet_width_factor"} & set(overrides):
        raise ConfigError(f"resnet_num_layers and resnet_width_factor apply to hybrids and BiT ResNets, not to {name} "
                          "(e.g. r50+vit-b/16, bit-r50x1)")
    if not match.group(1) and "resnet_root" in overrides:
        raise ConfigError(f"resnet_root applies to hybrids, not to {name} (e.g. r26+vit-ti/4)")
    if match.group(1):  # a hybrid
        depth = match.group(1)[1:]
        stages = next((k for k in (4, 3, 2, 1) if patch % (4 * 2 ** (k - 1)) == 0), None)
        if stages is None:
            raise ConfigError(f"{name!r}: a hybrid's patch size is a multiple of its stem's stride, 4 or more")
        if not depth:
            stages = 0  # the root block alone, stride 4
        fields.update(name=f"R{depth}+ViT-{size}/{patch}",
                      resnet_num_layers=hybrid_layers(int(depth), stages) if depth else ())
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ViTConfig)})
    if unknown:
        raise ConfigError(f"unknown ViTConfig field(s): {', '.join(unknown)}")
    fields.update(overrides)
    if match.group(1) and "patch_size" not in overrides:  # the name's patch over the stride of the stem as built
        layers, root = fields["resnet_num_layers"], fields.get("resnet_root", "7x7")
        stride = hybrid_stride(layers, root)
        if patch % stride:
            raise ConfigError(f"{name!r}: its patch size {patch} is not a multiple of the stride {stride} of the stem "
                              f"of resnet_num_layers {layers} and resnet_root {root!r}")
        fields["patch_size"] = patch // stride
    return ViTConfig(**fields)


def model_config(name: str, **overrides):
    """The config of any named model: a ViT or hybrid (`variant_config`) or a BiT ResNet ("bit-r50x1",
    vitlab.resnet.bit_config)."""
    if is_bit_name(name):
        return bit_config(name, **overrides)
    return variant_config(name, **overrides)


def config_from_dict(data: dict):
    """A ViTConfig, or a ResNetConfig when `data` says "family": "bit" (a checkpoint's config.json)."""
    if isinstance(data, dict) and data.get("family") == "bit":
        return ResNetConfig.from_dict(data)
    return ViTConfig.from_dict(data)


def build_model(cfg) -> nn.Module:
    """The freshly initialised model a config describes: a VisionTransformer or a BiT ResNetV2."""
    return ResNetV2(cfg) if isinstance(cfg, ResNetConfig) else VisionTransformer(cfg)


def create_model(name: str, **overrides) -> nn.Module:
    """A freshly initialised model of a named variant, e.g. `create_model("vit-b/16", num_classes=10)`,
    `create_model("r50+vit-b/16")`, `create_model("bit-r50x1")`."""
    return build_model(model_config(name, **overrides))


# --------------------------------------------------------------------------------------------------------------
# The parts, in the order of the paper's equations.
# --------------------------------------------------------------------------------------------------------------


def posemb_sincos_2d(grid: tuple[int, int], width: int, num_prefix_tokens: int = 0,
                     temperature: float = 10_000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings (1, prefix + h*w, D), as big_vision's `posemb_sincos_2d`: a
    quarter of the width each for sin and cos of the column, then of the row, at frequencies
    1 / temperature^(k / (D/4 - 1)); the prefix ([class]) tokens get zeros. Computed in float64, stored as float32."""
    h, w = grid
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    quarter = width // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1))
    x, y = x.flatten()[:, None] * omega, y.flatten()[:, None] * omega  # (h*w, D/4)
    pe = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)
    return torch.cat([torch.zeros(num_prefix_tokens, width, dtype=torch.float64), pe]).float()[None]


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
    i.e. `align_corners=True`. "bicubic" is timm's choice (align_corners=False, antialiased). The same grid returns
    the input.
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
    # bicubic antialiases when it shrinks, as timm's `resample_abs_pos_embed` does (no effect when it grows)
    grid = F.interpolate(grid, size=new_grid, mode=mode, align_corners=(mode == "bilinear"),
                         antialias=(mode == "bicubic"))
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def drop_patches(x: torch.Tensor, rate: float, num_prefix_tokens: int) -> torch.Tensor:
    """Patch dropout: each image's prefix tokens and a random max(1, round((1 - rate) N)) of its N patch tokens,
    in their order. (B, T, D) -> (B, prefix + kept, D)."""
    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    B, N, D = patches.shape
    kept = max(1, round((1.0 - rate) * N))
    index = torch.rand(B, N, device=x.device).argsort(dim=1)[:, :kept].sort(dim=1).values  # (B, kept)
    return torch.cat([prefix, patches.gather(1, index[..., None].expand(B, kept, D))], dim=1)


def drop_path_rates(cfg: ViTConfig) -> list[float]:
    """Each block's stochastic-depth rate: rising linearly from 0 in the first to cfg.stochastic_depth in the last,
    as DeiT and timm set it (`torch.linspace(0, rate, depth)`)."""
    L = cfg.num_layers
    return [cfg.stochastic_depth * i / max(L - 1, 1) for i in range(L)]


class PatchEmbed(nn.Module):
    """Eq. 1, x_p^i E: cut the image into P×P patches, flatten and project each to D.

    A convolution with kernel = stride = P is exactly that linear map applied to every patch. In the hybrid the
    patches are cut from the feature map of a ResNet stem (`backbone`, vitlab.resnet.HybridStem) instead.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.backbone = None
        channels = cfg.in_chans
        if cfg.resnet_num_layers is not None:
            self.backbone = HybridStem(cfg.in_chans, cfg.resnet_num_layers, cfg.resnet_width_factor, cfg.resnet_root)
            channels = self.backbone.out_channels
        self.proj = nn.Conv2d(channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone is not None:
            x = self.backbone(x)  # (B, C', H/s, W/s)
        x = self.proj(x)  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order


class Attention(nn.Module):
    """Multi-head self-attention (appendix A, Eq. 5-8), q, k and v from one fused projection."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.scale = self.head_dim**-0.5
        self.dropout_p = cfg.attention_dropout_rate
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, D_h) each
        dropout_p = self.dropout_p if self.training else 0.0
        weights = None
        if need_weights or not _fused_pays(q):  # the same maths written out (Eq. 6)
            # In bf16 the softmax reads bf16 scores but subtracts the max, exponentiates and sums in float32 inside
            # the kernel, then rounds to bf16, as a float32 softmax rounded for `@ v` would: without the two casts
            # of a (B, H, N, N) tensor, which cost ~10% of a step at 65 tokens (benchmarks/step_speed.py).
            weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N)
            x = F.dropout(weights, dropout_p, self.training) @ v
            weights = weights if need_weights else None
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, H, N, D_h)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj(x), weights


def _fused_pays(q: torch.Tensor) -> bool:
    """Whether `scaled_dot_product_attention` beats the written-out product for these queries.

    It does on GPUs, and on CPUs for long sequences; for short ones PyTorch's fused CPU kernel is the slower one, in
    float32 up to ~128 tokens and in bf16/fp16 (softmax in float32) up to ~256. Forward and backward of one layer's
    attention, medians (benchmarks/parts_speed.py; 2 cores): in float32 on an AVX2 CPU, 16 tokens (batch 64, 4
    heads of 32: the demo) 2.50 ms fused against 2.09 written out, 65 tokens 19.95 against 19.56, 197 tokens 46.3
    against 55.7; in bf16 on an AVX-512 BF16 CPU, 16 tokens 5.5 against 0.7, 197 tokens 55 against 49, 577 tokens
    90 against 120. Compiled, the written-out product fuses with its neighbours: the demo's training loop averaged
    885-1,024 images/s in this round's runs against 756-801 with the fused kernel in the last round's, on the AVX2 CPU.
    """
    if q.device.type != "cpu":
        return True
    return q.shape[-2] > (128 if q.dtype == torch.float32 else 256)


class Mlp(nn.Module):
    """The two-layer MLP with a GELU between (section 3.1), dropout after each layer as in the official code."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.mlp_dim)
        self.act = TanhGELU() if cfg.gelu == "tanh" else nn.GELU()
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class TanhGELU(nn.GELU):
    """GELU in its tanh form, x/2 (1 + tanh(z)) with z = sqrt(2/pi) (x + 0.044715 x^3) (Flax's `nn.gelu`).

    Under torch.compile it is computed as x sigmoid(2z), the same function (1 + tanh(z) = 2 sigmoid(2z)), in
    float32: inductor's vectorised sigmoid runs on exp, ~2x faster on a CPU than its tanh, forward and backward
    (benchmarks/parts_speed.py). Eager mode keeps PyTorch's one-kernel GELU."""

    def __init__(self):
        super().__init__(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return super().forward(x)
        xf = x.float()
        return (xf * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (xf + 0.044715 * xf * xf * xf))).to(x.dtype)


class DropPath(nn.Module):
    """Stochastic depth: in training, a residual branch's output is zeroed for a random `rate` of the images and
    scaled by 1 / (1 - rate) for the others, so that its expectation is unchanged; the identity in eval."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1.0 - self.rate)  # (B, 1, 1)
        return x * keep / (1.0 - self.rate)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class Block(nn.Module):
    """One pre-LayerNorm encoder layer: Eq. 2 then Eq. 3, a residual connection after each."""

    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.drop = nn.Dropout(cfg.dropout_rate)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, weights = self.attn(self.norm1(x), need_weights)
        x = x + self.drop_path(self.drop(y))  # Eq. 2: z'_l = MSA(LN(z_{l-1})) + z_{l-1}
        x = x + self.drop_path(self.mlp(self.norm2(x)))  # Eq. 3: z_l = MLP(LN(z'_l)) + z'_l
        return x, weights


class PreLogits(nn.Module):
    """The pre-logits layer of the pre-training head: Dense then tanh (section 3.1, "MLP with one hidden layer")."""

    def __init__(self, hidden_size: int, representation_size: int):
        super().__init__()
        self.fc = nn.Linear(hidden_size, representation_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


class VisionTransformer(nn.Module):
    """ViT: patch embedding, [class] token, 1-D position embeddings, encoder, LayerNorm, head (Eq. 1-4)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.classifier == "token" else None
        if cfg.posemb == "sincos2d":  # fixed: a buffer (saved with the weights, so the npz layout carries it too)
            self.register_buffer("pos_embed", posemb_sincos_2d(cfg.grid_size, D, cfg.num_prefix_tokens))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_prefix_tokens + cfg.num_patches, D))
        self.pos_drop = nn.Dropout(cfg.dropout_rate)
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in drop_path_rates(cfg))
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)  # the official `encoder_norm`
        self.pre_logits = PreLogits(D, cfg.representation_size) if cfg.representation_size else nn.Identity()
        self.num_features = cfg.representation_size or D
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes else nn.Identity()
        if cfg.mpp_classes:  # masked patch prediction (appendix B.1.2)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
            self.mpp_head = nn.Linear(D, cfg.mpp_classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisers: what a model trained from scratch starts from."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if name.endswith("attn.qkv"):  # Flax inits q, k and v as three D×D maps, each xavier-uniform
                    for w in module.weight.chunk(3, dim=0):
                        nn.init.xavier_uniform_(w)
                    nn.init.zeros_(module.bias)
                elif name.endswith("attn.proj"):
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)
                elif ".mlp." in name:  # MlpBlock: xavier-uniform kernels, biases N(0, 1e-6)
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.normal_(module.bias, std=1e-6)
                elif name in ("head", "mpp_head"):  # zero: a new task starts from uniform predictions (B.1.1)
                    nn.init.zeros_(module.weight)
                    nn.init.zeros_(module.bias)
                else:  # pre_logits: Flax Dense default, LeCun normal
                    lecun_normal_(module.weight)
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.patch_embed.backbone is not None:
            self.patch_embed.backbone.init_weights()
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.normal_(self.pos_embed, std=0.02)
        if self.cfg.mpp_classes:
            nn.init.normal_(self.mask_token, std=0.02)
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token)

    def _attention_layers(self, return_attention: bool | Iterable[int]) -> set[int]:
        L = len(self.blocks)
        if return_attention is True:
            return set(range(L))
        if return_attention is False or return_attention is None:
            return set()
        layers = set()
        for i in return_attention:
            if not -L <= int(i) < L:
                raise ConfigError(f"return_attention: layer {i} out of range for a {L}-layer model")
            layers.add(int(i) % L)
        return layers

    def embed(self, x: torch.Tensor, corruption=None) -> torch.Tensor:
        """Eq. 1, the encoder's input z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos: (B, N+1, D), or (B, N, D)
        with "gap". `corruption` (vitlab.mpp.Corruption) replaces patch embeddings before the position embeddings
        are added (masked patch prediction)."""
        grid = self.cfg.grid_of(x.shape[-2:])
        x = self.patch_embed(x)  # (B, N, D)
        if corruption is not None:
            x = corruption.apply(x, self.mask_token)  # masked patch prediction: some patch embeddings replaced
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N+1, D), x_class
        if grid != self.cfg.grid_size:  # other images than image_size (progressive resizing): E_pos for their grid,
            # learned ones by timm's antialiased bicubic: each position of a smaller grid averages its footprint, so
            # that all of them learn
            return x + self.pos_embed_for(grid, "bicubic")
        return x + self.pos_embed  # + E_pos

    def pos_embed_for(self, grid: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
        """E_pos for a patch grid (h, w): fixed sine-cosine ones computed for it, learned ones interpolated in 2-D
        (`resize_pos_embed`'s `mode`). What `vitlab.transfer.adapt` gives a new resolution."""
        if self.cfg.posemb == "sincos2d":
            return posemb_sincos_2d(grid, self.cfg.hidden_size, self.cfg.num_prefix_tokens).to(self.pos_embed.device)
        return resize_pos_embed(self.pos_embed, self.cfg.grid_size, grid, self.cfg.num_prefix_tokens, mode)

    def forward_features(
        self, x: torch.Tensor, return_attention: bool | Iterable[int] = False, corruption=None
    ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The encoder's output after its final LayerNorm, all tokens: (B, N+1, D), or (B, N, D) with "gap"."""
        wanted = self._attention_layers(return_attention)
        x = self.pos_drop(self.embed(x, corruption))  # Eq. 1
        if self.training and self.cfg.patch_dropout:
            x = drop_patches(x, self.cfg.patch_dropout, self.cfg.num_prefix_tokens)
        maps = {}
        for i, block in enumerate(self.blocks):
            x, weights = block(x, need_weights=i in wanted)
            if weights is not None:
                maps[i] = weights  # (B, heads, N+1, N+1)
        x = self.norm(x)  # Eq. 4: LN(z_L)
        return (x, maps) if return_attention else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the encoder output ([class] token or mean), the pre-logits layer, then the head."""
        x = x[:, 0] if self.cfg.classifier == "token" else x.mean(dim=1)  # (B, D), y = z_L^0
        x = self.pre_logits(x)
        return x if pre_logits else self.head(x)

    def forward(
        self, x: torch.Tensor, return_attention: bool | Iterable[int] = False, corruption=None
    ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Logits (B, num_classes); with `return_attention` also {layer: (B, heads, N', N')} for those layers;
        with `corruption`, masked patch prediction's logits (B, N, mpp_classes) (`forward_mpp`)."""
        if corruption is not None:
            return self.forward_mpp(x, corruption)
        if return_attention:
            x, maps = self.forward_features(x, return_attention)
            return self.forward_head(x), maps
        return self.forward_head(self.forward_features(x))

    def forward_mpp(self, x: torch.Tensor, corruption) -> torch.Tensor:
        """Masked patch prediction: the mean-colour logits (B, N, mpp_classes) of every patch's output token,
        the input's patch embeddings corrupted by `corruption`. The loss reads the corrupted patches' rows."""
        if not self.cfg.mpp_classes:
            raise ConfigError("this model has no masked-patch-prediction head (mpp_classes is 0)")
        tokens = self.forward_features(x, corruption=corruption)
        return self.mpp_head(tokens[:, self.cfg.num_prefix_tokens:])  # (B, N, K)


@torch.no_grad()
def mimetic_init_(model: VisionTransformer, qk: tuple[float, float] = (0.7, 0.7),
                  vo: tuple[float, float] = (0.4, 0.4)) -> None:
    """Mimetic initialisation of the self-attention layers (Trockman and Kolter 2023, "Mimetic Initialization of
    Self-Attention Layers", section 3), in place, from torch's global generator: in every layer each head's
    W_q^T W_k is the best rank-(D/heads) approximation of a1 Z + b1 I, and W_o W_v = a2 Z' - b2 I, with Z and Z'
    uniform of variance 1/D, drawn anew for each head and layer; (a1, b1) = `qk` and (a2, b2) = `vo` are the
    paper's values for ViTs. Pre-trained ViTs have these products near +identity and -identity; starting there, a
    token first attends to the tokens like it (itself and, through the position embeddings, its neighbours),
    which a ViT trained from scratch on a small dataset otherwise takes long to learn. The biases stay 0."""
    for module in model.modules():
        if isinstance(module, Attention):
            D, h = module.qkv.in_features, module.head_dim
            w = module.qkv.weight  # rows: q, k, v; each head's h rows in order (the view in Attention.forward)
            for head in range(module.num_heads):
                left, right = _factors(D, *qk, sign=1.0)  # left @ right = a1 Z + b1 I
                w[head * h:(head + 1) * h] = left[:, :h].T  # W_q^T W_k = left[:, :h] @ right[:h], the top h
                w[D + head * h:D + (head + 1) * h] = right[:h]
            left, right = _factors(D, *vo, sign=-1.0)
            w[2 * D:] = right  # W_v
            module.proj.weight.copy_(left)  # W_o: W_o W_v = a2 Z' - b2 I


def _factors(D: int, alpha: float, beta: float, sign: float) -> tuple[torch.Tensor, torch.Tensor]:
    """U sqrt(S) and sqrt(S) V^T of the SVD of A = alpha Z + sign beta I (Z uniform, variance 1/D): two D x D
    factors whose product is A, and whose first k columns and rows make its best rank-k approximation."""
    bound = (3.0 / D) ** 0.5
    A = alpha * torch.empty(D, D).uniform_(-bound, bound) + sign * beta * torch.eye(D)
    u, s, vh = torch.linalg.svd(A)
    return u * s.sqrt(), s.sqrt()[:, None] * vh


# --------------------------------------------------------------------------------------------------------------
# Size and cost, computed from the config alone (no weights allocated).
# --------------------------------------------------------------------------------------------------------------


def num_params(cfg) -> int:
    """The number of parameters of the model `cfg` builds."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(cfg).parameters())


def forward_macs(cfg) -> int:
    """Multiply-adds of one image's forward pass: the matrix products, including attention's QK^T and AV, and a
    hybrid's or a ResNet's convolutions (counted by vitlab.resnet.count_macs). Norms, activations and pooling,
    a few percent at most, are not counted. A masked-patch-prediction model counts its head on every patch."""
    if isinstance(cfg, ResNetConfig):
        return resnet_macs(cfg)
    D, M, L = cfg.hidden_size, cfg.mlp_dim, cfg.num_layers
    N = cfg.num_patches
    T = N + cfg.num_prefix_tokens
    channels = cfg.in_chans
    macs = 0
    if cfg.resnet_num_layers is not None:
        macs += stem_macs(cfg.in_chans, cfg.resnet_num_layers, cfg.resnet_width_factor, cfg.image_size,
                          cfg.resnet_root)
        channels = hybrid_channels(cfg.resnet_num_layers, cfg.resnet_width_factor)
    macs += N * D * channels * cfg.patch_size[0] * cfg.patch_size[1]  # Eq. 1
    per_layer = T * D * 3 * D + 2 * T * T * D + T * D * D + 2 * T * D * M  # qkv, QK^T and AV, out, MLP
    macs += L * per_layer
    if cfg.representation_size:
        macs += D * cfg.representation_size
    macs += (cfg.representation_size or D) * cfg.num_classes
    macs += N * D * cfg.mpp_classes
    return macs


def forward_flops(cfg) -> int:
    """FLOPs of one image's forward pass, counting a multiply-add as two."""
    return 2 * forward_macs(cfg)


def model_table(image_size: int | Sequence[int] = 224, num_classes: int = 1000, patch: int | None = None) -> list[dict]:
    """One row per variant: widths, depths, heads, parameters and GFLOPs at `image_size`."""
    rows = []
    for size, fields in VARIANTS.items():
        p = patch or (14 if size == "H" else 16)
        try:
            cfg = variant_config(f"ViT-{size}/{p}", image_size=image_size, num_classes=num_classes)
        except ConfigError:  # a patch that does not divide this image size (ViT-H/14 at 384)
            continue
        rows.append(
            dict(
                name=cfg.name,
                hidden_size=cfg.hidden_size,
                num_layers=cfg.num_layers,
                num_heads=cfg.num_heads,
                mlp_dim=cfg.mlp_dim,
                tokens=cfg.num_patches + cfg.num_prefix_tokens,
                params=num_params(cfg),
                gflops=forward_flops(cfg) / 1e9,
            )
        )
    return rows
