"""Training a ViT: `TrainConfig`, its presets, and `train(cfg)`, one loop read top to bottom.

The sections of `train` follow big_vision's `train.py`: setup, data, model, init (scratch | resume | pretrained),
evaluators, loop. The defaults are the paper's (section 4.1, appendix B.1): Adam with β1 = 0.9, β2 = 0.999 and a
decoupled weight decay of 0.1, a linear learning-rate warm-up then a linear decay, gradients clipped at global
norm 1. Fine-tuning (`vitlab finetune`, `FINE_TUNE`) is the same loop from pretrained weights (`init`): SGD with
momentum 0.9, no weight decay, warm-up then cosine decay, a new zero head (appendix B.1.1).

A run directory DIR holds:

    train_config.json                the resolved TrainConfig; `vitlab train --resume DIR` reads it back
    config.json, model.safetensors   the model, a vitlab checkpoint (`vitlab eval DIR`, `load_model(DIR)`)
    train_state.pt                   optimizer, step, epoch, batch in the epoch, every process's RNG states
    metrics.jsonl                    one JSON object per training step and per evaluation
    tb/                              TensorBoard event files
    curves.png                       train and eval loss and accuracy against steps, redrawn each epoch

How a run ends (`vitlab train` exit codes): 0 after the last step, with `test accuracy: 0.xxxx` (or `val ...`)
as the last line printed; 130 / 143 after SIGINT / SIGTERM, once the step in flight is done and saved
(`--resume DIR` continues it); 1 when the loss is not finite, naming the step, the last checkpoint left as it
was; 2 for a configuration error, before any work.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Literal, Union, get_args, get_origin, get_type_hints

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .evaluate import Classification, autocast, resolve_precision
from .model import ConfigError, build_model, draw_corruption, forward_flops, mean_colour_targets, variant_config
from .resnet import ResNetConfig, bit_config, is_bit_name
from .weights import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    adapt,
    atomic_write,
    atomic_write_text,
    head_is_zero,
    load_model,
    read_config,
    read_safetensors,
    save_checkpoint,
    unwrap,
)

# torchvision's import alone takes seconds, so `vitlab.data` is imported inside the functions that use it: the
# CLI imports this module to build its parser, and `vitlab models` should not pay for it.

TRAIN_CONFIG_FILE = "train_config.json"
STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
# What a resumed run may not change: the position in the data is counted in batches, and an optimizer's state
# only fits that optimizer. (The model may not change either: its config.json is compared.)
FIXED_ON_RESUME = ("batch_size", "optimizer", "seed")
# Masked patch prediction's targets: each patch's mean colour at 3 bits per channel, 512 classes (appendix B.1.2).
MPP_BITS = 3


# --------------------------------------------------------------------------------------------------------------
# The configuration
# --------------------------------------------------------------------------------------------------------------


def _opt(default, help: str):
    """A TrainConfig field and the help of its `--flag`."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a training run reads. Each field is a `vitlab train --flag` (dashes for underscores) and a key
    of a `--config FILE.yaml`; values are checked against the field types on construction."""

    # data (vitlab.data)
    data: str | None = _opt(None, "required: fashion-mnist, cifar10, cifar100, pets, flowers102, folder:PATH or "
                                  "wds:PATTERN")
    image_size: tuple[int, int] | None = _opt(None, "the model's input resolution, N or HxW (default 224; with "
                                                    "--init the source's: the paper fine-tunes at 384)")
    in_chans: int | None = _opt(None, "1 or 3 (default: 1 for fashion-mnist, else 3; with --init the source's, grey "
                                      "images replicated to 3 channels)")
    mean: tuple[float, ...] | None = _opt(None, "per-channel input mean, e.g. 0.286 (default 0.5: inputs in [-1, 1]; "
                                                "with --init the source's)")
    std: tuple[float, ...] | None = _opt(None, "per-channel input std (default 0.5; with --init the source's)")
    val_split: float | None = _opt(None, "evaluate on this fraction cut from the training data instead of the test set")
    train_images: int | None = _opt(None, "train on this many of the training images (after the val cut): a fixed "
                                          "choice, smaller subsets inside larger ones (the data-size experiment)")
    bad_images: Literal["error", "skip"] = _opt("error", "an unreadable image stops the run, or is skipped")
    num_workers: int = _opt(2, "DataLoader worker processes per training process")
    # augmentation (per image: vitlab.data.TrainAug; per batch: mixup / cutmix) and the loss
    crop: Literal["auto", "rrc", "pad", "none"] = _opt("auto", "random crop: auto is pad-and-crop up to 64 px, "
                                                       "else RandomResizedCrop")
    crop_scale: float = _opt(0.08, "RandomResizedCrop's smallest area fraction")
    flip: bool = _opt(True, "random horizontal flips")
    randaugment: tuple[int, int] | None = _opt(None, "RandAugment N,M (number of ops, magnitude)")
    mixup: float = _opt(0.0, "MixUp alpha (0: off)")
    cutmix: float = _opt(0.0, "CutMix alpha (0: off)")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy")
    # model: a variant of the paper's table, optionally changed field by field; or pretrained weights
    model: str | None = _opt(None, "required without --init: a ViT (vit-b/16, vit-ti/7), a hybrid (r50+vit-b/16, "
                                   "r26+vit-s/32) or a BiT ResNet (bit-r50x1, bit-r26x1)")
    objective: Literal["classification", "mpp"] = _opt(
        "classification", "classification (labels) or mpp: masked patch prediction, self-supervised (section 4.6)")
    init: str | None = _opt(None, "start from pretrained weights (fine-tuning): a vitlab checkpoint or run DIR, an "
                                  "official .npz, or a timm or Hugging Face ViT in safetensors (file or directory)")
    keep_pre_logits: bool = _opt(False, "with --init: keep the source's pre-logits layer (the paper drops it)")
    hidden_size: int | None = _opt(None, "override the variant's width D")
    num_layers: int | None = _opt(None, "override the variant's depth L")
    num_heads: int | None = _opt(None, "override the variant's number of heads")
    mlp_dim: int | None = _opt(None, "override the variant's MLP width")
    classifier: Literal["token", "gap"] | None = _opt(None, "token ([class] token, the default) or gap (mean of "
                                                            "the patch tokens)")
    representation_size: int | None = _opt(None, "add the pre-logits layer (Dense + tanh) of this width")
    dropout: float | None = _opt(None, "dropout rate (default 0)")
    attention_dropout: float | None = _opt(None, "attention dropout rate (default 0)")
    gelu: Literal["tanh", "exact"] | None = _opt(None, "GELU form (default: tanh as the official model; with --init "
                                                      "the source's)")
    resnet_num_layers: tuple[int, ...] | None = _opt(None, "hybrid or BiT: override the ResNet's units per stage, "
                                                           "e.g. 3,4,9")
    resnet_width_factor: float | None = _opt(None, "hybrid or BiT: override the ResNet's width factor (64 x it "
                                                   "channels in the root)")
    # optimisation
    epochs: int | None = _opt(None, "passes over the training data (default 10; or set --steps)")
    steps: int | None = _opt(None, "optimizer steps, instead of --epochs")
    batch_size: int = _opt(512, "global batch: split across processes and accumulation steps (paper: 4096)")
    accum_steps: int = _opt(1, "micro-batches per optimizer step (gradient accumulation)")
    optimizer: Literal["adamw", "sgd"] = _opt("adamw", "adamw (pre-training) or sgd with momentum (fine-tuning)")
    lr: float = _opt(1e-3, "peak learning rate, reached after the warm-up")
    weight_decay: float | None = _opt(None, "decoupled weight decay (default: 0.1 with adamw, 0 with sgd)")
    beta1: float = _opt(0.9, "Adam β1")
    beta2: float = _opt(0.999, "Adam β2")
    momentum: float = _opt(0.9, "SGD momentum")
    warmup: float = _opt(0.05, "linear warm-up: steps, or a fraction of the run when < 1 (paper: 10k steps)")
    schedule: Literal["linear", "cosine"] = _opt("linear", "decay after the warm-up, to 0 at the last step")
    grad_clip: float | None = _opt(1.0, "clip gradients at this global norm (none: off)")
    # the run
    precision: Literal["auto", "bf16", "fp32"] = _opt("auto", "bf16 autocast or fp32 (auto: bf16 on GPUs, fp32 "
                                                            "on CPUs)")
    compile: bool = _opt(False, "torch.compile the model")
    seed: int = _opt(0, "seeds the model's initialisation, the data order and the augmentation")
    deterministic: bool = _opt(False, "deterministic algorithms: a resumed run ends bit for bit where an "
                                      "uninterrupted one does (CPU)")
    out: str | None = _opt(None, "the run directory (default runs/YYYYmmdd-HHMMSS)")
    save_every: int | None = _opt(None, "save every N steps (default: at the end of each epoch), and always at the end")
    log_every: int = _opt(10, "steps between progress-bar updates and metric flushes")
    eval_every: int | None = _opt(None, "evaluate every N steps (default: at the end of each epoch), and always at "
                                        "the end")

    def __post_init__(self):
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, hints[f.name], getattr(self, f.name)))
        if not self.data:
            raise ConfigError("data is required (--data)")
        if self.init is None and not self.model:
            raise ConfigError("model is required (--model), or pretrained weights (--init)")
        if self.init is not None:  # the architecture is the source's; only what adapt() can change may be set
            fixed = [n for n in ("model", "hidden_size", "num_layers", "num_heads", "mlp_dim", "classifier",
                                 "representation_size", "resnet_num_layers", "resnet_width_factor")
                     if getattr(self, n) is not None]
            if fixed:
                raise ConfigError(f"{', '.join(fixed)} cannot be set with init: the architecture is that of "
                                  f"{self.init}")
            if self.objective == "mpp":
                raise ConfigError("objective mpp pre-trains a model from scratch: set --model, not --init")
        if self.objective == "mpp":
            mixed = [n for n in ("mixup", "cutmix", "label_smoothing") if getattr(self, n)]
            if mixed:
                raise ConfigError(f"{', '.join(mixed)} do not apply to objective mpp (its targets are colours)")
        elif self.keep_pre_logits:
            raise ConfigError("keep_pre_logits needs pretrained weights (--init)")
        if self.epochs is not None and self.steps is not None:
            raise ConfigError(f"set epochs ({self.epochs}) or steps ({self.steps}), not both")
        if self.steps is None and self.epochs is None:
            self.epochs = 10
        for names, ok, wanted in [
            ("batch_size accum_steps epochs steps log_every save_every eval_every train_images", lambda v: v >= 1,
             ">= 1"),
            ("in_chans", lambda v: v in (1, 3), "1 or 3"),
            ("lr grad_clip", lambda v: 0 < v < math.inf, "> 0"),
            ("warmup weight_decay mixup cutmix num_workers", lambda v: 0 <= v < math.inf, ">= 0"),
            ("label_smoothing beta1 beta2 momentum dropout attention_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("val_split", lambda v: 0 < v < 1, "in (0, 1)"),
            ("crop_scale", lambda v: 0 < v <= 1, "in (0, 1]"),
        ]:
            for name in names.split():
                value = getattr(self, name)
                if value is not None and not ok(value):  # (NaN fails every test)
                    raise ConfigError(f"{name} must be {wanted}, got {value}")
        if self.weight_decay is None:
            self.weight_decay = 0.1 if self.optimizer == "adamw" else 0.0
        if self.init is not None:
            return  # image size, channels and normalisation default to the source's (`with_source`)
        if self.image_size is None:
            self.image_size = (224, 224)
        if self.in_chans is None:
            from . import data

            self.in_chans = 1 if data.parse_spec(self.data).kind == "fashion-mnist" else 3
        self.model_config(num_classes=1)  # the model's own checks: patch vs image size, heads vs width, mean/std

    def with_source(self, source) -> "TrainConfig":
        """This config with what it leaves unset taken from the pretrained model's: resolution, channels, the input
        normalisation and the GELU form (the weights expect the inputs and activations they were trained with)."""
        if self.in_chans is not None and self.in_chans != source.in_chans:
            raise ConfigError(f"in_chans {self.in_chans} differs from the {source.in_chans} of {self.init}; "
                              f"leave it unset: grey images are replicated to {source.in_chans} channels")
        resolved = dataclasses.replace(
            self, image_size=self.image_size or source.image_size, in_chans=source.in_chans,
            mean=self.mean or source.mean, std=self.std or source.std,
            gelu=self.gelu or getattr(source, "gelu", None),
        )
        resolved.model_config(num_classes=1, source=source)  # patch vs image size, mean/std vs channels
        return resolved

    def model_config(self, num_classes: int, class_names: list[str] | None = None, source=None):
        """The config of the model this run trains (a ViTConfig, or a ResNetConfig for BiT) for a dataset of
        `num_classes` classes; from the pretrained model's config `source` when fine-tuning (its pre-logits layer
        dropped unless kept, section 3.1; a masked-patch-prediction head dropped). With objective mpp, a model
        with the [mask] embedding and the mean-colour head, and no class head."""
        if source is not None:
            changes = dict(image_size=self.image_size, num_classes=num_classes, class_names=class_names,
                           mean=self.mean, std=self.std)
            if isinstance(source, ResNetConfig):
                vit_only = [n for n in ("gelu", "dropout", "attention_dropout") if getattr(self, n) is not None]
                if vit_only or self.keep_pre_logits:
                    raise ConfigError(f"{', '.join(vit_only or ['keep_pre_logits'])} does not apply to the BiT "
                                      f"ResNet {self.init}")
            else:
                changes.update(gelu=self.gelu, dropout_rate=self.dropout, attention_dropout_rate=self.attention_dropout,
                               representation_size=source.representation_size if self.keep_pre_logits else None,
                               mpp_classes=0)
            return source.replace(**{k: v for k, v in changes.items() if v is not None or k in (
                "class_names", "representation_size")})
        common = dict(image_size=self.image_size, in_chans=self.in_chans, num_classes=num_classes,
                      class_names=class_names, mean=self.mean, std=self.std)
        if is_bit_name(self.model):
            vit_only = [n for n in ("hidden_size", "num_layers", "num_heads", "mlp_dim", "classifier",
                                    "representation_size", "dropout", "attention_dropout", "gelu")
                        if getattr(self, n) is not None]
            if vit_only or self.objective == "mpp":
                raise ConfigError(f"{', '.join(vit_only) or 'objective mpp'} does not apply to the BiT ResNet "
                                  f"{self.model}")
            overrides = dict(num_layers=self.resnet_num_layers, width_factor=self.resnet_width_factor)
            return bit_config(self.model, **common, **{k: v for k, v in overrides.items() if v is not None})
        overrides = dict(
            hidden_size=self.hidden_size, num_layers=self.num_layers, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
            classifier=self.classifier, representation_size=self.representation_size,
            dropout_rate=self.dropout, attention_dropout_rate=self.attention_dropout, gelu=self.gelu,
            resnet_num_layers=self.resnet_num_layers, resnet_width_factor=self.resnet_width_factor,
        )
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if self.objective == "mpp":  # 3 bits of mean colour per channel (appendix B.1.2), no class head
            common.update(num_classes=0, class_names=None)
            overrides["mpp_classes"] = 2 ** (MPP_BITS * self.in_chans)
        return variant_config(self.model, **common, **overrides)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _type_name(hint) -> str:
    if get_origin(hint) is Literal:
        return " or ".join(map(str, get_args(hint)))
    if get_origin(hint) is tuple:
        return "N or A,B" if get_args(hint)[-1] is not Ellipsis else "a comma-separated list of numbers"
    return {bool: "true or false", int: "an int", float: "a number", str: "a string"}.get(hint, str(hint))


def _literal_choices(hint) -> tuple:
    """The values of a Literal[...] type, or of the Literal in Literal[...] | None; () for other types."""
    for h in (hint, *get_args(hint)):
        if get_origin(h) is Literal:
            return get_args(h)
    return ()


def _coerce(name: str, hint, value):
    """`value` (from Python, YAML or a command-line string) as the type `hint`; a ConfigError naming `name`."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):  # X | None
        if value is None or isinstance(value, str) and value.lower() in ("none", "null", "off"):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(name, inner, value)
    text = isinstance(value, str)
    try:
        if origin is Literal and value in args:
            return value
        if hint is bool:
            if isinstance(value, bool):
                return value
            if text and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
        if hint is int and not isinstance(value, bool):
            if isinstance(value, int) or text:
                return int(value)
        if hint is float and not isinstance(value, bool):
            if isinstance(value, (int, float)) or text:
                return float(value)
        if hint is str and text:
            return value
        if origin is tuple:  # "224", "224x320", "2,9"; [224, 320] in YAML
            if text:
                parts = value.replace("x", ",").split(",")
            else:
                parts = list(value) if isinstance(value, (list, tuple)) else [value]
            if args[-1] is Ellipsis:
                return tuple(_coerce(name, args[0], p) for p in parts)
            if len(parts) == 1:  # N means (N, N)
                parts = parts * len(args)
            if len(parts) == len(args):
                return tuple(_coerce(name, a, p.strip() if isinstance(p, str) else p) for a, p in zip(args, parts))
    except (ValueError, ConfigError):
        pass
    raise ConfigError(f"{name} must be {_type_name(hint)}, got {value!r}")


