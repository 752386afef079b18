"""Evaluation: top-1 / top-5 accuracy and loss on a labelled split, and the classes a model sees in image files.

An evaluator is an object with `run(model) -> dict[str, float]` (big_vision's `evaluators/classification.py`),
so the training loop calls every evaluator the same way. Batches arrive as uint8 at the model's resolution and
are normalised here with the mean and std stored in the model's config, as in training.

The `vitlab eval` and `vitlab predict` commands are registered from here (`register_cli`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .model import ConfigError
from .weights import atomic_write_text, load_model, unwrap

# torchvision's import alone takes seconds, so `vitlab.data` is imported where it is used, never at the top of a
# module the CLI imports to build its parser.


def autocast(device: torch.device, precision: str):
    """The mixed-precision context of a forward pass: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" is bf16 on GPUs and fp32 on CPUs (autocast to bf16 is slow on CPUs without bf16 instructions)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    return precision


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, precision: str = "fp32") -> dict[str, float]:
    """Top-1 and top-5 accuracy, mean cross-entropy and the number of images of `loader` (uint8 batches)."""
    from . import data

    cfg = unwrap(model).cfg
    was_training = model.training
    model.eval()
    k = min(5, cfg.num_classes)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-k hits
    n = 0
    for batch in loader:
        if batch is None:  # every image of the batch was unreadable and skipped (bad_images="skip")
            continue
        images, labels = (t.to(device, non_blocking=True) for t in batch)
        x = data.normalize(images, cfg.mean, cfg.std)  # (B, C, H, W) float32
        with autocast(device, precision):
            logits = model(x)
        logits = logits.float()
        hits = logits.topk(k, dim=-1).indices == labels[:, None]  # (B, k)
        totals += torch.stack([F.cross_entropy(logits, labels, reduction="sum"), hits[:, 0].sum(), hits.any(-1).sum()])
        n += len(labels)
    model.train(was_training)
    if n == 0:
        raise data.DataError("the evaluation split holds no readable image")
    loss, top1, top5 = (totals / n).tolist()
    return dict(top1=top1, top5=top5, loss=loss, n=n)


class Classification:
    """The evaluator of one labelled split: `run(model)` gives its top1, top5, loss and n."""

    def __init__(self, dataset, name: str, *, batch_size: int, device: torch.device, precision: str,
                 num_workers: int = 0):
        self.dataset, self.name = dataset, name
        self.batch_size, self.device, self.precision, self.num_workers = batch_size, device, precision, num_workers

    def run(self, model: nn.Module) -> dict[str, float]:
        from . import data

        loader = data.make_loader(
            self.dataset, self.batch_size, shuffle=False, seed=0, epoch=0, num_workers=self.num_workers,
            even=False, pin_memory=self.device.type == "cuda",
        )
        return evaluate(model, loader, self.device, self.precision)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def predict(model: nn.Module, paths: list[str], top_k: int = 5,
            precision: str = "fp32") -> list[list[tuple[str, float]]]:
    """For each image file, the `top_k` most probable (class name, probability) pairs, most probable first."""
    from . import data

    cfg = unwrap(model).cfg
    device = next(model.parameters()).device
    transform = data.eval_transform(cfg.image_size, cfg.in_chans)  # resize and channels, as evaluation sees them
    images = torch.stack([transform(data.decode_image(p, cfg.in_chans)) for p in paths])  # (B, C, H, W) uint8
    model.eval()
    with autocast(device, precision):
        logits = torch.cat([model(data.normalize(x.to(device), cfg.mean, cfg.std)) for x in images.split(256)])
    probs = logits.float().softmax(dim=-1)
    names = cfg.class_names or tuple(str(i) for i in range(cfg.num_classes))
    top = probs.topk(min(top_k, cfg.num_classes), dim=-1)
    return [
        [(names[i], p) for i, p in zip(idx.tolist(), val.tolist())] for idx, val in zip(top.indices, top.values)
    ]


# --------------------------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------------------------


def cmd_eval(args) -> None:
    from . import data

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = _device()
    model = load_model(args.ckpt).to(device)
    cfg = model.cfg
    splits = data.build(
        args.data, image_size=cfg.image_size, in_chans=cfg.in_chans, train_transform=data.TrainAug(),
        val_split=args.val_split, bad_images=args.bad_images, split=args.split,
    )
    if splits.eval is None:
        raise data.DataError(f"{args.data} has no val or test split; pass --val-split FRACTION")
    if splits.num_classes != cfg.num_classes:
        raise ConfigError(f"{args.data} has {splits.num_classes} classes, the model in {args.ckpt} has "
                          f"{cfg.num_classes}")
    precision = resolve_precision(args.precision, device)
    evaluator = Classification(splits.eval, splits.eval_name, batch_size=args.batch_size, device=device,
                               precision=precision, num_workers=args.num_workers)
    result = evaluator.run(model)
    if args.json:
        record = dict(result, split=splits.eval_name, data=args.data, checkpoint=str(args.ckpt))
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    print(f"{splits.eval_name}: {result['n']} images")
    print(f"loss: {result['loss']:.4f}")
    print(f"top1: {result['top1']:.4f}")
    print(f"top5: {result['top5']:.4f}")


def cmd_predict(args) -> None:
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    device = _device()
    model = load_model(args.ckpt).to(device)
    results = predict(model, args.images, args.top_k, resolve_precision(args.precision, device))
    for path, top in zip(args.images, results):
        print(path)
        width = max(len(name) for name, _ in top)
        for name, p in top:
            print(f"  {name:<{width}}  {p:.4f}")


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add `vitlab eval` and `vitlab predict` to the `vitlab` command."""
    p = sub.add_parser("eval", help="top-1 / top-5 accuracy of a checkpoint on a labelled split")
    p.add_argument("ckpt", type=Path, help="vitlab checkpoint directory (a training run's DIR) or official .npz")
    p.add_argument("--data", required=True, help="fashion-mnist, cifar10, cifar100, folder:PATH or wds:PATTERN")
    p.add_argument("--split", choices=("test", "val"), default=None, help="default: val if there is one, else test")
    p.add_argument("--val-split", type=float, default=None,
                   help="the fraction of the training data cut as val (as in training)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--bad-images", choices=("error", "skip"), default="error")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="the most probable classes of image files")
    p.add_argument("ckpt", type=Path, help="vitlab checkpoint directory (its config.json names the classes)")
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.set_defaults(func=cmd_predict)
