"""Evaluation: top-1 / top-5 accuracy and loss on a labelled split (and ImageNet-ReaL accuracy), the paper's
linear few-shot accuracy of frozen features, and the classes a model sees in image files.

An evaluator is an object with `run(model) -> dict[str, float]` (big_vision's `evaluators/classification.py`),
so the training loop calls every evaluator the same way. Batches arrive as uint8 at the model's resolution and
are normalised with the mean and std stored in the model's config, as in training (vitlab.runtime.forward).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import data
from .common import CheckpointError, DataError
from .images import Preprocess
from .runtime import Predictor, eval_mode, forward, unwrap
from .transfer import head_is_zero


def real_accuracy(predictions: Sequence[int], real: Sequence[Sequence[int]]) -> tuple[float, int]:
    """ImageNet-ReaL top-1 (Beyer et al. 2020, the paper's "ReaL" columns): a prediction is right when it is one of
    the image's reassessed labels; images left with no label are not counted. (accuracy, images counted)."""
    if len(predictions) != len(real):
        raise ValueError(f"{len(predictions)} predictions for {len(real)} ReaL label sets")
    counted = [(p, labels) for p, labels in zip(predictions, real) if len(labels)]
    if not counted:
        return math.nan, 0
    return sum(int(p) in set(labels) for p, labels in counted) / len(counted), len(counted)


@torch.inference_mode()
def evaluate(model: nn.Module, loader, device: torch.device, precision: str = "fp32",
             real: Sequence[Sequence[int]] | None = None, label_map: Sequence[int] | None = None,
             tta: str = "none") -> dict[str, float]:
    """Top-1 and top-5 accuracy, mean cross-entropy and the number of images of `loader` (uint8 batches); with
    `real` (the ReaL label sets of the loader's images, in its order) also real_top1 and real_n. `label_map` turns
    the dataset's labels into the model's classes (vitlab.data.match_classes); `tta` is `tta_logits`'s."""
    mapping = None if label_map is None else torch.as_tensor(label_map, device=device)
    k = min(5, unwrap(model).cfg.num_classes)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-k hits
    n = 0
    predictions = []
    with eval_mode(model):
        for batch in loader:
            if batch is None:  # every image of the batch was unreadable and skipped (bad_images="skip")
                continue
            images, labels = (t.to(device, non_blocking=True) for t in batch)
            labels = labels if mapping is None else mapping[labels]
            logits = tta_logits(model, images, precision, tta)
            hits = logits.topk(k, dim=-1).indices == labels[:, None]  # (B, k)
            totals += torch.stack([F.cross_entropy(logits, labels, reduction="sum"), hits[:, 0].sum(),
                                   hits.any(-1).sum()])
            n += len(labels)
            if real is not None:
                predictions.append(logits.argmax(-1).cpu())
    if n == 0:
        raise DataError("the evaluation split holds no readable image")
    loss, top1, top5 = (totals / n).tolist()
    result = dict(top1=top1, top5=top5, loss=loss, n=n)
    if real is not None:
        result["real_top1"], result["real_n"] = real_accuracy(torch.cat(predictions).tolist(), real)
    return result


def tta_logits(model: nn.Module, images: torch.Tensor, precision: str, tta: str = "none") -> torch.Tensor:
    """The model's float32 logits for a batch of uint8 images. With tta="flip" (test-time augmentation, as
    KellerJordan's airbench evaluates) the images and their horizontal mirrors go through the model as one batch,
    and each image gets the log of the mean of the two class distributions: logits whose softmax is that mean."""
    if tta == "none":
        return forward(model, images, precision).float()
    if tta != "flip":
        raise ValueError(f"tta must be none or flip, not {tta!r}")
    own, mirrored = forward(model, torch.cat([images, images.flip(-1)]), precision).float().chunk(2)
    return torch.logaddexp(own.log_softmax(-1), mirrored.log_softmax(-1)) - math.log(2)


class Classification:
    """The evaluator of one labelled split: `run(model)` gives its top1, top5, loss and n."""

    def __init__(self, dataset, name: str, *, batch_size: int, device: torch.device, precision: str,
                 num_workers: int = 0, real: Sequence[Sequence[int]] | None = None,
                 label_map: Sequence[int] | None = None, tta: str = "none"):
        self.dataset, self.name, self.real, self.label_map, self.tta = dataset, name, real, label_map, tta
        self.batch_size, self.device, self.precision, self.num_workers = batch_size, device, precision, num_workers

    def loader(self):
        """The split in order, every image once."""
        return data.make_loader(
            self.dataset, self.batch_size, shuffle=False, seed=0, epoch=0, num_workers=self.num_workers,
            even=False, pin_memory=self.device.type == "cuda",
        )

    def run(self, model: nn.Module) -> dict[str, float]:
        return evaluate(model, self.loader(), self.device, self.precision, self.real, self.label_map,
                        self.tta)


def preprocess(model: nn.Module) -> Preprocess:
    """The function that turns an image (path, PIL image, uint8 or float tensor) into what `model` takes."""
    return Preprocess(unwrap(model).cfg)


@torch.inference_mode()
def predict(model: nn.Module, images, k: int = 5, precision: str = "auto") -> list[list[tuple[str, float]]]:
    """The `k` most probable (class name, probability) pairs of each image, most probable first, as `vitlab
    predict` prints them. `images`: a path, a PIL image or a (C, H, W) tensor, or a list of them (a (B, C, H, W)
    tensor is a batch). The model runs as the command runs it (vitlab.runtime.Predictor: bf16 where the CPU or GPU
    has it, else float32)."""
    cfg = unwrap(model).cfg
    if not cfg.num_classes:
        raise CheckpointError("the model has no classification head (num_classes 0): nothing to predict")
    single = not isinstance(images, (list, tuple)) and not (isinstance(images, torch.Tensor) and images.ndim == 4)
    prep = preprocess(model)
    batch = torch.stack([prep.uint8(image) for image in ([images] if single else images)])  # (B, C, H, W) uint8
    predictor = model if isinstance(model, Predictor) else Predictor(model, precision)
    out = [[(name, p) for _, name, p in top] for top in top_classes(predictor, batch, k)]
    return out[0] if single else out


def top_classes(predictor: Predictor, images: torch.Tensor, k: int) -> list[list[tuple[int, str, float]]]:
    """(class index, class name, probability) of the k most probable classes of each uint8 image (B, C, H, W)."""
    return classes_of(torch.cat([predictor.logits(x) for x in images.split(256)]), predictor.cfg, k)


def classes_of(logits: torch.Tensor, cfg, k: int) -> list[list[tuple[int, str, float]]]:
    """(class index, class name, probability) of the k most probable classes of each row of logits (B, K)."""
    top = logits.float().softmax(dim=-1).topk(min(k, cfg.num_classes), dim=-1)
    names = cfg.class_names or tuple(str(i) for i in range(cfg.num_classes))
    return [[(i, names[i], p) for i, p in zip(idx.tolist(), val.tolist())] for idx, val in zip(top.indices, top.values)]


# --------------------------------------------------------------------------------------------------------------
# Few-shot linear evaluation (section 4.1: "few-shot accuracies are obtained by solving a regularized
# least-squares regression problem that maps the (frozen) representation of a subset of training images to
# {-1, 1}^K target vectors"), as big_vision's `evaluators/fewshot_lsr.py` computes it.
# --------------------------------------------------------------------------------------------------------------

# big_vision's few-shot configs fix the regulariser (`configs/common_fewshot.py`: `l2_reg = 2.0 ** 10`); its
# evaluator is written to solve for many regularisers from one eigendecomposition, but it evaluates the single
# configured one ("even though we currently used the fixed l2_reg constant"), with no search on held-out shots.
FEWSHOT_L2_REG = 2.0**10
FEWSHOT_BIAS = 100.0  # big_vision's BIAS_CONSTANT


# The solver. X (n, d): the features of the n = k·K few-shot images, each dimension whitened with the mean and
# standard deviation of these n (std + 1e-5), then a constant column c = 100 appended: the bias, a weight like the
# others but, multiplied by c, all but unregularised. Y (n, K): targets 2·onehot - 1 in {-1, 1}^K. The map
#
#     W = argmin_W ‖X W - Y‖² + λ ‖W‖²
#
# zeroes the gradient 2 Xᵀ(X W - Y) + 2 λ W, so (XᵀX + λ I_d) W = XᵀY and W = (XᵀX + λ I_d)⁻¹ XᵀY: a d×d
# system. With fewer images than dimensions (n < d) the push-through identity (XᵀX + λI_d)⁻¹Xᵀ = Xᵀ(XXᵀ + λI_n)⁻¹
# (multiply both sides by XXᵀ + λI_n on the right and XᵀX + λI_d on the left) gives W = Xᵀ (XXᵀ + λ I_n)⁻¹ Y, an
# n×n system; big_vision picks the smaller system too. A test image x is assigned argmax_k ([whiten(x), c] W)_k.
def ridge_solve(x: np.ndarray, y: np.ndarray, l2_reg: float) -> np.ndarray:
    """W (d, K) minimising ‖x W - y‖² + l2_reg ‖W‖², in closed form (the smaller of the two normal systems)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n, d = x.shape
    if n >= d:
        return np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ y)
    return x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), y)


def fewshot_lsr(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, num_classes: int,
                l2_reg: float = FEWSHOT_L2_REG) -> np.ndarray:
    """The classes predicted for `x_test` by the regularised least-squares map fitted to (x_train, y_train)."""
    x_train = np.asarray(x_train, np.float64)
    mean, std = x_train.mean(0, keepdims=True), x_train.std(0, keepdims=True) + 1e-5

    def design(x):  # whitened, with the bias column
        x = (np.asarray(x, np.float64) - mean) / std
        return np.concatenate([x, np.full((len(x), 1), FEWSHOT_BIAS)], axis=1)

    targets = 2.0 * np.eye(num_classes)[np.asarray(y_train)] - 1.0  # (n, K) in {-1, 1}
    w = ridge_solve(design(x_train), targets, l2_reg)
    return (design(x_test) @ w).argmax(1)


def shot_order(labels: np.ndarray, num_classes: int, seed: int) -> list[np.ndarray]:
    """Per class, its training indices in a random order drawn from `seed`: k shots are the first k of each
    (big_vision's draw: `np.random.default_rng(seed)`, one permutation per class in class order)."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]


def shot_indices(order: list[np.ndarray], shots: int) -> np.ndarray:
    """`shots` training indices of every class: balanced, and the same for one seed whatever else is asked."""
    short = [(c, len(idx)) for c, idx in enumerate(order) if len(idx) < shots]
    if short:
        c, n = short[0]
        raise DataError(f"{shots}-shot needs {shots} training images of every class; class {c} has {n}"
                        + (f" ({len(short)} classes have too few)" if len(short) > 1 else ""))
    return np.concatenate([idx[:shots] for idx in order])


@torch.inference_mode()
def features(model: nn.Module, dataset, *, batch_size: int, precision: str = "fp32", indices: Sequence[int] | None = None, num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Frozen features (N, F) float32 and labels (N,) of a dataset (or of its `indices`), in its order: the
    pre-logits representation if the model has one, else the [class] token (or the mean token) after the encoder's
    LayerNorm: `forward_head(forward_features(x), pre_logits=True)`, on the model's device."""
    if indices is not None:
        loader = data.Loader(dataset, batch_size=batch_size, sampler=list(indices), num_workers=num_workers,
                             collate_fn=data.collate)
    else:
        loader = data.make_loader(dataset, batch_size, shuffle=False, seed=0, epoch=0, num_workers=num_workers,
                                  even=False)
    feats, labels = [], []
    with eval_mode(model):
        for images, y in loader:  # bf16 on GPUs: the ridge solve whitens, so 8 mantissa bits suffice
            feats.append(forward(model, images, precision, call=_pre_logits(model)).float().cpu())
            labels.append(y)
    if not feats:
        raise DataError("no image to compute features of")
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def fewshot(model: nn.Module, train_set, eval_set, num_classes: int, *, shots: Sequence[int] = (1, 5, 10, 25),
            seeds: Sequence[int] = range(5), l2_reg: float = FEWSHOT_L2_REG, batch_size: int = 256,
            precision: str = "fp32", num_workers: int = 0, eval_label_map: Sequence[int] | None = None) -> dict:
    """Linear few-shot accuracy on `eval_set` for each number of shots: {"results": {k: {"mean", "std",
    "accuracy" (per seed)}}, ...}. Features are computed once: for the eval set, and for the training images some
    seed draws (all of them when the training set is a stream), on the model's device."""
    common = dict(batch_size=batch_size, precision=precision, num_workers=num_workers)
    labels = data.labels_of(train_set)  # known without decoding: featurise only the drawn images
    orders = {seed: shot_order(labels, num_classes, seed) for seed in seeds} if labels is not None else None
    if orders is not None:
        for k in shots:  # every shot count is drawable before any feature is computed
            shot_indices(orders[seeds[0]], k)
        needed = np.unique(np.concatenate([idx[:max(shots)] for order in orders.values() for idx in order]))
        x_train, _ = features(model, train_set, indices=needed.tolist(), **common)
        row = np.full(len(labels), -1)
        row[needed] = np.arange(len(needed))  # dataset index -> row of x_train
    else:
        x_train, labels = features(model, train_set, **common)
        orders = {seed: shot_order(labels, num_classes, seed) for seed in seeds}
        for k in shots:
            shot_indices(orders[seeds[0]], k)
        needed = row = np.arange(len(labels))
    x_test, y_test = features(model, eval_set, **common)
    if eval_label_map is not None:  # the evaluation set's classes, numbered as the training set's
        y_test = np.asarray(eval_label_map)[y_test]
    results = {}
    for k in shots:
        accuracy = []
        for seed in seeds:
            idx = shot_indices(orders[seed], k)
            predicted = fewshot_lsr(x_train[row[idx]], labels[idx], x_test, num_classes, l2_reg)
            accuracy.append(float((predicted == y_test).mean()))
        results[int(k)] = dict(mean=float(np.mean(accuracy)),
                               std=float(np.std(accuracy, ddof=1)) if len(accuracy) > 1 else 0.0,
                               accuracy=accuracy)
    return dict(results=results, feature_dim=int(x_test.shape[1]), train_images=len(labels),
                featurised=int(len(needed)), eval_images=int(len(y_test)), l2_reg=float(l2_reg), seeds=list(seeds))


def _pre_logits(model: nn.Module):
    """The model's pre-logits representation, the features few-shot evaluation reads."""
    return lambda x: model.forward_head(model.forward_features(x), pre_logits=True)


def read_real_labels(path: Path, dataset, num_classes: int) -> list[list[int]]:
    """The ReaL label sets of `dataset`'s images in its order, from a real.json whose entries follow the sorted
    file names (ILSVRC2012_val_00000001.JPEG, ...), as google-research/reassessed-imagenet publishes it."""
    try:
        real = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read ReaL labels ({e})") from None
    if not isinstance(real, list) or not all(
        isinstance(r, list) and all(isinstance(k, int) and 0 <= k < num_classes for k in r) for r in real
    ):
        raise DataError(f"{path}: expected a list with one list of class indices (0..{num_classes - 1}) per "
                        "image")
    if not isinstance(dataset, data.MapDataset):
        raise DataError("ReaL labels pair with images by their position: evaluate an indexed split (folder:PATH)"
                        ", not a stream of shards")
    if len(real) != len(dataset):
        raise DataError(f"{path} has {len(real)} entries, the evaluation split {len(dataset)} images")
    names = data.file_names_of(dataset)
    if names is None:  # no files: the images' own order
        return real
    by_name = sorted(range(len(names)), key=lambda i: names[i])  # the j-th file name in sorted order is image i
    ordered: list[list[int]] = [[] for _ in names]
    for j, i in enumerate(by_name):
        ordered[i] = real[j]
    return ordered


def check_classifier(model: nn.Module, ckpt) -> None:
    """A CheckpointError naming `ckpt` when its model cannot classify: no head, or an all-zero one."""
    if not unwrap(model).cfg.num_classes:
        raise CheckpointError(
            f"{ckpt}: the model has no classification head (num_classes 0, e.g. masked patch prediction's "
            f"pre-training): fine-tune one (vitlab finetune --init {ckpt} ...) or measure the features (vitlab fewshot)"
        )
    if head_is_zero(model):
        raise CheckpointError(
            f"{ckpt}: the head is all zero (the official ImageNet-21k checkpoints ship one), so every class scores "
            f"the same: fine-tune a head (vitlab finetune --init {ckpt} ...) or measure the features (vitlab fewshot)"
        )