def read_config_file(path: str | os.PathLike) -> dict:
    """The fields of a YAML (or JSON) config file, not yet checked."""
    import yaml

    try:
        fields = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if fields is None:
        return {}
    if not isinstance(fields, dict):
        raise ConfigError(f"{path}: expected a mapping of TrainConfig fields, got {type(fields).__name__}")
    return fields


def make_config(*layers: tuple[str, dict]) -> TrainConfig:
    """A TrainConfig from layers of (source, fields), each overriding the ones before (preset < file < flags)."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    merged: dict = {}
    for source, layer in layers:
        for key in layer:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{source}: unknown field {key!r}{hint}")
        for one, other in (("epochs", "steps"), ("steps", "epochs")):
            if one in layer and other not in layer:  # two ways of saying how long: the later layer's wins
                merged.pop(other, None)
        merged.update(layer)
    return TrainConfig(**merged)


# --------------------------------------------------------------------------------------------------------------
# Presets: functions whose docstring says the command, the expected result, the time and the hardware.
# --------------------------------------------------------------------------------------------------------------


def fashion_mnist_demo() -> TrainConfig:
    """A small plain ViT trained from scratch on Fashion-MNIST: the demo (`make demo`).

    Command:  vitlab train --preset fashion-mnist-demo --out runs/demo
    Expected: test accuracy 0.8895 (measured; short of the 0.90 aimed at), 0.889 after 9 of the 11 epochs.
    Time:     11 min of training, 12 min 16 s for `make demo` from a fresh clone, install included.
    Hardware: 2 CPU cores (x86-64 with AVX-512 bf16), no GPU.

    The recipe (experiments/demo_recipe/RESULTS.md has every run behind it): patch 7 (16 tokens: patch 4's 49
    learn less per second here), width 192 and 6 layers in bf16 autocast (2.4x faster than fp32 here, with
    attention written out rather than fused on CPUs: model._fused_pays), mean pooling, batch 64 (+1.4 points over 128 after 3 epochs for 10% fewer
    images/s; 128 beats 256 by as much), no
    augmentation (the model under-fits in this budget: flips and crops only slow it down), label smoothing 0.1,
    AdamW with beta2 0.99, warm-up then cosine decay to 0.
    """
    return TrainConfig(
        data="fashion-mnist", image_size=(28, 28), mean=(0.2860,), std=(0.3530,),  # the training set's statistics
        model="vit-ti/7", hidden_size=192, num_layers=6, num_heads=3, mlp_dim=768, classifier="gap",
        epochs=11, batch_size=64, lr=1e-3, beta2=0.99, weight_decay=0.05, warmup=0.05, schedule="cosine",
        crop="none", flip=False, label_smoothing=0.1, precision="bf16", num_workers=0,
    )


PRESETS = {"fashion-mnist-demo": fashion_mnist_demo}

# The paper's fine-tuning (appendix B.1.1, Table 4) as the official code sets it (google-research/
# vision_transformer `vit_jax/configs/common.py`): SGD with momentum 0.9, no weight decay, batch 512 accumulated
# over 8 micro-batches, gradients clipped at global norm 1, warm-up then cosine decay, peak learning rate 0.03
# (the paper sweeps {0.001, 0.003, 0.01, 0.03}), 10k steps (CIFAR; ImageNet 20k, Pets and Flowers 500).
# vit_jax warms up for 500 of its 10k steps; here a fraction of the run, so that a shorter run still decays.
FINE_TUNE = dict(optimizer="sgd", momentum=0.9, weight_decay=0.0, lr=0.03, warmup=0.05, schedule="cosine",
                 grad_clip=1.0, batch_size=512, accum_steps=8, steps=10_000)


def fine_tune(**fields) -> TrainConfig:
    """The paper's fine-tuning from pretrained weights `init` on `data`, at the source's resolution unless
    `image_size` says otherwise: the defaults of `vitlab finetune`.

    Command:  vitlab finetune --init ViT-B_16.npz --data cifar10 --image-size 384 --out runs/ft
    Expected: the paper's Table 2 numbers need its ImageNet-21k checkpoints and accelerators (ViT-B/16 on
              CIFAR-10: 98.1 %); experiments/transfer.py measures the effect at this machine's scale
    Time:     10k steps of 512 images at 384 px: hours on one GPU, not a CPU job; --steps sets the length
    Hardware: one GPU (fits ViT-B/16 at 384 px with --accum-steps 8); CPUs for tiny models
    """
    return make_config(("fine-tuning defaults", FINE_TUNE), ("fields", fields))


# --------------------------------------------------------------------------------------------------------------
# The parts of the loop
# --------------------------------------------------------------------------------------------------------------

def _patch_text(cfg) -> str:
    text = f"{cfg.patch_size[0]}x{cfg.patch_size[1]}"
    return text if cfg.stem_stride == 1 else f"{text} on the ResNet stem's feature map (stride {cfg.stem_stride})"


class MaskedPatchPrediction(Classification):
    """The evaluator of masked patch prediction on one split: `run(model)` gives the loss and top-1 accuracy of
    the corrupted patches' mean colours (top1, loss, n = patches predicted). The corruption is drawn from a fixed
    seed, the same at every evaluation, so that the numbers of a run compare across its steps."""

    @torch.no_grad()
    def run(self, model: nn.Module) -> dict[str, float]:
        from . import data

        cfg = unwrap(model).cfg
        generator = torch.Generator().manual_seed(0)
        was_training = model.training
        model.eval()
        loss, correct, n = 0.0, 0, 0
        for images, _ in self.loader():
            images = images.to(self.device)
            targets = mean_colour_targets(images, cfg.grid_size, MPP_BITS)
            corruption = draw_corruption(len(images), cfg.num_patches, generator, self.device)
            with autocast(self.device, self.precision):
                logits = model(data.normalize(images, cfg.mean, cfg.std), corruption=corruption)[corruption.chosen]
            t = targets[corruption.chosen]
            loss += F.cross_entropy(logits.float(), t, reduction="sum").item()
            correct += int((logits.argmax(-1) == t).sum())
            n += len(t)
        model.train(was_training)
        return dict(top1=correct / max(n, 1), loss=loss / max(n, 1), n=n)


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of step `step` (0-based): linear warm-up to cfg.lr, then linear or cosine decay to 0."""
    warmup = min(cfg.warmup if cfg.warmup >= 1 else cfg.warmup * total_steps, total_steps)
    if step < warmup:
        return cfg.lr * min(1.0, (step + 1) / warmup)
    progress = (step - warmup) / max(1.0, total_steps - warmup)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (1.0 - progress)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW or SGD; weight decay on the weight matrices and kernels only.

    Biases, LayerNorm and GroupNorm parameters, the position embeddings, the [class] and [mask] tokens are not
    decayed, as in big_vision (whose decay applies to `.../kernel` parameters only) and timm. PyTorch's AdamW multiplies the
    decay by the learning rate, as flax.optim.Adam did in the paper's code, so the paper's 0.1 means the same here.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name in ("pos_embed", "cls_token", "mask_token") else decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def _epoch_batches(loader, limit: int):
    """The loader's first `limit` batches, each with whether it is the epoch's last."""
    end = object()
    batches = iter(islice(loader, limit))
    batch = next(batches, end)
    while batch is not end:
        following = next(batches, end)
        yield batch, following is end
        batch = following


