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
map of a ResNet stem (vitlab/resnet.py). Masked patch prediction (appendix B.1.2) adds a [mask] embedding and a
mean-colour head (`mpp_classes`, `Corruption`, `forward_mpp`).

Attention goes through `F.scaled_dot_product_attention` (fused kernels); the attention weights are computed
only for the layers a caller asks for, per call (`model(x, return_attention=[11])`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConfigError(ValueError):
    """A configuration that cannot build a model; the message names the field and its value."""


def _pair(value, field: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return (int(value[0]), int(value[1]))
    raise ConfigError(f"{field} must be an int or a pair (H, W) of ints, got {value!r}")


def check_inputs_and_classes(cfg) -> None:
    """Check and normalise the fields every model config shares: the input normalisation per channel (None: 0.5,
    images in [-1, 1]) and the class names."""
    for field in ("mean", "std"):
        value = getattr(cfg, field)
        value = (0.5,) * cfg.in_chans if value is None else tuple(float(v) for v in value)
        if len(value) != cfg.in_chans:
            raise ConfigError(f"{field} has {len(value)} values for in_chans {cfg.in_chans}: {value}")
        setattr(cfg, field, value)
    if any(s <= 0 for s in cfg.std):
        raise ConfigError(f"std must be > 0, got {cfg.std}")
    if cfg.class_names is not None:
        cfg.class_names = tuple(str(c) for c in cfg.class_names)
        if cfg.num_classes and len(cfg.class_names) != cfg.num_classes:
            raise ConfigError(f"class_names has {len(cfg.class_names)} names for num_classes {cfg.num_classes}")


class ConfigMethods:
    """What every model config does besides holding its fields: copies and JSON. A config with a class attribute
    `family` (BiT's "bit") writes it into its JSON so that a checkpoint says which model it holds."""

    family: str | None = None  # a plain class attribute, not a field

    def replace(self, **changes):
        """A copy with some fields changed, validated again."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown {type(self).__name__} field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = {"family": self.family} if self.family else {}
        for key, value in dataclasses.asdict(self).items():
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict):
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k != "family" or not cls.family}
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as e:  # a value of the wrong type that the checks did not name
            raise ConfigError(f"bad {cls.__name__}: {e}") from None


@dataclass
class ViTConfig(ConfigMethods):
    """Everything that defines a ViT; saved as `config.json` beside every checkpoint's weights."""

    image_size: tuple[int, int] = (224, 224)  # (H, W); an int means square
    patch_size: tuple[int, int] = (16, 16)  # (P_h, P_w); an int means square
    in_chans: int = 3
    num_classes: int = 1000  # 0: no head, the model returns the (pre-logits) representation
    hidden_size: int = 768  # D
    num_layers: int = 12  # L
    num_heads: int = 12
    mlp_dim: int = 3072
    classifier: str = "token"  # "token": the [class] token; "gap": mean of the patch tokens, no [class] token
    representation_size: int | None = None  # the pre-logits Dense + tanh layer (pre-training heads)
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    gelu: str = "tanh"  # "tanh": the official Flax model; "exact": timm and Hugging Face weights
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
    # Masked patch prediction (appendix B.1.2): a learned [mask] embedding and a head predicting each corrupted
    # patch's mean colour, one of mpp_classes (512 for 3 bits per RGB channel). 0: a plain classifier.
    mpp_classes: int = 0

    def __post_init__(self):
        self.image_size = _pair(self.image_size, "image_size")
        self.patch_size = _pair(self.patch_size, "patch_size")
        for field in ("in_chans", "hidden_size", "num_layers", "num_heads", "mlp_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{field} must be a positive int, got {value!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ConfigError(f"num_classes must be an int >= 0, got {self.num_classes!r}")
        if self.resnet_num_layers is not None:
            from .resnet import _check_layers, _check_width

            _check_layers(self.resnet_num_layers, "resnet_num_layers", allow_empty=True)
            self.resnet_num_layers = tuple(self.resnet_num_layers)
            _check_width(self.resnet_width_factor, "resnet_width_factor")
        stride = self.stem_stride
        for (h, p, axis) in zip(self.image_size, self.patch_size, ("height", "width")):
            if p < 1 or h < 1 or h % (p * stride):
                raise ConfigError(
                    f"patch_size {self.patch_size} does not divide image_size {self.image_size} ({axis} {h} % {p} != 0)"
                    if stride == 1 else
                    f"image_size {self.image_size} is not a multiple of the hybrid's stem stride {stride} x "
                    f"patch_size {self.patch_size} ({axis} {h} % {p * stride} != 0)"
                )
        if not isinstance(self.mpp_classes, int) or isinstance(self.mpp_classes, bool) or self.mpp_classes < 0:
            raise ConfigError(f"mpp_classes must be an int >= 0, got {self.mpp_classes!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"num_heads {self.num_heads} does not divide hidden_size {self.hidden_size}"
            )
        if self.classifier not in ("token", "gap"):
            raise ConfigError(f"classifier must be 'token' or 'gap', got {self.classifier!r}")
        if self.gelu not in ("tanh", "exact"):
            raise ConfigError(f"gelu must be 'tanh' or 'exact', got {self.gelu!r}")
        if self.representation_size is not None and (
            not isinstance(self.representation_size, int) or self.representation_size < 1
        ):
            raise ConfigError(f"representation_size must be a positive int or None, got {self.representation_size!r}")
        for field in ("dropout_rate", "attention_dropout_rate"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{field} must be in [0, 1), got {value!r}")
        if not isinstance(self.layer_norm_eps, (int, float)) or self.layer_norm_eps <= 0:
            raise ConfigError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        check_inputs_and_classes(self)

    @property
    def stem_stride(self) -> int:
        """How much the hybrid's ResNet stem reduces the image before the patches are cut (1: no stem)."""
        if self.resnet_num_layers is None:
            return 1
        from .resnet import hybrid_stride

        return hybrid_stride(self.resnet_num_layers)

    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid (H/P_h, W/P_w); for a hybrid, of the stem's feature map (H/(sP_h), W/(sP_w))."""
        s = self.stem_stride
        return (self.image_size[0] // (s * self.patch_size[0]), self.image_size[1] // (s * self.patch_size[1]))

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
    if match.group(1):  # a hybrid
        from .resnet import hybrid_layers

        depth = match.group(1)[1:]
        stages = next((k for k in (4, 3, 2, 1) if patch % (4 * 2 ** (k - 1)) == 0), None)
        if stages is None:
            raise ConfigError(f"{name!r}: a hybrid's patch size is a multiple of its stem's stride, 4 or more")
        if not depth:
            stages = 0  # the root block alone, stride 4
        stride = 4 * 2 ** max(stages - 1, 0)
        fields.update(patch_size=patch // stride, name=f"R{depth}+ViT-{size}/{patch}",
                      resnet_num_layers=hybrid_layers(int(depth), stages) if depth else ())
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ViTConfig)})
    if unknown:
        raise ConfigError(f"unknown ViTConfig field(s): {', '.join(unknown)}")
    fields.update(overrides)
    return ViTConfig(**fields)


def model_config(name: str, **overrides):
    """The config of any named model: a ViT or hybrid (`variant_config`) or a BiT ResNet ("bit-r50x1",
    vitlab.resnet.bit_config)."""
    from . import resnet

    if resnet.is_bit_name(name):
        return resnet.bit_config(name, **overrides)
    return variant_config(name, **overrides)


def config_from_dict(data: dict):
    """A ViTConfig, or a ResNetConfig when `data` says "family": "bit" (a checkpoint's config.json)."""
    from . import resnet

    if isinstance(data, dict) and data.get("family") == "bit":
        return resnet.ResNetConfig.from_dict(data)
    return ViTConfig.from_dict(data)


def build_model(cfg) -> nn.Module:
    """The freshly initialised model a config describes: a VisionTransformer or a BiT ResNetV2."""
    from . import resnet

    return resnet.ResNetV2(cfg) if isinstance(cfg, resnet.ResNetConfig) else VisionTransformer(cfg)


def create_model(name: str, **overrides) -> nn.Module:
    """A freshly initialised model of a named variant, e.g. `create_model("vit-b/16", num_classes=10)`,
    `create_model("r50+vit-b/16")`, `create_model("bit-r50x1")`."""
    return build_model(model_config(name, **overrides))


# --------------------------------------------------------------------------------------------------------------
# The parts, in the order of the paper's equations.
# --------------------------------------------------------------------------------------------------------------


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
            from .resnet import HybridStem

            self.backbone = HybridStem(cfg.in_chans, cfg.resnet_num_layers, cfg.resnet_width_factor)
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
        if need_weights or not _fused_pays(q):  # the same maths written out (Eq. 6), softmax in float32
            weights = ((q * self.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1).to(v.dtype)  # (B, H, N, N)
            x = F.dropout(weights, dropout_p, self.training) @ v
            weights = weights if need_weights else None
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, H, N, D_h)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj(x), weights


def _fused_pays(q: torch.Tensor) -> bool:
    """Whether `scaled_dot_product_attention` beats the written-out product for these queries.

    It does everywhere but in bf16/fp16 on CPUs, where PyTorch's fused CPU kernel is slower than three plain
    products (softmax in float32) for short sequences. Measured here (2 cores, AVX-512 bf16), forward and backward:
    16 tokens 5.5 ms fused against 0.7 ms written out, 197 tokens 55 against 49, 577 tokens 90 against 120; the
    switch at 256 tokens lies between the last two measurements.
    """
    return q.device.type != "cpu" or q.dtype == torch.float32 or q.shape[-2] > 256


class Mlp(nn.Module):
    """The two-layer MLP with a GELU between (section 3.1), dropout after each layer as in the official code."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.mlp_dim)
        self.act = nn.GELU(approximate="tanh" if cfg.gelu == "tanh" else "none")
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """One pre-LayerNorm encoder layer: Eq. 2 then Eq. 3, a residual connection after each."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.drop = nn.Dropout(cfg.dropout_rate)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, weights = self.attn(self.norm1(x), need_weights)
        x = x + self.drop(y)  # Eq. 2: z'_l = MSA(LN(z_{l-1})) + z_{l-1}
        x = x + self.mlp(self.norm2(x))  # Eq. 3: z_l = MLP(LN(z'_l)) + z'_l
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
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_prefix_tokens + cfg.num_patches, D))
        self.pos_drop = nn.Dropout(cfg.dropout_rate)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
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
                    _lecun_normal_(module.weight)
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        _lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.patch_embed.backbone is not None:
            self.patch_embed.backbone.init_weights()
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

    def forward_features(
        self, x: torch.Tensor, return_attention: bool | Iterable[int] = False, corruption: "Corruption | None" = None
    ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The encoder's output after its final LayerNorm, all tokens: (B, N+1, D), or (B, N, D) with "gap".
        `corruption` replaces patch embeddings before the position embeddings are added (masked patch prediction)."""
        wanted = self._attention_layers(return_attention)
        x = self.patch_embed(x)  # (B, N, D), Eq. 1
        if corruption is not None:
            x = corruption.apply(x, self.mask_token)  # masked patch prediction: some patch embeddings replaced
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N+1, D), x_class
        x = self.pos_drop(x + self.pos_embed)  # Eq. 1: + E_pos
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
        self, x: torch.Tensor, return_attention: bool | Iterable[int] = False, corruption: "Corruption | None" = None
    ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Logits (B, num_classes); with `return_attention` also {layer: (B, heads, N', N')} for those layers;
        with `corruption`, masked patch prediction's logits (B, N, mpp_classes) (`forward_mpp`)."""
        if corruption is not None:
            return self.forward_mpp(x, corruption)
        if return_attention:
            x, maps = self.forward_features(x, return_attention)
            return self.forward_head(x), maps
        return self.forward_head(self.forward_features(x))

    def forward_mpp(self, x: torch.Tensor, corruption: "Corruption") -> torch.Tensor:
        """Masked patch prediction: the mean-colour logits (B, N, mpp_classes) of every patch's output token,
        the input's patch embeddings corrupted by `corruption`. The loss reads the corrupted patches' rows."""
        if not self.cfg.mpp_classes:
            raise ConfigError("this model has no masked-patch-prediction head (mpp_classes is 0)")
        tokens = self.forward_features(x, corruption=corruption)
        return self.mpp_head(tokens[:, self.cfg.num_prefix_tokens:])  # (B, N, K)


# --------------------------------------------------------------------------------------------------------------
# Masked patch prediction (appendix B.1.2): the self-supervised objective of section 4.6.
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Corruption:
    """Which patch embeddings of a batch are corrupted and how: `chosen` (B, N) the patches to predict; of those,
    `masked` replaced by the [mask] embedding, `swapped` by the embedding of patch `source` (a flat index into the
    batch's B*N patches), and the rest left unchanged."""

    chosen: torch.Tensor  # (B, N) bool
    masked: torch.Tensor  # (B, N) bool, a subset of chosen
    swapped: torch.Tensor  # (B, N) bool, a subset of chosen, disjoint from masked
    source: torch.Tensor  # (B, N) long, in [0, B*N)
    count: int  # chosen.sum(), known without reading the device

    def split(self, parts: int) -> list["Corruption"]:
        """The corruption of each micro-batch of x.tensor_split(parts); `source` indexes into the micro-batch.

        A swapped patch whose source lies in another micro-batch takes a patch of its own micro-batch instead
        (the same position, wrapped), so that every part can be applied alone."""
        out, start = [], 0
        B, N = self.chosen.shape
        for chosen, masked, swapped, source in zip(*(t.tensor_split(parts) for t in (
                self.chosen, self.masked, self.swapped, self.source))):
            b = len(chosen)
            if b == 0:
                continue
            local = (source - start * N) % (b * N)
            out.append(Corruption(chosen, masked, swapped, local, self.count // B * b))
            start += b
        return out

    def apply(self, x: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape  # (B, N, D) patch embeddings
        other = x.reshape(B * N, D)[self.source.flatten()].view(B, N, D)
        x = torch.where(self.swapped.unsqueeze(-1), other, x)
        return torch.where(self.masked.unsqueeze(-1), mask_token.to(x.dtype).expand(B, N, D), x)


def draw_corruption(batch: int, num_patches: int, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu", rate: float = 0.5,
                    split: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> Corruption:
    """The paper's corruption: in each image, `rate` (50%) of the patches chosen at random; each chosen one
    replaced by the [mask] embedding with probability 0.8, by another patch's embedding (any patch of the
    batch but itself) with 0.1, left unchanged with 0.1. Drawn on the CPU from `generator`, then moved."""
    count = max(1, round(rate * num_patches))
    order = torch.rand(batch, num_patches, generator=generator).argsort(dim=1)
    chosen = torch.zeros(batch, num_patches, dtype=torch.bool)
    chosen.scatter_(1, order[:, :count], True)
    u = torch.rand(batch, num_patches, generator=generator)
    masked = chosen & (u < split[0])
    swapped = chosen & (u >= split[0]) & (u < split[0] + split[1])
    total = batch * num_patches
    own = torch.arange(total).view(batch, num_patches)
    source = torch.randint(0, max(total - 1, 1), (batch, num_patches), generator=generator)
    source = source + (source >= own).long() if total > 1 else own  # any patch but the patch itself
    return Corruption(*(t.to(device) for t in (chosen, masked, swapped, source)), count=batch * count)


def mean_colour_targets(images: torch.Tensor, grid: tuple[int, int], bits: int = 3) -> torch.Tensor:
    """Each token's mean colour, quantised to `bits` bits per channel: the class (B, N) of 2^(bits*C).

    `images` are uint8 (B, C, H, W) (or floats in [0, 1]) at the model's resolution, cut into the model's token
    `grid` (the patches; a hybrid's stem cells cover stride x patch pixels). Channel c's level is
    floor(mean * 2^bits), at most 2^bits - 1; the class reads the levels as digits, the first channel most
    significant (R*64 + G*8 + B).
    """
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    cell = (x.shape[-2] // grid[0], x.shape[-1] // grid[1])
    means = F.avg_pool2d(x, cell, cell)  # (B, C, grid_h, grid_w)
    levels = (means * 2**bits).floor().clamp_(0, 2**bits - 1).long()
    C = levels.shape[1]
    weights = torch.tensor([2 ** (bits * (C - 1 - c)) for c in range(C)], device=x.device).view(1, C, 1, 1)
    return (levels * weights).sum(dim=1).flatten(1)  # (B, N), row-major as the patches


def _lecun_normal_(w: torch.Tensor) -> None:
    """Flax's default kernel init: a normal truncated at 2σ, rescaled so that the variance is 1 / fan_in."""
    fan_in = w[0].numel()
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # the std of a unit normal truncated to [-2, 2]
    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


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
    from . import resnet

    if isinstance(cfg, resnet.ResNetConfig):
        return resnet.resnet_macs(cfg)
    D, M, L = cfg.hidden_size, cfg.mlp_dim, cfg.num_layers
    N = cfg.num_patches
    T = N + cfg.num_prefix_tokens
    channels = cfg.in_chans
    macs = 0
    if cfg.resnet_num_layers is not None:
        macs += resnet.stem_macs(cfg.in_chans, cfg.resnet_num_layers, cfg.resnet_width_factor, cfg.image_size)
        channels = resnet.hybrid_channels(cfg.resnet_num_layers, cfg.resnet_width_factor)
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
