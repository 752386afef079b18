"""Section 3.2, "Fine-tuning and higher resolution": the same weights in a model with a new head, at a new
resolution (the position embeddings interpolated in 2-D), without the pre-logits layer; and a model initialised
from pretrained weights for fine-tuning (appendix B.1.1).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .common import ConfigError
from .model import build_model
from .resnet import ResNetConfig
from .runtime import unwrap


@torch.no_grad()
def adapt(model: nn.Module, *, pos_embed_interp: str = "bilinear", new_head: bool = False, **changes) -> nn.Module:
    """The same weights in a model with some config fields changed: a new resolution (the position embeddings
    interpolated in 2-D), a new number of classes or `new_head` (a fresh zero head, as for fine-tuning),
    `representation_size=None` (the pre-logits layer dropped, and a new head), `mpp_classes=0` (the masked patch
    prediction's [mask] embedding and head dropped), dropout, GELU form. A BiT ResNet takes any resolution as
    it is; only its head changes."""
    model = unwrap(model)
    old = model.cfg
    try:
        new = old.replace(**changes)
    except ConfigError as e:
        raise ConfigError(f"cannot adapt {old.name or 'the model'}: {e}") from None
    for field in old.ARCHITECTURE:
        if getattr(new, field) != getattr(old, field):
            raise ConfigError(f"{field} cannot change on loaded weights ({getattr(old, field)} -> {getattr(new, field)})")
    out = build_model(new)
    sd = dict(model.state_dict())
    if isinstance(old, ResNetConfig):
        return _new_head(out, sd, new_head or new.num_classes != old.num_classes).train(model.training)
    if new.representation_size not in (None, old.representation_size):
        raise ConfigError(f"representation_size can only be dropped on loaded weights ({old.representation_size} "
                          f"-> {new.representation_size})")
    if new.mpp_classes not in (0, old.mpp_classes):
        raise ConfigError(f"mpp_classes can only be dropped on loaded weights ({old.mpp_classes} -> {new.mpp_classes})")
    if new.mpp_classes != old.mpp_classes:  # pre-trained by masked patch prediction: its own parts dropped
        for k in [k for k in sd if k == "mask_token" or k.startswith("mpp_head.")]:
            del sd[k]
    sd["pos_embed"] = model.pos_embed_for(new.grid_size, pos_embed_interp)  # fixed ones computed for the new grid
    if new.representation_size != old.representation_size:  # the pre-logits layer dropped (section 3.1)
        for k in [k for k in sd if k.startswith("pre_logits.")]:
            del sd[k]
        new_head = True  # the head read the dropped layer's output
    return _new_head(out, sd, new_head or new.num_classes != old.num_classes).train(model.training)


def _new_head(out: nn.Module, sd: dict[str, torch.Tensor], new_head: bool) -> nn.Module:
    """Load `sd` into `out`, with `out`'s own fresh (zero) head when `new_head`."""
    if new_head:
        for k in [k for k in sd if k.startswith("head.")]:
            del sd[k]
        sd.update({k: v for k, v in out.state_dict().items() if k.startswith("head.")})
    out.load_state_dict(sd)
    return out

def head_is_zero(model: nn.Module) -> bool:
    """Whether the model has a head and it is all zero: constant logits, e.g. the official ImageNet-21k files'."""
    head = unwrap(model).head
    return isinstance(head, nn.Linear) and not head.weight.any() and not head.bias.any()



def init_from_pretrained(model: nn.Module, source: nn.Module, name: str) -> str:
    """Load into `model` (freshly built for the new task) the pretrained weights of `source`, as the paper
    fine-tunes (section 3.2, appendix B.1.1): a new zero-initialised head for the new classes (every class starts
    equally likely), the pre-logits layer dropped unless kept, the position embeddings interpolated in 2-D to the
    new patch grid. Returns what was done, in a line naming `name`, the source."""
    new, old = model.cfg, source.cfg
    changes = {f.name: getattr(new, f.name) for f in dataclasses.fields(new) if getattr(new, f.name) != getattr(old, f.name)}
    pretrained = adapt(source, new_head=True, **changes)
    assert pretrained.cfg == new, (pretrained.cfg, new)
    model.load_state_dict(pretrained.state_dict())
    if isinstance(new, ResNetConfig):
        return (f"init: {name}: a new zero head for {new.num_classes} classes; inputs normalised with mean "
                f"{new.mean} std {new.std}")
    (h, w), (H, W) = old.grid_size, new.grid_size
    dropped = old.representation_size and not new.representation_size
    line = (f"init: {name}: position embeddings {h}x{w} -> {H}x{W} patches"
            + (" (interpolated in 2-D)" if (h, w) != (H, W) else "")
            + f", a new zero head for {new.num_classes} classes"
            + (", the pre-logits layer dropped" if dropped else "")
            + (", the masked-patch-prediction head dropped" if old.mpp_classes else "")
            + f"; inputs normalised with mean {new.mean} std {new.std}, {new.gelu} GELU")
    if head_is_zero(source):
        line += (f"\nnote: the head of {name} is all zero (as in the official ImageNet-21k checkpoints): it could "
                 "not have been evaluated, and is replaced")
    return line