# RNG states as tensors, lists and numbers, so that torch.load(weights_only=True) reads them back.


def rng_state() -> dict:
    """This process's RNG states: torch CPU (and CUDA), numpy, Python's random."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return dict(
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        numpy=dict(keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos), has_gauss=int(has_gauss),
                   cached=float(cached)),
        python=dict(version=version, internal=list(internal), gauss_next=gauss_next),
    )


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)  # also every CUDA device
    np.random.seed(seed % 2**32)
    random.seed(seed)


# Checkpoints. The weights (model.safetensors, config.json) and the training state (train_state.pt) are separate
# files, and a resumed run needs them from the same step. A save therefore writes all three into DIR/.next.tmp,
# renames that to DIR/.next (the commit point: one atomic rename), then moves the files one by one into DIR and
# removes DIR/.next. A process killed before the commit leaves DIR as it was (the .next.tmp is deleted later); one
# killed after it leaves a complete DIR/.next, which `_finish_save` moves in before anything reads DIR. Every
# file is itself replaced atomically, and config.json does not change during a run, so `load_model(DIR)` reads
# a whole model at any moment; a resume reads a consistent pair once `_finish_save` has run.


def _fault(point: str, step: int) -> None:
    """Crash-test hook: VITLAB_FAULT=POINT@STEP kills the process with SIGKILL there (tests/test_train.py)."""
    if os.environ.get("VITLAB_FAULT") == f"{point}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish_save(out: Path, step: int | None = None) -> None:
    """Complete a save that a killed process committed but did not finish; drop one it had not committed."""
    shutil.rmtree(out / ".next.tmp", ignore_errors=True)
    staged = out / ".next"
    if not staged.is_dir():
        return
    for name in sorted(os.listdir(staged)):
        os.replace(staged / name, out / name)
        if step is not None:
            _fault(f"moved-{name}", step)
    _fsync_dir(out)
    staged.rmdir()
    _fsync_dir(out)


def save_run(out: Path, model: nn.Module, state: dict) -> None:
    """Save the weights and the training state of one step as a pair (see above)."""
    staging = out / ".next.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_checkpoint(model, staging)  # the uncompiled module's weights and config, each written atomically
    atomic_write(staging / STATE_FILE, lambda tmp: torch.save(state, tmp))
    _fault("staged", state["step"])
    os.rename(staging, out / ".next")  # the commit point
    _fsync_dir(out)
    _fault("committed", state["step"])
    _finish_save(out, state["step"])


def load_run(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load DIR's weights into `model` and its optimizer state into `optimizer`; the rest of the state."""
    saved = read_config(out)
    if saved != model.cfg:
        diff = [f"{k}: {v!r} in the checkpoint, {getattr(model.cfg, k)!r} now" for k, v in vars(saved).items()
                if getattr(model.cfg, k) != v]
        raise CheckpointError(f"{out / CONFIG_FILE}: the model of this run changed ({'; '.join(diff)})")
    model.load_state_dict(read_safetensors(out / WEIGHTS_FILE))
    path = out / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler raises about anything on a damaged file (KeyError, EOFError, ...)
        raise CheckpointError(f"{path}: not a readable training state ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0]})") from None
    keys = set(state) if isinstance(state, dict) else set()
    missing = sorted({"step", "epoch", "batch", "optimizer", "rng", "config"} - keys)
    if missing:
        raise CheckpointError(f"{path}: not a vitlab training state (no {', '.join(missing)})")
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: the optimizer state does not fit ({str(e).splitlines()[0]})") from None
    return state


