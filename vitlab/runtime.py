"""Running a model: the device, the precision, the input normalisation, and the wrappers around a module.

Every part that runs a model on images (training, the evaluators, few-shot features, prediction, inspection)
goes through `forward`: uint8 images in, normalised with the mean and std the model's config records, under bf16
autocast or in float32; evaluation wraps it in `eval_mode`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from .common import ConfigError


def default_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" is bf16 on GPUs and on CPUs that compute in bf16 natively (AVX-512 BF16 or AMX), else fp32: where bf16
    is emulated (an AVX2-only CPU) the last demo preset trained at 21 images/s in bf16 against 303 in fp32."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" or cpu_has_native_bf16() else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    return precision


def emulated_bf16(precision: str, device: torch.device) -> bool:
    """Whether `precision` (resolved) asks this CPU for bf16 it has no instructions for: slow, worth a warning."""
    return precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (x86's avx512_bf16 or amx_bf16 in /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def autocast(device: torch.device, precision: str):
    """The mixed-precision context of a forward pass: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images (B, C, H, W) -> float32 (x/255 - mean)/std, on x's device."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return (x.float() / 255 - mean_t) / std_t


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode for the duration, its training flag restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def forward(model: nn.Module, images: torch.Tensor, precision: str = "fp32", call: Callable | None = None, **kwargs):
    """`call(x, **kwargs)` (the model itself by default) on uint8 images (B, C, H, W) moved to the model's device
    and normalised with its config's mean and std, under autocast when `precision` is bf16."""
    cfg = unwrap(model).cfg
    device = model_device(model)
    x = normalize(images.to(device, non_blocking=True), cfg.mean, cfg.std)  # (B, C, H, W) float32
    with autocast(device, precision):
        return (call or model)(x, **kwargs)


class Predictor:
    """A model ready for inference, the path `vitlab eval`, `predict`, `fewshot` and `serve` run: eval mode on its
    device, under inference_mode, and in bf16 the weights of its linear maps and convolutions cast once, not at
    every call (autocast would cast them again each time; it still casts the activations, and runs LayerNorm and
    softmax as it always does, so the logits are the same as under plain autocast). `torch.compile` on request."""

    def __init__(self, model: nn.Module, precision: str = "auto", device: torch.device | None = None,
                 compile: bool = False):
        model = unwrap(model)
        self.device = device or model_device(model)
        self.precision = resolve_precision(precision, self.device)
        self.model = model.to(self.device).eval()
        if self.precision == "bf16":  # a copy: the caller's model keeps its float32 weights
            self.model = _bf16_weights(self.model)
        self.cfg = model.cfg
        self.run = torch.compile(self.model) if compile else self.model

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 logits (B, K) of uint8 images (B, C, H, W) at the model's resolution."""
        return forward(self.run, images, self.precision).float()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, call: Callable | None = None, **kwargs):
        """`call` (a method of the model, the model itself by default) on uint8 images, as `forward` runs it."""
        return forward(self.run, images, self.precision, call=call, **kwargs)


def _bf16_weights(model: nn.Module) -> nn.Module:
    """A copy of `model` whose nn.Linear and nn.Conv2d weights and biases are bf16 (what autocast would make of
    them at each call); everything else (LayerNorm, position embeddings, tokens, and the weight-standardised
    convolutions of a ResNet, which standardise in float32 first) stays float32."""
    import copy

    out = copy.deepcopy(model)
    for module in out.modules():
        if type(module) in (nn.Linear, nn.Conv2d):
            module.to(torch.bfloat16)
    return out
