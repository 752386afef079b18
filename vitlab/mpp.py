"""Masked patch prediction (appendix B.1.2), the self-supervised objective of section 4.6.

50% of each image's patch embeddings are chosen; of those, 80% are replaced by a learned [mask] embedding, 10% by
another patch's embedding (any patch of the batch but itself), 10% left as they are. The model predicts each chosen
patch's mean colour, 3 bits per channel (512 classes for RGB, 8 for grey images), from its output token through a
linear head (`VisionTransformer.forward_mpp`), with a cross-entropy over the chosen patches.

Here: the corruption (`Corruption`, `draw_corruption`), the targets (`mean_colour_targets`), the training objective
(`MaskedPatchObjective`, the same interface as the classification objective in vitlab.train) and the evaluator
(`MaskedPatchPrediction`, the same interface as vitlab.evaluate.Classification).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .evaluate import Classification
from .runtime import autocast, eval_mode, forward, normalize, unwrap

# The targets: each patch's mean colour at 3 bits per channel, 512 classes for RGB (appendix B.1.2).
MPP_BITS = 3


def mpp_classes(in_chans: int) -> int:
    """The number of mean-colour classes of `in_chans`-channel images: 2^(3 C)."""
    return 2 ** (MPP_BITS * in_chans)


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


class MaskedPatchObjective:
    """Masked patch prediction as a training objective: `batches` cuts a step's batch into micro-batches with
    their targets and corruptions, `loss` gives a micro-batch's summed cross-entropy over its corrupted patches
    and how many it predicted right. The loss of a step is the mean over the batch's corrupted patches."""

    def __init__(self, cfg, device: torch.device, precision: str):
        self.cfg, self.device, self.precision = cfg, device, precision

    def batches(self, images: torch.Tensor, labels: torch.Tensor, seed: int, parts: int) -> tuple[list, int]:
        x = normalize(images, self.cfg.mean, self.cfg.std)  # (B, C, H, W) float32
        targets = mean_colour_targets(images, self.cfg.grid_size, MPP_BITS)  # (B, N), the patches' colours
        # which patches, one draw per (seed, step, process)
        corruption = draw_corruption(len(x), self.cfg.num_patches, torch.Generator().manual_seed(seed), self.device)
        micro = [m for m in zip(x.tensor_split(parts), targets.tensor_split(parts)) if len(m[0])]
        return [(xm, tm, cm) for (xm, tm), cm in zip(micro, corruption.split(parts))], corruption.count

    def loss(self, net: nn.Module, micro) -> tuple[torch.Tensor, torch.Tensor]:
        x, targets, corruption = micro
        with autocast(self.device, self.precision):
            logits = net(x, corruption=corruption)[corruption.chosen]  # (n_i, K): the corrupted patches
        targets = targets[corruption.chosen]
        return F.cross_entropy(logits.float(), targets, reduction="sum"), (logits.argmax(-1) == targets).sum()


class MaskedPatchPrediction(Classification):
    """The evaluator of masked patch prediction on one split: `run(model)` gives the loss and top-1 accuracy of
    the corrupted patches' mean colours (top1, loss, n = patches predicted). The corruption is drawn from a fixed
    seed, the same at every evaluation, so that the numbers of a run compare across its steps."""

    @torch.no_grad()
    def run(self, model: nn.Module) -> dict[str, float]:
        cfg = unwrap(model).cfg
        generator = torch.Generator().manual_seed(0)
        loss, correct, n = 0.0, 0, 0
        with eval_mode(model):
            for images, _ in self.loader():
                images = images.to(self.device)
                targets = mean_colour_targets(images, cfg.grid_size, MPP_BITS)
                corruption = draw_corruption(len(images), cfg.num_patches, generator, self.device)
                logits = forward(model, images, self.precision, corruption=corruption)[corruption.chosen]
                t = targets[corruption.chosen]
                loss += F.cross_entropy(logits.float(), t, reduction="sum").item()
                correct += int((logits.argmax(-1) == t).sum())
                n += len(t)
        return dict(top1=correct / max(n, 1), loss=loss / max(n, 1), n=n)