def _json_lines(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


class RunLog:
    """The run's records, written by process 0: metrics.jsonl, TensorBoard events, curves.png."""

    def __init__(self, out: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.out = out
        path = out / METRICS_FILE
        # A resumed run redoes the steps after its checkpoint: their rows go, here and in TensorBoard (purge_step),
        # and so does a line that a killed process left half-written.
        self.rows = [r for r in _json_lines(path) if r.get("step", math.inf) <= start_step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.file = open(path, "a")
        self.tb = SummaryWriter(str(out / "tb"), purge_step=start_step + 1 if start_step else None)

    def write(self, row: dict) -> None:
        self.rows.append(row)
        self.file.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key not in ("step", "epoch", "split") and isinstance(value, (int, float)):
                self.tb.add_scalar(f"{row['split']}/{key}", value, row["step"])

    def flush(self) -> None:
        self.file.flush()
        self.tb.flush()

    def plot(self) -> None:
        """curves.png: loss and accuracy of training steps and evaluations against steps."""
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

        fig = Figure(figsize=(11, 4), layout="constrained")
        ax_loss, ax_acc = fig.subplots(1, 2)
        splits = sorted({r["split"] for r in self.rows}, key=lambda s: s != "train")
        for split in splits:
            rows = [r for r in self.rows if r["split"] == split]
            steps = [r["step"] for r in rows]
            style = dict(lw=0.8, alpha=0.7) if split == "train" else dict(marker="o", lw=1.5)
            ax_loss.plot(steps, [r["loss"] for r in rows], label=split, **style)
            ax_acc.plot(steps, [r["acc"] if split == "train" else r["top1"] for r in rows], label=split, **style)
        ax_loss.set(xlabel="step", ylabel="cross-entropy", title="loss")
        ax_acc.set(xlabel="step", ylabel="top-1 accuracy", title="accuracy", ylim=(0, 1))
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.legend()
        atomic_write(self.out / "curves.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))

    def close(self) -> None:
        self.file.close()
        self.tb.close()


class TrainingStopped(Exception):
    """The run stopped before its last step: by a signal (saved first) or a non-finite loss (nothing saved)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """SIGINT and SIGTERM ask the loop to stop after the step in flight; a second one interrupts at once."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            self.__exit__()
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


@contextlib.contextmanager
def _deterministic(on: bool):
    """torch.use_deterministic_algorithms for the run, restored afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic only with it
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@contextlib.contextmanager
def _process_group():
    """(rank, world_size, device) of this process; under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set), the
    process group of DistributedDataParallel for the duration: gloo on CPUs, NCCL on GPUs."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world_size == 1:
        yield 0, 1, device
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield rank, world_size, device
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------
# train(cfg)
# --------------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, *, resume: bool = False) -> dict[str, float]:
    """Train the model `cfg` describes, or with `resume` continue the run in cfg.out; the last evaluation.

    Under torchrun every process runs this, with DistributedDataParallel; only process 0 writes.
    """
    from . import data

    with contextlib.ExitStack() as stack:
        # ---- setup -----------------------------------------------------------------------------------------
        rank, world_size, device = stack.enter_context(_process_group())
        stack.enter_context(_deterministic(cfg.deterministic))
        signals = stack.enter_context(StopSignals())
        distributed, is_main = world_size > 1, rank == 0
        if cfg.batch_size % (world_size * cfg.accum_steps):
            raise ConfigError(f"batch_size {cfg.batch_size} is not a multiple of processes x accum_steps = "
                              f"{world_size} x {cfg.accum_steps}")
        local_batch = cfg.batch_size // world_size  # this process's share of each step
        micro_batch = local_batch // cfg.accum_steps
        precision = resolve_precision(cfg.precision, device)
        if cfg.out is None:  # one name for all processes: process 0's clock
            name = [time.strftime("runs/%Y%m%d-%H%M%S")]
            if distributed:
                dist.broadcast_object_list(name, src=0)
            cfg = dataclasses.replace(cfg, out=name[0])
        out = Path(cfg.out)
        if resume:
            if not (out / TRAIN_CONFIG_FILE).is_file():
                raise CheckpointError(f"{out}: no {TRAIN_CONFIG_FILE}: not a training run to resume")
            if is_main:
                _finish_save(out)  # a save that a killed run committed but did not finish
        elif (out / TRAIN_CONFIG_FILE).exists() or (out / STATE_FILE).exists():
            raise ConfigError(f"{out} already holds a run: continue it with `vitlab train --resume {out}`, "
                              "or choose another --out")
        if distributed:
            dist.barrier()  # all have checked DIR, and a save a killed run left is finished, before DIR is read
        # Pretrained weights (fine-tuning) decide the architecture and what the images must look like to them:
        # resolution unless changed, channels, normalisation. A resumed run's own checkpoint stands in for them.
        source, source_cfg = None, None
        if cfg.init is not None:
            if resume and (out / STATE_FILE).exists():
                source_cfg = read_config(out)
            else:
                source = load_model(cfg.init)
                source_cfg = source.cfg
            cfg = cfg.with_source(source_cfg)

        # ---- data ------------------------------------------------------------------------------------------
        aug = data.TrainAug(crop=cfg.crop, crop_scale=cfg.crop_scale, flip=cfg.flip, randaugment=cfg.randaugment)
        splits = data.build(cfg.data, image_size=cfg.image_size, in_chans=cfg.in_chans, train_transform=aug,
                            val_split=cfg.val_split, bad_images=cfg.bad_images, train_images=cfg.train_images)
        if splits.train_size is None:
            raise data.DataError(f"{cfg.data}: the number of training images is unknown (remote shards); "
                                 "training needs local data")
        steps_per_epoch = splits.train_size // cfg.batch_size  # an epoch's last partial batch is dropped
        if steps_per_epoch == 0:
            raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {splits.train_size} training images")
        total_steps = cfg.steps or cfg.epochs * steps_per_epoch
        mix = data.batch_mix(cfg.mixup, cfg.cutmix, splits.num_classes)

        # ---- model -----------------------------------------------------------------------------------------
        model_cfg = cfg.model_config(splits.num_classes, splits.class_names, source=source_cfg)
        _seed_all(cfg.seed)
        model = build_model(model_cfg).to(device)  # the official initialisers, from the seed
        optimizer = make_optimizer(model, cfg, device)
        # Training FLOPs, for compute-vs-accuracy plots: a backward pass costs about two forward passes (one
        # product for the activations' gradients, one for the weights'), so a trained image costs 3 forwards.
        flops_per_image = 3 * forward_flops(model_cfg)

        # ---- init: scratch (above) | resume (the run's last checkpoint) | pretrained (fine-tuning) -----------
        step, epoch, batch_in_epoch = 0, 0, 0  # optimizer steps done; the epoch, and its batches consumed
        last_saved, saved_rng = None, None
        if resume and (out / STATE_FILE).exists():
            state = load_run(out, model, optimizer)
            for name in FIXED_ON_RESUME:
                if state["config"][name] != getattr(cfg, name):
                    raise ConfigError(f"{name} cannot change when a run resumes ({state['config'][name]} -> "
                                      f"{getattr(cfg, name)})")
            step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch"]
            last_saved = step
            if len(state["rng"]) == world_size:
                saved_rng = state["rng"][rank]
            elif is_main:
                print(f"resuming on {world_size} processes a run saved on {len(state['rng'])}: new random streams")
        elif source is not None:
            # Section 3.2 and appendix B.1.1: the pretrained weights, a new zero-initialised head for the new
            # classes (every class starts equally likely), the pre-logits layer dropped unless kept, the position
            # embeddings interpolated in 2-D to the new patch grid.
            changes = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(model_cfg)
                       if getattr(model_cfg, f.name) != getattr(source_cfg, f.name)}
            pretrained = adapt(source, new_head=True, **changes)
            assert pretrained.cfg == model_cfg, (pretrained.cfg, model_cfg)
            model.load_state_dict(pretrained.state_dict())
            if is_main and isinstance(model_cfg, ResNetConfig):
                print(f"init: {cfg.init}: a new zero head for {model_cfg.num_classes} classes; inputs normalised "
                      f"with mean {model_cfg.mean} std {model_cfg.std}")
            elif is_main:
                (h, w), (H, W) = source_cfg.grid_size, model_cfg.grid_size
                dropped = source_cfg.representation_size and not model_cfg.representation_size
                print(f"init: {cfg.init}: position embeddings {h}x{w} -> {H}x{W} patches"
                      + (" (interpolated in 2-D)" if (h, w) != (H, W) else "")
                      + f", a new zero head for {model_cfg.num_classes} classes"
                      + (", the pre-logits layer dropped" if dropped else "")
                      + (", the masked-patch-prediction head dropped" if source_cfg.mpp_classes else "")
                      + f"; inputs normalised with mean {model_cfg.mean} std {model_cfg.std}, {model_cfg.gelu} GELU")
                if head_is_zero(source):
                    print(f"note: the head of {cfg.init} is all zero (as in the official ImageNet-21k "
                          "checkpoints): it could not have been evaluated, and is replaced")
            del source, pretrained
        _seed_all(cfg.seed + 1 + rank)  # each process's own dropout stream (a resume restores its saved one)
        net = torch.compile(model) if cfg.compile else model
        train_net = net
        if distributed:
            train_net = nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)

        # ---- evaluators ------------------------------------------------------------------------------------
        # Process 0 evaluates the whole split with the model outside DDP while the others wait at a barrier.
        evaluators = []
        mpp = cfg.objective == "mpp"
        if splits.eval is not None and is_main:
            kind = MaskedPatchPrediction if mpp else Classification
            evaluators.append(kind(splits.eval, splits.eval_name, batch_size=micro_batch, device=device,
                                   precision=precision, num_workers=cfg.num_workers))
        log = None
        if is_main:  # DIR is written once the data and the model are known to load
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / TRAIN_CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n")
            log = RunLog(out, step)
            stack.callback(log.close)
            print(f"{out}: {model_cfg.name or 'ViT'} ({sum(p.numel() for p in model.parameters()):,} parameters"
                  + ("" if isinstance(model_cfg, ResNetConfig) else
                     f", {model_cfg.num_patches} patches of {_patch_text(model_cfg)}")
                  + (f", masked patch prediction of {model_cfg.mpp_classes} colours" if mpp else "") + "); "
                  f"{cfg.data}: {splits.train_size} training images, {splits.num_classes} classes; {total_steps} "
                  f"steps of {cfg.batch_size} images; {world_size} process{'es' if distributed else ''} on "
                  f"{device.type}, {precision}"
                  + (f"; resuming at step {step}" if step else ""))

        results: dict[str, float] = {}  # of the last evaluation, made at step `evaluated`
        evaluated = None

        def run_evaluators() -> None:
            nonlocal results, evaluated
            for evaluator in evaluators:
                results = evaluator.run(net)
                log.write(dict(split=evaluator.name, step=step, epoch=round(step / steps_per_epoch, 4), **results))
            if is_main:
                log.flush()
                log.plot()
            if distributed:
                dist.barrier()
            evaluated = step

        def save() -> None:
            nonlocal last_saved
            rngs = [rng_state()]
            if distributed:
                rngs = [None] * world_size
                dist.all_gather_object(rngs, rng_state())
            if is_main:
                save_run(out, model, dict(step=step, epoch=epoch, batch=batch_in_epoch, rng=rngs,
                                          optimizer=optimizer.state_dict(),
                                          config={k: getattr(cfg, k) for k in FIXED_ON_RESUME}))
            last_saved = step

        # One optimizer step. The batch is normalised (and mixed) whole, then cut into accum_steps micro-batches;
        # each micro-batch's loss is its summed cross-entropy over the whole batch's size, so the accumulated
        # gradient is that of the batch's mean loss: the update of one large batch. DDP averages the processes'
        # gradients in the last micro-batch's backward only (no_sync before it).
        def train_step(images: torch.Tensor, labels: torch.Tensor, lr: float) -> torch.Tensor:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            x = data.normalize(images, model_cfg.mean, model_cfg.std)  # (B, C, H, W) float32
            targets = labels
            if mix is not None:  # soft targets (B, K), drawn from a function of (seed, step, process)
                x, targets = mix(x, labels, seed=(cfg.seed * 1_000_003 + step) * 4096 + rank)
            for group in optimizer.param_groups:
                group["lr"] = lr
            n = len(x)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device)
            if mpp:  # the targets are the patches' colours; which patches, one draw per (seed, step, process)
                targets = mean_colour_targets(images, model_cfg.grid_size, MPP_BITS)  # (B, N)
                generator = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 4096 + rank)
                corruption = draw_corruption(len(x), model_cfg.num_patches, generator, device)
                n = corruption.count  # the loss is the mean over the batch's corrupted patches
                parts = corruption.split(cfg.accum_steps)
            micro = [(xm, tm) for xm, tm in zip(x.tensor_split(cfg.accum_steps), targets.tensor_split(cfg.accum_steps))
                     if len(xm)]
            for i, (xm, tm) in enumerate(micro):
                sync = i == len(micro) - 1
                with train_net.no_sync() if distributed and not sync else contextlib.nullcontext():
                    if mpp:
                        cm = parts[i]
                        with autocast(device, precision):
                            logits = train_net(xm, corruption=cm)[cm.chosen]  # (n_i, K): the corrupted patches
                        tm = tm[cm.chosen]
                        loss = F.cross_entropy(logits.float(), tm, reduction="sum") / n
                    else:
                        with autocast(device, precision):
                            logits = train_net(xm)
                        loss = F.cross_entropy(logits.float(), tm, reduction="sum",
                                               label_smoothing=cfg.label_smoothing) / n
                    loss.backward()
                loss_sum += loss.detach()
                correct += (logits.argmax(-1) == (tm if tm.ndim == 1 else tm.argmax(-1))).sum()
            grad_norm = torch.zeros((), device=device)
            if cfg.grad_clip:
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return torch.stack([loss_sum, correct / n, grad_norm.float()])  # stays on the device until a flush

        # Metrics leave the device every log_every steps (and before evaluating, saving or stopping) in one
        # transfer, the loop's only host-device sync. Across processes they are averaged in one all_reduce that
        # also carries each process's stop request, so that all processes stop after the same step.
        bar = stack.enter_context(tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True,
                                       disable=not is_main))
        pending: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, stats on the device)
        window_start, window_images = time.perf_counter(), 0

        def flush() -> bool:
            """Write the pending steps' metrics, stopping at a non-finite loss; True when a process must stop."""
            nonlocal window_start, window_images
            stop = signals.received is not None
            stats = torch.stack([s for _, _, s in pending]) if pending else torch.zeros(0, 3, device=device)
            if distributed:  # the processes' mean metrics, and whether any of them must stop
                packet = torch.cat([stats.flatten(), torch.tensor([float(stop)], device=device)])
                dist.all_reduce(packet)
                stats, stop = (packet[:-1] / world_size).view(-1, 3), packet[-1].item() > 0
            elapsed = time.perf_counter() - window_start
            img_s = window_images / elapsed if elapsed > 0 else 0.0
            for (s, lr, _), (loss, acc, grad_norm) in zip(pending, stats.tolist()):
                if not math.isfinite(loss):
                    kept = f"{out} keeps step {last_saved}" if last_saved is not None else "nothing was saved"
                    raise TrainingStopped(f"error: the loss is {loss} at step {s}; stopped ({kept})", exit_code=1)
                if is_main:
                    log.write(dict(split="train", step=s, epoch=round(s / steps_per_epoch, 4), loss=loss, acc=acc,
                                   lr=lr, img_s=round(img_s, 1), grad_norm=grad_norm,
                                   train_flops=flops_per_image * cfg.batch_size * s))
            if is_main and pending:
                log.flush()
                bar.update(pending[-1][0] - bar.n)
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}", lr=f"{lr:.2e}", img_s=f"{img_s:.0f}")
            pending.clear()
            window_start, window_images = time.perf_counter(), 0
            return stop

        # ---- loop ------------------------------------------------------------------------------------------
        while step < total_steps:
            loader = data.make_loader(
                splits.train, local_batch, shuffle=True, seed=cfg.seed, epoch=epoch, start_batch=batch_in_epoch,
                num_workers=cfg.num_workers, drop_last=True, rank=rank, world_size=world_size,
                pin_memory=device.type == "cuda",
            )
            if saved_rng is not None:  # restored here, after all that a resume does before its first step
                set_rng_state(saved_rng)
                saved_rng = None
            window_start = time.perf_counter()
            for batch, epoch_end in _epoch_batches(loader, steps_per_epoch - batch_in_epoch):
                if batch is None:
                    raise data.DataError(f"every image of batch {batch_in_epoch} of epoch {epoch} is unreadable")
                lr = learning_rate(cfg, step, total_steps)
                pending.append((step + 1, lr, train_step(*batch, lr)))
                step, batch_in_epoch, window_images = step + 1, batch_in_epoch + 1, window_images + cfg.batch_size
                _fault("step", step)
                if epoch_end:
                    epoch, batch_in_epoch = epoch + 1, 0
                done = step == total_steps
                save_now = done or (step % cfg.save_every == 0 if cfg.save_every else epoch_end)
                stop = False
                if step % cfg.log_every == 0 or epoch_end or save_now or (signals.received and not distributed):
                    stop = flush()
                if done or (step % cfg.eval_every == 0 if cfg.eval_every else epoch_end):
                    run_evaluators()
                if save_now or stop:
                    save()
                if stop and not done:
                    signum = signals.received or signal.SIGTERM  # (another process may have received it)
                    raise TrainingStopped(f"stopped by {signal.Signals(signum).name} after step {step}; saved {out}; "
                                          f"continue with: vitlab train --resume {out}", exit_code=128 + signum)
                if done:
                    break
        if evaluated != step:  # resumed from the last step: evaluate again to report
            run_evaluators()

    if is_main:
        skipped = getattr(splits.train, "skipped", 0)
        if skipped:
            print(f"skipped {skipped} unreadable training images")
        print(f"saved {out}")
        if evaluators:
            what = " (masked patch prediction: mean colours of the corrupted patches)" if cfg.objective == "mpp" else ""
            print(f"{evaluators[0].name} accuracy{what}: {results['top1']:.4f}")
        else:
            print("no val or test split to measure accuracy on: pass --val-split FRACTION")
    return results


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------


