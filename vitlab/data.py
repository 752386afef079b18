"""The --data specs (vitlab.specs) turned into datasets and loaders.

`build` turns a spec into `Splits`: a training set and an evaluation set (a val or test split) of
`(image, label)` samples, `image` a uint8 tensor (in_chans, H, W) already at the model resolution (vitlab.images).
In-memory and image-file sets are map-style (`MapDataset`); WebDataset shards stream (vitlab.wds).

Determinism (see also vitlab.images): the order of an epoch is a permutation seeded from (seed, epoch)
(`make_loader`); validation splits cut from training data are a fixed permutation with seed 0 (map-style) or a
hash of the KEY (WebDataset), independent of the training seed and of shard order. A WebDataset stream's order
does depend on the number of DataLoader workers (each reads its own part), and resuming it reads and discards the
batches before start_batch; map-style sets skip them unread.

Bad images: a map-style set returns None for one skipped with bad_images="skip" and `collate` drops the None, so
that batch comes out one short; a stream leaves it out.
"""

from __future__ import annotations

import copy
import gzip
import math
import os
import signal
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data._utils.collate import default_collate

from .common import DataError, one_line
from .images import (
    IMAGE_EXTENSIONS,
    SALT_LOADER,
    SALT_ORDER,
    SkipCounter,
    TrainAug,
    Transform,
    one_thread,
    pil_to_array,
    decode_image,
    in_train_subset,
    in_val_split,
    sample_hashes,
    seed_int,
    skip_bad,
)
from .specs import parse_spec
from .wds import WdsDataset, expand_pattern, read_classes, scan_shard

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def cache_dir() -> Path:
    """Where downloads go: $VITLAB_CACHE_DIR, else $XDG_CACHE_HOME/vitlab, else ~/.cache/vitlab."""
    if os.environ.get("VITLAB_CACHE_DIR"):
        return Path(os.environ["VITLAB_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vitlab"


def subset_indices(indices: list[int], count: int) -> list[int]:
    """`count` of a map-style training split's indices: a prefix of a fixed permutation, so nested as above."""
    perm = torch.randperm(len(indices), generator=torch.Generator().manual_seed(1))[:count]
    return sorted(indices[i] for i in perm.tolist())


def split_indices(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """(train, val) indices of a map-style set: a fixed permutation (seed 0, not the training seed)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    n_val = round(fraction * n)
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


# ------------------------------------------------------------------------------------ map-style sets


class _TensorSource:
    """A whole set in memory: images uint8 (N, C, H, W), labels int64 (N,)."""

    def __init__(self, images: Tensor, labels: Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)


class _FileSource:
    """Image files with labels, decoded on access."""

    def __init__(self, samples: list[tuple[str, int]], in_chans: int):
        self.samples, self.in_chans = samples, in_chans

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, j: int) -> tuple[Tensor, int]:
        path, label = self.samples[j]
        return decode_image(path, self.in_chans), label


class MapDataset(Dataset):
    """(image uint8 (C, H, W), label) of a source, optionally a subset, augmented per (seed, epoch, index).

    A bad image (folder sets) raises DataError, or with bad_images="skip" gives None, is counted in
    `skipped` (across DataLoader workers) and dropped by `collate`.
    """

    def __init__(self, source: _TensorSource | _FileSource, transform: Transform,
                 indices: list[int] | None = None, bad_images: str = "error"):
        self.source, self.transform, self.indices, self.bad_images = source, transform, indices, bad_images
        self.seed, self.epoch = 0, 0
        self._skips = SkipCounter()

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        self.epoch = epoch
        if seed is not None:
            self.seed = seed

    @property
    def skipped(self) -> int:
        return self._skips.value

    def __len__(self) -> int:
        return len(self.source) if self.indices is None else len(self.indices)

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, batch: list[int]) -> list:
        ids = [self.indices[i] for i in batch] if self.indices is not None else list(batch)
        hashes = sample_hashes(self.seed, self.epoch, ids) if self.transform.aug is not None else None
        if isinstance(self.source, _TensorSource):  # one vectorised op per batch, no per-sample PIL
            index = torch.as_tensor(ids, dtype=torch.int64)
            with one_thread():
                images = self.transform(self.source.images[index], hashes)
            return list(zip(images.unbind(0), self.source.labels[index].tolist()))
        loaded = [self._load(j) for j in ids]
        good = [k for k, item in enumerate(loaded) if item is not None]
        images = self.transform.many([loaded[k][0] for k in good], None if hashes is None else hashes[good])
        out: list = [None] * len(ids)
        for k, image in zip(good, images):
            out[k] = (image, loaded[k][1])
        return out

    def _load(self, j: int) -> tuple[Tensor, int] | None:
        try:
            return self.source.load(j)
        except DataError as exc:
            return skip_bad(self, exc)


def collate(batch: list) -> Any:
    """default_collate without the None that skipped bad images leave; None if the whole batch was bad."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    with one_thread():
        return default_collate(batch)


# -------------------------------------------------------------------------------------------- build

@dataclass
class Splits:
    train: Dataset | IterableDataset
    eval: Dataset | IterableDataset | None
    eval_name: str            # "test" | "val" ("none" when eval is None)
    num_classes: int
    class_names: list[str]
    train_size: int | None    # None when unknown (remote shards)


def build(spec: str, *, image_size: tuple[int, int] | int, in_chans: int, train_transform: TrainAug | None,
          val_split: float | None = None, bad_images: str = "error", split: str | None = None,
          train_images: int | None = None, in_memory: bool | None = None) -> Splits:
    """Datasets for a --data spec.

    train_transform None leaves the training split unaugmented, as evaluation sees it (frozen features for
    few-shot evaluation). val_split cuts a deterministic validation split from the training data. split picks
    the evaluation split: "val" (the cut, else the source's own val), "test" (the source's test), None (val if
    any, else test, else no evaluation). train_images keeps that many images of the training split (after the
    val cut), a fixed choice in which smaller subsets nest in larger ones (`in_train_subset`, `subset_indices`).
    in_memory (WebDataset shards): decode the images once and hold them (default: local shards that fit in 2 GiB at
    the model's resolution); False streams them from the shards every epoch.
    """
    data = parse_spec(spec)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise DataError(f"image size must be (height, width), got {image_size!r}")
    if in_chans not in (1, 3):
        raise DataError(f"in_chans must be 1 or 3, got {in_chans}")
    if bad_images not in ("error", "skip"):
        raise DataError(f"bad_images must be 'error' or 'skip', got {bad_images!r}")
    if split not in (None, "val", "test"):
        raise DataError(f"split must be 'val' or 'test', got {split!r}")
    if val_split and not 0 < val_split < 1:  # 0 and None both mean no cut
        raise DataError(f"val split must be a fraction in (0, 1), got {val_split}")
    val_split = val_split or None
    if train_images is not None and train_images < 1:
        raise DataError(f"train_images must be >= 1, got {train_images}")
    common = dict(image_size=size, in_chans=in_chans, aug=train_transform, val_split=val_split,
                  split=split, bad_images=bad_images, train_images=train_images)
    if data.kind == "wds":
        return _build_wds(data.path, **common, in_memory=in_memory)
    if data.kind == "folder":
        train, held_out, names = _folder_sources(data.path, in_chans)
    elif data.kind == "fashion-mnist":
        train, held_out, names = _fashion_mnist_sources()
    elif data.kind in ("pets", "flowers102"):
        train, held_out, names = _image_set_sources(data.kind, in_chans)
    else:
        train, held_out, names = _cifar_sources(data.kind)
    return _map_splits(spec, train, held_out, names, **common)


def class_key(name: str) -> str:
    """A class name as names are compared: lower case, letters and digits only. So a folder may spell a name that
    is no valid folder name as it can: "T-shirt/top" is matched by "T-shirt_top", "tshirt top" or "TShirtTop"."""
    return "".join(c for c in name.lower() if c.isalnum())


def match_classes(data_names: list[str], model_names, what: str) -> list[int] | None:
    """The model's class index of each of a dataset's classes, matched by name (`class_key`). A dataset whose class
    names are only numbers (shards without classes.json, folders 0..K-1) is matched by those numbers, with a printed
    note; None when the model has no names (matched by index). A DataError names the classes that do not match.
    `what` names the dataset in messages."""
    if model_names is None:
        return None
    if all(name.isdigit() for name in data_names):
        numbers = [int(name) for name in data_names]
        if max(numbers) >= len(model_names):
            raise DataError(f"{what}: class {max(numbers)} is beyond the model's {len(model_names)} classes")
        print(f"note: {what} names its classes by number only: class i is taken to be the model's class i "
              f"({', '.join(model_names[:3])}, ...)")
        return numbers
    keys = {class_key(name): i for i, name in enumerate(model_names)}
    unmatched = [name for name in data_names if class_key(name) not in keys]
    if unmatched:
        raise DataError(f"{what}: classes {unmatched[:6]}{'...' if len(unmatched) > 6 else ''} are not among the "
                        f"model's {len(model_names)} ({', '.join(model_names[:6])}{', ...' if len(model_names) > 6 else ''}); "
                        "names match ignoring case and punctuation")
    return [keys[class_key(name)] for name in data_names]


def build_eval(spec: str, *, image_size: tuple[int, int] | int, in_chans: int, split: str | None = None,
               val_split: float | None = None, bad_images: str = "error") -> tuple[Dataset | IterableDataset, str, list[str]]:
    """The set a spec names for evaluation, unaugmented: its val or test split (`split` picks one; `val_split`
    cuts one from its training data), else, when it has none, all of it (WebDataset shards, a folder of class
    folders). (dataset, split name, class names); the split name of a whole set is "all"."""
    splits = build(spec, image_size=image_size, in_chans=in_chans, train_transform=None, val_split=val_split,
                   bad_images=bad_images, split=split)
    if splits.eval is not None:
        return splits.eval, splits.eval_name, splits.class_names
    return splits.train, "all", splits.class_names


def _map_splits(spec: str, train: _TensorSource | _FileSource, held_out: dict, class_names: list[str], *,
                image_size, in_chans, aug, val_split, split, bad_images, train_images) -> Splits:
    train_tf, eval_tf = Transform(image_size, in_chans, aug), Transform(image_size, in_chans, None)
    train_idx, evaluation, eval_name = None, None, "none"
    if val_split:
        train_idx, val_idx = split_indices(len(train), val_split)
        if split in (None, "val"):
            evaluation, eval_name = MapDataset(train, eval_tf, val_idx, bad_images), "val"
    if evaluation is None:
        for name in [split] if split else ["val", "test"]:
            if name in held_out:
                evaluation, eval_name = MapDataset(held_out[name], eval_tf, None, bad_images), name
                break
        else:
            if split:
                hint = "; pass --val-split FRACTION" if split == "val" else ""
                raise DataError(f"{spec} has no {split} split{hint}")
    if train_images is not None:
        indices = train_idx if train_idx is not None else list(range(len(train)))
        if train_images > len(indices):
            raise DataError(f"{spec}: train_images {train_images} is more than the {len(indices)} training images")
        train_idx = subset_indices(indices, train_images)
    train_ds = MapDataset(train, train_tf, train_idx, bad_images)
    return Splits(train_ds, evaluation, eval_name, len(class_names), class_names, len(train_ds))


def read_idx(path: str | Path) -> np.ndarray:
    """An idx array (uint8 data, as in (Fashion-)MNIST) from a .gz file; DataError naming a bad file."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read idx file {path}: {one_line(exc)}") from exc
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{path}: not an idx file of uint8 data (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    expected = math.prod(dims)
    if len(raw) - 4 - 4 * ndim != expected:
        raise DataError(f"{path}: idx header says {dims} ({expected} bytes) but the file holds "
                        f"{len(raw) - 4 - 4 * ndim}")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist_sources():
    override = os.environ.get("VITLAB_FASHION_MNIST_DIR")
    root = Path(override or FASHION_MNIST_DIR)
    files = {s: [root / f for f in names] for s, names in FASHION_MNIST_FILES.items()}
    if all(p.is_file() for ps in files.values() for p in ps):
        sources = {}
        for part, (images_path, labels_path) in files.items():
            images, labels = read_idx(images_path), read_idx(labels_path)
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise DataError(f"{images_path}, {labels_path}: expected (N, H, W) images and N labels, "
                                f"got {images.shape} and {labels.shape}")
            if labels.size and labels.max() >= 10:
                raise DataError(f"{labels_path}: label {labels.max()} outside 0..9")
            sources[part] = _TensorSource(torch.from_numpy(images.copy())[:, None],
                                          torch.from_numpy(labels.astype(np.int64)))
        return sources["train"], {"test": sources["test"]}, list(FASHION_MNIST_CLASSES)
    if override:
        missing = [str(p) for ps in files.values() for p in ps if not p.is_file()]
        raise DataError(f"VITLAB_FASHION_MNIST_DIR={override} lacks {', '.join(missing)}")
    import torchvision.datasets
    parts = {train: _download("fashion-mnist", torchvision.datasets.FashionMNIST, train=train)
             for train in (True, False)}
    src = {train: _TensorSource(ds.data.to(torch.uint8)[:, None].contiguous(), torch.as_tensor(ds.targets))
           for train, ds in parts.items()}
    return src[True], {"test": src[False]}, list(FASHION_MNIST_CLASSES)


def _cifar_sources(kind: str):
    import torchvision.datasets
    cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
    parts = {train: _download(kind, cls, train=train) for train in (True, False)}
    src = {train: _TensorSource(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
                                torch.as_tensor(ds.targets, dtype=torch.int64))
           for train, ds in parts.items()}
    return src[True], {"test": src[False]}, list(parts[True].classes)


def _download(name: str, cls, **split):
    root = cache_dir() / name
    try:
        return cls(root=str(root), download=True, **split)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; torchvision raises RuntimeError on bad files
        raise DataError(f"could not download {name} into {root} ({one_line(exc)}); "
                        f"pass --data folder:PATH or wds:PATTERN") from exc


class _TorchvisionSource:
    """A torchvision image-file dataset (Pets, Flowers), its images read through its own __getitem__."""

    def __init__(self, dataset, name: str, in_chans: int):
        self.dataset, self.name, self.in_chans = dataset, name, in_chans
        labels = getattr(dataset, "_labels", None)  # the list torchvision reads from its split files
        self.labels = list(labels) if labels is not None else [dataset[j][1] for j in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, j: int) -> tuple[Tensor, int]:
        try:
            image, label = self.dataset[j]
            array = pil_to_array(image, self.in_chans)
        except Exception as exc:
            raise DataError(f"cannot read image {j} of {self.name}: {one_line(exc)}") from exc
        x = torch.from_numpy(array)
        return (x[None] if x.ndim == 2 else x.permute(2, 0, 1).contiguous()), int(label)


def _image_set_sources(kind: str, in_chans: int):
    """Oxford-IIIT Pet (train: trainval, eval: test) or Flowers 102 (train, val, test) from torchvision."""
    import torchvision.datasets
    if kind == "pets":
        cls, splits, train_split = torchvision.datasets.OxfordIIITPet, ("trainval", "test"), "trainval"
    else:
        cls, splits, train_split = torchvision.datasets.Flowers102, ("train", "val", "test"), "train"
    parts = {split: _TorchvisionSource(_download(kind, cls, split=split), f"{kind} {split}", in_chans)
             for split in splits}
    names = getattr(parts[train_split].dataset, "classes", None) or [str(i) for i in range(102)]
    return parts[train_split], {s: parts[s] for s in splits if s != train_split}, list(names)


def labels_of(dataset) -> np.ndarray | None:
    """The labels of a map-style set in its order, read without decoding an image; None for streams."""
    if not isinstance(dataset, MapDataset):
        return None
    source = dataset.source
    if isinstance(source, _TensorSource):
        labels = source.labels.numpy()
    elif isinstance(source, _FileSource):
        labels = np.array([label for _, label in source.samples], dtype=np.int64)
    elif isinstance(source, _TorchvisionSource):
        labels = np.asarray(source.labels, dtype=np.int64)
    else:
        return None
    return labels if dataset.indices is None else labels[np.asarray(dataset.indices, dtype=np.int64)]


def file_names_of(dataset) -> list[str] | None:
    """The file names (no directory) of an image-file set in its order; None when it has no files."""
    if isinstance(dataset, MapDataset) and isinstance(dataset.source, _FileSource):
        names = [os.path.basename(path) for path, _ in dataset.source.samples]
        return names if dataset.indices is None else [names[i] for i in dataset.indices]
    return None


def _folder_sources(path: str, in_chans: int):
    """An ImageFolder tree: PATH/train (else PATH itself) of class folders, held-out PATH/val and PATH/test with the
    same classes. A tree of only val/ or test/ is an evaluation set without training images."""
    from torchvision.datasets.folder import find_classes, make_dataset
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"folder:{path}: no such directory")
    has_train = (root / "train").is_dir()
    held = [name for name in ("val", "test") if (root / name).is_dir()]
    classes_dir = root / "train" if has_train else root / held[0] if held else root
    try:
        class_names, class_to_idx = find_classes(str(classes_dir))
        train = make_dataset(str(classes_dir), class_to_idx, extensions=IMAGE_EXTENSIONS) if has_train or not held else []
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"folder:{path}: {one_line(exc)}") from exc
    held_out = {}
    for name in held if has_train or held else ():
        directory = root / name
        extra = sorted(set(os.listdir(directory)) - set(class_names))
        extra = [e for e in extra if (directory / e).is_dir()]
        if extra:
            raise DataError(f"{directory}: classes {extra} are not in {classes_dir}")
        samples = make_dataset(str(directory), class_to_idx, extensions=IMAGE_EXTENSIONS, allow_empty=True)
        held_out[name] = _FileSource(samples, in_chans)
    return _FileSource(train, in_chans), held_out, class_names


def _build_wds(pattern: str, *, image_size, in_chans, aug, val_split, split, bad_images, train_images,
               in_memory) -> Splits:
    shards = expand_pattern(pattern)
    local = all("://" not in s and not s.startswith("pipe:") for s in shards)
    if local:
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise DataError(f"wds:{pattern}: no such shard {missing[0]}")
    classes_json = Path(shards[0]).parent / "classes.json" if local else None
    class_names = read_classes(classes_json) if classes_json and classes_json.is_file() else None
    counts, shard_keys = None, {}
    if train_images is not None and not local:
        raise DataError(f"wds:{pattern}: train_images needs local shards (their keys are read to choose the subset)")
    if local:  # once per build: tar headers only (and .cls members when there is no classes.json)
        counts = {"train": {}, "val": {}, None: {}}
        max_label = -1
        for shard in shards:
            keys, labels = scan_shard(shard, want_labels=class_names is None)
            train_keys = [k for k in keys if not in_val_split(k, val_split)] if val_split else keys
            n_val = len(keys) - len(train_keys)
            counts[None][shard], counts["val"][shard], counts["train"][shard] = len(keys), n_val, len(train_keys)
            if train_images is not None:
                shard_keys[shard] = train_keys
            max_label = max([max_label, *labels])
        if class_names is None:
            class_names = [str(i) for i in range(max_label + 1)]
    if not class_names:
        raise DataError(f"wds:{pattern}: no classes.json beside the shards and no labels to count")
    if split == "test":
        raise DataError(f"wds:{pattern} has no test split")
    if split == "val" and not val_split:
        raise DataError(f"wds:{pattern} has no val split; pass --val-split FRACTION")
    common = dict(val_split=val_split, in_chans=in_chans, num_classes=len(class_names), bad_images=bad_images)
    train_subset = "train" if val_split else None
    train_counts, keep = counts and counts[train_subset], None
    if train_images is not None:
        available = sum(len(k) for k in shard_keys.values())
        if train_images > available:
            raise DataError(f"wds:{pattern}: train_images {train_images} is more than the {available} training images")
        keep = in_train_subset([k for keys in shard_keys.values() for k in keys], train_images)
        train_counts = {s: sum(k in keep for k in keys) for s, keys in shard_keys.items()}
    train = WdsDataset(shards, subset=train_subset, transform=Transform(image_size, in_chans, aug),
                       counts=train_counts, keys=keep, **common)
    evaluation = None
    if val_split:
        evaluation = WdsDataset(shards, subset="val", transform=Transform(image_size, in_chans, None),
                                counts=counts and counts["val"], **common)
    if in_memory is None:  # local shards whose decoded images fit
        size = sum(counts[None].values()) * in_chans * image_size[0] * image_size[1] if local else math.inf
        in_memory = size <= _IN_MEMORY_BYTES
    if in_memory and not local:
        raise DataError(f"wds:{pattern}: in_memory needs local shards")
    if in_memory:
        train = _in_memory(train, Transform(image_size, in_chans, aug), bad_images)
        if evaluation is not None:
            evaluation = _in_memory(evaluation, evaluation.transform, bad_images)
    return Splits(train, evaluation, "val" if evaluation is not None else "none", len(class_names),
                  class_names, len(train) if isinstance(train, MapDataset) else train.num_samples)


# Local shards whose images fit in this many bytes at the model's resolution are decoded once and held in memory
# (CIFAR-10's 50,000 at 32 px: 150 MB): an epoch then costs no decoding, the augmentation runs vectorised on whole
# batches as for the other in-memory sets, and a small training subset does not read every shard each epoch.
_IN_MEMORY_BYTES = 2 << 30


def _in_memory(stream: WdsDataset, transform: Transform, bad_images: str) -> MapDataset:
    """The samples of `stream` decoded once, resized to the model's resolution (no augmentation), in shard order:
    a map-style set that augments per (seed, epoch, index) as the other map-style sets do (with `transform`)."""
    plain = copy.copy(stream)
    plain.transform = Transform(transform.image_size, transform.in_chans, None)
    plain.configure(shuffle=False, rank=0, world_size=1, even=False)
    items = list(plain)
    if not items:
        raise DataError(f"every image of {stream.shards[0]}... ({stream.subset or 'all'}) is unreadable")
    images = torch.stack([image for image, _ in items])
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    dataset = MapDataset(_TensorSource(images, labels), transform, None, bad_images)
    dataset._skips = plain._skips  # the unreadable ones skipped while decoding
    return dataset


# ------------------------------------------------------------------------------------------- loader

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class Loader(DataLoader):
    """A DataLoader whose worker processes leave SIGINT and SIGTERM to the main process (`signals_to_main`, their
    init). They start with both signals blocked, so that one sent while a worker starts waits for its init instead
    of killing it (workers start with each epoch's loader)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("worker_init_fn", signals_to_main)
        super().__init__(*args, **kwargs)

    def __iter__(self):
        if self.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
            return super().__iter__()
        before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()  # starts the workers, which inherit this thread's signal mask
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)  # a signal that came meanwhile is delivered now


class _ResumedLoader(Loader):
    """A Loader over a stream that drops its first `start_batch` batches (they are read, then dropped)."""

    def __init__(self, *args, start_batch: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.start_batch = start_batch

    def __iter__(self):
        it = super().__iter__()
        done = object()  # not None: a batch whose images were all skipped collates to None
        for _ in range(self.start_batch):
            if next(it, done) is done:
                break
        return it


def signals_to_main(worker_id: int) -> None:
    """A DataLoader worker's init: SIGINT and SIGTERM are the main process's to act on. Ctrl-C in a terminal and a
    scheduler's SIGTERM (Slurm's, `kill -- -PGID`) reach the whole process group; the main process then finishes
    its step, which may still wait for a batch of this worker, saves, and shuts its loader down, which ends the
    worker. A worker that died of the signal (PyTorch's handler lets SIGTERM kill it), or returned on it as
    PyTorch's loop does on SIGINT, made the main process fail with a traceback instead. So the worker ignores both,
    but for a SIGTERM from its main process, which is how multiprocessing's exit clean-up ends live workers: then
    it exits at once, as PyTorch's handler does (ignoring that one too hung the interpreter's exit). A thread takes
    the signals with sigwaitinfo, which tells who sent them; a worker whose main process died ends by PyTorch's
    watchdog. Without sigwaitinfo (macOS), SIGTERM ends the worker as SIGINT does."""
    if not hasattr(signal, "sigwaitinfo"):
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # (already, when a Loader started this worker)
    threading.Thread(target=_take_signals, args=(os.getppid(),), name="vitlab-signals", daemon=True).start()


def _take_signals(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)


def make_loader(dataset: Dataset | IterableDataset, batch_size: int, *, shuffle: bool, seed: int, epoch: int,
                start_batch: int = 0, num_workers: int = 0, drop_last: bool = False, rank: int = 0,
                world_size: int = 1, collate_fn: Callable | None = None, even: bool = True,
                pin_memory: bool = False) -> Loader:
    """The DataLoader of one epoch for this rank, starting at batch `start_batch`.

    Map-style: the epoch order is a permutation seeded from (seed, epoch); each rank takes every
    world_size-th index (with `even`, padded by wrapping so all ranks have equal counts, as
    DistributedSampler; even=False for exact evaluation); the first start_batch batches are sliced off the
    index list, never loaded. Streams (wds): see WdsDataset; start_batch batches are read and discarded.
    The dataset is shallow-copied, so loaders of different epochs do not share the epoch setting.
    """
    dataset = copy.copy(dataset)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch, seed=seed)
    loader_args = dict(batch_size=batch_size, num_workers=num_workers, drop_last=drop_last,
                       collate_fn=collate_fn or collate, pin_memory=pin_memory,
                       # DataLoader draws its worker base seed from this, not from the caller's RNG
                       generator=torch.Generator().manual_seed(seed_int(seed, epoch, SALT_LOADER)))
    if isinstance(dataset, IterableDataset):
        if hasattr(dataset, "configure"):
            dataset.configure(shuffle=shuffle, rank=rank, world_size=world_size, even=even)
        return _ResumedLoader(dataset, start_batch=start_batch, **loader_args)
    n = len(dataset)
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed_int(seed, epoch, SALT_ORDER)))
    else:
        order = torch.arange(n)
    if world_size > 1:
        if even and n:
            total = math.ceil(n / world_size) * world_size
            order = order.repeat(math.ceil(total / n))[:total]
        order = order[rank::world_size]
    return Loader(dataset, sampler=order[start_batch * batch_size:].tolist(), **loader_args)