def cmd_train(args, defaults: tuple[str, dict] | None = None) -> None:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if args.resume:
        if args.config or getattr(args, "preset", None):
            raise ConfigError("--resume reads the run's own config: pass changes as flags, not --config or --preset")
        if overrides.get("out") not in (None, str(args.resume)):
            raise ConfigError(f"--out {overrides['out']} differs from --resume {args.resume}")
        saved = args.resume / TRAIN_CONFIG_FILE
        if not saved.is_file():
            raise CheckpointError(f"{args.resume}: no {TRAIN_CONFIG_FILE}: not a training run to resume")
        layers = [(str(saved), read_config_file(saved)), ("command line", dict(overrides, out=str(args.resume)))]
    else:
        layers = [defaults] if defaults else []
        if getattr(args, "preset", None):
            if args.preset not in PRESETS:
                raise ConfigError(f"unknown preset {args.preset!r}: choose from {', '.join(PRESETS)}")
            preset = PRESETS[args.preset]()
            changed = {f.name: getattr(preset, f.name) for f in dataclasses.fields(TrainConfig)
                       if getattr(preset, f.name) != f.default}  # so that flags still resolve the defaults
            layers.append((f"preset {args.preset}", changed))
        if args.config:
            layers.append((str(args.config), read_config_file(args.config)))
        layers.append(("command line", overrides))
    cfg = make_config(*layers)
    try:
        train(cfg, resume=bool(args.resume))
    except TrainingStopped as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"vitlab {args.command}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def cmd_finetune(args) -> None:
    """`vitlab train` from pretrained weights, starting from the fine-tuning defaults (`FINE_TUNE`)."""
    if not args.resume and not getattr(args, "init", None):
        raise ConfigError("--init is required: the pretrained weights to fine-tune")
    cmd_train(args, defaults=("fine-tuning defaults", FINE_TUNE))


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add `vitlab train` and `vitlab finetune`: one flag per TrainConfig field, plus --config and --resume (and
    --preset for train)."""
    p = sub.add_parser(
        "train", help="train a ViT (from scratch, or continue a run with --resume)",
        description="Train a ViT. Settings come from the defaults, then --preset, then --config FILE.yaml, then flags.",
    )
    p.add_argument("--preset", default=None, help=f"start from a preset: {', '.join(PRESETS)}")
    _add_run_flags(p)
    p.set_defaults(func=cmd_train)

    defaults = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in FINE_TUNE.items())
    p = sub.add_parser(
        "finetune", help="fine-tune pretrained weights (--init) on new data at a new resolution",
        description="Fine-tune as the paper does (appendix B.1.1): the weights of --init with a new zero head, the "
                    "pre-logits layer dropped, the position embeddings interpolated to --image-size; the training "
                    f"loop of `vitlab train` with other defaults ({defaults}), then --config FILE.yaml, then flags.",
    )
    _add_run_flags(p)
    p.set_defaults(func=cmd_finetune)


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="a YAML file of TrainConfig fields")
    p.add_argument("--resume", type=Path, default=None, metavar="DIR", help="continue the run in DIR where it stopped")
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help = f.metadata.get("help", "")
        if hints[f.name] is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        else:  # parsed against the field's type by TrainConfig itself, so that errors name the field
            choices = _literal_choices(hints[f.name])
            metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
            p.add_argument(flag, default=argparse.SUPPRESS, metavar=metavar, help=help)
