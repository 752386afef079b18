"""The --data specs, decoding, transforms and loaders.

A data spec is one string:

    fashion-mnist        the four idx .gz files of Fashion-MNIST (Debian's dataset-fashion-mnist, else downloaded)
    cifar10, cifar100    torchvision's copies, downloaded into the cache directory
    pets, flowers102     torchvision's Oxford-IIIT Pet (trainval / test) and Oxford Flowers 102 (train / val / test),
                         the paper's transfer datasets (Table 2), downloaded likewise
    folder:PATH          an ImageFolder tree: PATH/train (else PATH itself), eval from PATH/val or PATH/test
    wds:PATTERN          WebDataset tar shards KEY.jpg|jpeg|png + KEY.cls, e.g. /data/train-{0000..0004}.tar

`build` turns a spec into `Splits`. Every sample is `(image, label)` with `image` a uint8 tensor
(in_chans, H, W) already at the model resolution: uint8 is what crosses the DataLoader worker boundary, and
`normalize` turns a batch into float32 inside the training step.

Determinism. Resuming a run mid-epoch must reproduce the same batches bit for bit, so nothing here draws
from a random state that depends on the process or the worker that happens to run it:
- the order of an epoch is a permutation seeded from (seed, epoch) (`make_loader`);
- the augmentation of a sample is keyed by a 64-bit hash of (seed, epoch, sample id), where the sample id
  is its index in the source (map-style sets) or a hash of its KEY (WebDataset). Pad-crop offsets and flips
  are read off the hash's bits (which lets in-memory sets augment a whole batch in one vectorised op);
  RandomResizedCrop and RandAugment run with torch's CPU generator seeded from the hash, under a
  save/restore in the main process so the caller's RNG is untouched;
- validation splits cut from training data are a fixed permutation with seed 0 (map-style) or a hash of
  the KEY (WebDataset), independent of the training seed and of shard order.
A WebDataset stream's order does depend on the number of DataLoader workers (each reads its own part), and
resuming it reads and discards the batches before start_batch; map-style sets skip them unread.

Bad images. An unreadable image raises DataError naming the file (folder) or shard and key (wds). With
bad_images="skip" it is logged and counted in the dataset's `skipped` (summed over DataLoader workers
through shared memory): a stream leaves it out, a map-style set returns None for it and `collate` drops
the None, so that batch comes out one short.

Image modes (`decode_image`): grey, RGB, palette, CMYK, YCbCr and bilevel through PIL's conversions;
alpha (RGBA, LA, PA, palette or grey with a transparent colour) composited over black; 16-bit (I;16, I)
scaled by >> 8, so 65535 -> 255. RGB -> 1 channel is ITU-R 601-2 luma as PIL computes it.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import io
import json
import logging
import math
import os
import random
import struct
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

try:  # torchvision 0.29 deprecates its image codecs in favour of TorchCodec; PIL does all without them
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover
    decode_jpeg = None

log = logging.getLogger(__name__)

SPEC_FORMS = "fashion-mnist, cifar10, cifar100, pets, flowers102, folder:PATH, wds:PATTERN"
TORCHVISION_SETS = ("cifar10", "cifar100", "pets", "flowers102")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
WDS_IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
# Transparent pixels are composited over this grey level: the colour stored under alpha 0 is arbitrary, so
# dropping alpha (PIL's convert("RGB")) would feed the model whatever the encoder left there.
ALPHA_BACKGROUND = 0


class DataError(ValueError):
    """A user-facing, one-line error naming the spec, file, shard or key at fault."""

    def __init__(self, message: str):
        # A DataLoader worker re-raises as DataError("Caught DataError in DataLoader worker process N.\n
        # Original Traceback ...\nvitlab.data.DataError: <message>"); keep the one line the user needs.
        if message.startswith("Caught DataError") and "\nOriginal Traceback" in message:
            message = message.rstrip().splitlines()[-1].split("DataError: ", 1)[-1]
        super().__init__(message)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------- specs

@dataclass
class DataSpec:
    kind: str          # "fashion-mnist" | "cifar10" | "cifar100" | "pets" | "flowers102" | "folder" | "wds"
    path: str | None   # the directory (folder) or shard pattern (wds)


def parse_spec(spec: str) -> DataSpec:
    """Parse a --data string; DataError listing the valid forms if it is none of them."""
    name = spec.strip()
    if name.lower() in ("fashion-mnist", *TORCHVISION_SETS):
        return DataSpec(name.lower(), None)
    kind, sep, path = name.partition(":")
    if sep and kind in ("folder", "wds") and path:
        return DataSpec(kind, path)
    raise DataError(f"unknown data spec {spec!r}: expected one of {SPEC_FORMS}")


def cache_dir() -> Path:
    """Where downloads go: $VITLAB_CACHE_DIR, else $XDG_CACHE_HOME/vitlab, else ~/.cache/vitlab."""
    if os.environ.get("VITLAB_CACHE_DIR"):
        return Path(os.environ["VITLAB_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vitlab"


# -------------------------------------------------------------------------------------------- hashing
# splitmix64's finaliser (Steele, Lea & Flood 2014) on numpy uint64 arrays, which wrap on overflow by
# definition. Every sample's randomness is a pure function of (seed, epoch, sample id) through it.

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SALT_ORDER, _SALT_LOADER, _SALT_SHARDS, _SALT_BUFFER = 1, 2, 3, 4
_SALT_RRC, _SALT_RANDAUG = np.uint64(0xA5A5A5A5), np.uint64(0x5A5A5A5A00000000)


def _mix64(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_hashes(seed: int, epoch: int, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """64-bit hashes of (seed, epoch, id) for each id: the only source of a sample's augmentation."""
    h = _mix64(np.array([seed & (2**64 - 1)], dtype=np.uint64) + _GOLDEN)
    h = _mix64(h ^ (np.uint64(epoch & (2**64 - 1)) + _GOLDEN))
    return _mix64(h ^ (np.asarray(ids, dtype=np.uint64) + _GOLDEN))


def _seed_int(seed: int, epoch: int, *salts: int) -> int:
    """A scalar seed for one use (epoch order, shard order, shuffle buffer) of (seed, epoch)."""
    h = sample_hashes(seed, epoch, [0])
    for s in salts:
        h = _mix64(h ^ (np.uint64(s) + _GOLDEN))
    return int(h[0] >> np.uint64(1))


def _key_hash(key: str, person: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8, person=person).digest(), "little")


def key_id(key: str) -> int:
    """The sample id of a WebDataset KEY (its place in `sample_hashes`)."""
    return _key_hash(key, b"vitlab-id")


def in_val_split(key: str, fraction: float) -> bool:
    """Whether a WebDataset KEY falls in a val split of `fraction`: stable for any shard order or seed."""
    return _key_hash(key, b"vitlab-val") % 10000 < round(fraction * 10000)


def in_train_subset(keys: list[str], count: int) -> set[str]:
    """The `count` WebDataset KEYs of a training subset: those of smallest hash, so that a smaller subset lies
    inside every larger one (as the paper's nested JFT subsets), whatever the shard order."""
    return set(sorted(keys, key=lambda k: _key_hash(k, b"vitlab-subset"))[:count])


def subset_indices(indices: list[int], count: int) -> list[int]:
    """`count` of a map-style training split's indices: a prefix of a fixed permutation, so nested as above."""
    perm = torch.randperm(len(indices), generator=torch.Generator().manual_seed(1))[:count]
    return sorted(indices[i] for i in perm.tolist())


def split_indices(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """(train, val) indices of a map-style set: a fixed permutation (seed 0, not the training seed)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    n_val = round(fraction * n)
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


# ------------------------------------------------------------------------------------------- decoding

def decode_image(data: bytes | str | os.PathLike, in_chans: int, name: str | None = None) -> Tensor:
    """Decode an image file or byte string to uint8 (in_chans, H, W); DataError naming it if unreadable."""
    if not isinstance(data, bytes):
        name = name or str(data)
        try:
            data = Path(data).read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read image {name}: {_one_line(exc)}") from exc
    if data[:2] == b"\xff\xd8" and decode_jpeg is not None:
        # JPEG through torchvision's libjpeg-turbo: 26 us against PIL's 86 us for a 32x32 CIFAR image, and the
        # same pixels. Anything it cannot do (CMYK, errors) goes on to PIL, which names the error.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                x = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
        except RuntimeError:
            x = None
        if x is not None and x.shape[0] in (1, 3):  # CMYK (4) goes through PIL's conversion
            return _match_channels(x, in_chans)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            array = _pil_to_array(img, in_chans)
    except Exception as exc:  # anything a decoder raises on bad bytes: OSError, SyntaxError, bomb, ...
        raise DataError(f"cannot decode image {name or '<bytes>'}: {_one_line(exc)}") from exc
    x = torch.from_numpy(array)
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1).contiguous()


def _pil_to_array(img: Image.Image, in_chans: int) -> np.ndarray:
    """(H, W) for in_chans 1, (H, W, 3) for 3, uint8, from any PIL mode."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        # 16-bit samples (PNG/TIFF open as I;16, older Pillow and 32-bit TIFF as I) keep their high byte:
        # 65535 -> 255, so the full range maps to 8 bits instead of saturating at 255.
        a = np.asarray(img)
        if mode == "F":  # float images are taken to be on the 0..255 scale
            gray = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        else:
            gray = (np.clip(a.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return gray if in_chans == 1 else np.repeat(gray[..., None], 3, axis=-1)  # fresh, writable
    if "A" in img.getbands() or mode in ("RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")  # P/L/RGB with a transparent colour, LA, PA, RGBa
        background = Image.new("RGBA", rgba.size, (ALPHA_BACKGROUND,) * 3 + (255,))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    elif mode not in ("L", "RGB"):
        img = img.convert("RGB")  # CMYK, YCbCr, P, 1, HSV: PIL's conversions (pure cyan -> (0, 255, 255))
    return np.array(img.convert("L" if in_chans == 1 else "RGB"))


def _match_channels(x: Tensor, in_chans: int) -> Tensor:
    c = x.shape[-3]
    if c == in_chans:
        return x
    if c == 1 and in_chans == 3:
        return x.expand(*x.shape[:-3], 3, *x.shape[-2:]).contiguous()
    if c == 3 and in_chans == 1:  # PIL's convert("L"), ITU-R 601-2 luma in 16-bit fixed point
        r, g, b = x.to(torch.int32).unbind(-3)
        return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(-3)
    raise DataError(f"cannot convert a {c}-channel image to {in_chans} channels")


# ----------------------------------------------------------------------------------------- transforms

@dataclass
class TrainAug:
    """Per-sample training augmentation; mixup/cutmix are batch-level (`batch_mix`)."""
    crop: str = "auto"          # "rrc" | "pad" | "none" | "auto": "pad" for sources with side <= 64 px, else "rrc"
    crop_scale: float = 0.08    # RandomResizedCrop's lower area bound
    flip: bool = True
    randaugment: tuple[int, int] | None = None  # (num_ops, magnitude)
    pad_mode: str = "constant"  # "constant" (zeros, as in He et al. 2016 for CIFAR) | "reflect" | "replicate"

    def __post_init__(self):
        if self.crop not in ("auto", "rrc", "pad", "none"):
            raise DataError(f"unknown crop {self.crop!r}: expected auto, rrc, pad or none")
        if not 0 < self.crop_scale <= 1:
            raise DataError(f"crop scale must be in (0, 1], got {self.crop_scale}")
        if self.pad_mode not in ("constant", "reflect", "replicate"):
            raise DataError(f"unknown pad mode {self.pad_mode!r}: expected constant, reflect or replicate")
        if self.randaugment is not None:
            if len(self.randaugment) != 2:
                raise DataError(f"randaugment takes (num_ops, magnitude), got {self.randaugment!r}")
            self.randaugment = (int(self.randaugment[0]), int(self.randaugment[1]))


@contextlib.contextmanager
def _private_rng():
    """Leave the main process's CPU generator as it was; a DataLoader worker's may be reseeded freely."""
    if get_worker_info() is not None:
        yield
        return
    state = torch.default_generator.get_state()
    try:
        yield
    finally:
        torch.default_generator.set_state(state)


@contextlib.contextmanager
def _one_thread():
    """Run torch ops on one intra-op thread: batches of small images gain nothing from more, and on a
    loaded machine OpenMP's hand-off makes a (256, 1, 28, 28) pad 100x slower (measured: 24 ms vs 0.1 ms)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Transform:
    """uint8 images (B, C, H, W) or (C, H, W) at source size -> uint8 at `image_size` with `in_chans`.

    With `aug` (training) it needs each sample's hash from `sample_hashes`; without it (evaluation) it only
    resizes and converts channels.
    """

    def __init__(self, image_size: tuple[int, int], in_chans: int, aug: TrainAug | None = None):
        self.image_size, self.in_chans, self.aug = tuple(image_size), in_chans, aug
        if aug is not None:
            self._rrc = v2.RandomResizedCrop(self.image_size, scale=(aug.crop_scale, 1.0), antialias=True)
            self._randaug = v2.RandAugment(*aug.randaugment) if aug.randaugment else None

    def crop_mode(self, height: int, width: int) -> str:
        if self.aug is None:
            return "none"
        if self.aug.crop == "auto":
            return "pad" if max(height, width) <= 64 else "rrc"
        return self.aug.crop

    def __call__(self, x: Tensor, hashes: np.ndarray | None = None) -> Tensor:
        with _one_thread():
            return self._apply(x, hashes)

    def _apply(self, x: Tensor, hashes: np.ndarray | None) -> Tensor:
        if x.ndim == 3:
            return self._apply(x[None], None if hashes is None else np.asarray(hashes).reshape(1))[0]
        if self.aug is not None:
            if hashes is None or len(hashes) != len(x):
                raise ValueError("a training transform needs one sample hash per image")
            hashes = np.asarray(hashes, dtype=np.uint64)
            flips = ((hashes >> np.uint64(32)) & np.uint64(1)).astype(bool) & self.aug.flip
            if self.crop_mode(*x.shape[-2:]) == "rrc":
                x = self._seeded(self._rrc, x, hashes ^ _SALT_RRC)
                x = torch.where(torch.from_numpy(flips)[:, None, None, None], x.flip(-1), x)
            else:
                x = self._pad_crop_flip(x, hashes, flips)
        x = self._resize(x)
        if self.aug is not None and self._randaug is not None:
            x = self._seeded(self._randaug, x, hashes ^ _SALT_RANDAUG)
        return _match_channels(x, self.in_chans)

    def many(self, images: list[Tensor], hashes: np.ndarray | None = None) -> list[Tensor]:
        """Transform images of mixed sizes: one batched call per size."""
        groups: dict[tuple, list[int]] = {}
        for k, image in enumerate(images):
            groups.setdefault(tuple(image.shape), []).append(k)
        out: list[Tensor] = [None] * len(images)
        for ks in groups.values():
            batch = self(torch.stack([images[k] for k in ks]), None if hashes is None else hashes[ks])
            for k, image in zip(ks, batch.unbind(0)):
                out[k] = image
        return out

    def _resize(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) == self.image_size:
            return x
        return TF.resize(x, list(self.image_size), antialias=True)

    def _pad_crop_flip(self, x: Tensor, hashes: np.ndarray, flips: np.ndarray) -> Tensor:
        """Pad 4 px per 32 px of side, crop back to the source size, flip: vectorised over the batch."""
        b, _, h, w = x.shape
        pad_y, pad_x = (round(h / 8), round(w / 8)) if self.crop_mode(h, w) == "pad" else (0, 0)
        off_y = torch.from_numpy(((hashes & np.uint64(0xFFFF)) % np.uint64(2 * pad_y + 1)).astype(np.int64))
        off_x = torch.from_numpy((((hashes >> np.uint64(16)) & np.uint64(0xFFFF))
                                  % np.uint64(2 * pad_x + 1)).astype(np.int64))
        if pad_y or pad_x:
            x = torch.nn.functional.pad(x, (pad_x, pad_x, pad_y, pad_y), mode=self.aug.pad_mode)
        rows = off_y[:, None] + torch.arange(h)                                      # (B, H)
        cols = off_x[:, None] + torch.arange(w)                                      # (B, W)
        cols = torch.where(torch.from_numpy(flips)[:, None], cols.flip(1), cols)
        out = x.permute(0, 2, 3, 1)[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()                                  # (B, C, H, W)

    @staticmethod
    def _seeded(op: Callable[[Tensor], Tensor], x: Tensor, keys: np.ndarray) -> Tensor:
        seeds = _mix64(keys)
        with _private_rng():
            out = []
            for image, seed in zip(x, seeds):
                torch.default_generator.manual_seed(int(seed))
                out.append(op(image))
        return torch.stack(out)


def train_transform(aug: TrainAug, image_size: tuple[int, int], in_chans: int) -> Transform:
    """The training Transform: crop, flip, RandAugment, resize, channels; call it with sample hashes."""
    return Transform(image_size, in_chans, aug)


def eval_transform(image_size: tuple[int, int], in_chans: int) -> Transform:
    """Resize to image_size (if different) and convert to in_chans; deterministic."""
    return Transform(image_size, in_chans, None)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 images (B, C, H, W) -> float32 (x/255 - mean)/std, on x's device."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return (x.float() / 255 - mean_t) / std_t


def batch_mix(mixup: float, cutmix: float, num_classes: int) -> Callable[..., tuple[Tensor, Tensor]] | None:
    """MixUp / CutMix (one of the two per batch when both are on) as mix(images, labels, seed=None).

    It runs on the float batch after `normalize` (MixUp blends pixel values) and returns (images,
    soft targets (B, num_classes)). Its draws come from torch's CPU generator; pass `seed` (e.g. a hash of
    the run seed and the step) to draw from a private generator so a resumed run mixes identically.
    None when both alphas are 0.
    """
    ops = []
    if mixup > 0:
        ops.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        ops.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if not ops:
        return None
    op = ops[0] if len(ops) == 1 else v2.RandomChoice(ops)

    def mix(images: Tensor, labels: Tensor, seed: int | None = None) -> tuple[Tensor, Tensor]:
        if seed is None:
            return op(images, labels)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return op(images, labels)

    return mix


# ------------------------------------------------------------------------------------ map-style sets

class _SkipCounter:
    """Counts skipped bad images across DataLoader workers: one shared-memory slot per worker."""

    def __init__(self):
        self._slots = torch.zeros(65, dtype=torch.int64).share_memory_()

    def add(self):
        info = get_worker_info()
        self._slots[0 if info is None else 1 + info.id % 64] += 1

    @property
    def value(self) -> int:
        return int(self._slots.sum())


def _skip(dataset, exc: DataError) -> None:
    """An unreadable image: re-raised, or with bad_images="skip" counted in `dataset.skipped`, logged and dropped."""
    if dataset.bad_images != "skip":
        raise exc
    dataset._skips.add()
    log.warning("skipping %s", exc)
    return None


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
        self._skips = _SkipCounter()

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
            with _one_thread():
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
            return _skip(self, exc)


def collate(batch: list) -> Any:
    """default_collate without the None that skipped bad images leave; None if the whole batch was bad."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    with _one_thread():
        return default_collate(batch)


# ------------------------------------------------------------------------------------- WebDataset

class WdsDataset(IterableDataset):
    """Streams (image, label) from WebDataset shards, read with webdataset's tar iterators.

    Work split per epoch over C = world_size * num_workers consumers (rank, DataLoader worker): when the
    shard count is a multiple of C each consumer reads its own shards, otherwise every consumer reads all
    shards and keeps every C-th sample, so the shares never differ by more than one sample. With `even`
    (training) and world_size > 1 every consumer stops at the smallest share, so all ranks run the same
    number of steps. Shards are permuted per (seed, epoch) and samples pass a shuffle buffer seeded per
    (seed, epoch, consumer): the order depends on the worker count, the augmentation (keyed by the KEY)
    does not.
    """

    def __init__(self, shards: list[str], *, subset: str | None, val_split: float | None, transform: Transform,
                 in_chans: int, num_classes: int, bad_images: str = "error",
                 counts: dict[str, int] | None = None, shuffle_buffer: int = 2000, keys: set[str] | None = None):
        self.shards, self.subset, self.val_split, self.keys = shards, subset, val_split, keys
        self.transform, self.in_chans, self.num_classes, self.bad_images = transform, in_chans, num_classes, bad_images
        self.counts, self.shuffle_buffer = counts, shuffle_buffer
        self.seed, self.epoch, self.shuffle, self.rank, self.world_size, self.even = 0, 0, False, 0, 1, True
        self._skips = _SkipCounter()

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        self.epoch = epoch
        if seed is not None:
            self.seed = seed

    def configure(self, *, shuffle: bool, rank: int, world_size: int, even: bool) -> None:
        self.shuffle, self.rank, self.world_size, self.even = shuffle, rank, world_size, even

    @property
    def num_samples(self) -> int | None:
        return None if self.counts is None else sum(self.counts.values())

    @property
    def skipped(self) -> int:
        return self._skips.value

    def _keep(self, key: str) -> bool:
        if self.keys is not None:
            return key in self.keys
        if self.subset is None:
            return True
        return in_val_split(key, self.val_split) == (self.subset == "val")

    def _raw(self, shards: list[str]) -> Iterator[tuple[str, dict]]:
        import webdataset as wds
        for url in shards:
            try:
                for sample in wds.tariterators.tarfile_samples([dict(url=url)]):
                    if self._keep(sample["__key__"]):
                        yield url, sample
            except DataError:
                raise
            except Exception as exc:
                raise DataError(f"cannot read shard {url}: {_one_line(exc)}") from exc

    def __iter__(self) -> Iterator[tuple[Tensor, int]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        consumers, me = self.world_size * workers, self.rank * workers + worker
        shards = list(self.shards)
        if self.shuffle:
            random.Random(_seed_int(self.seed, self.epoch, _SALT_SHARDS)).shuffle(shards)
        by_shard = len(shards) % consumers == 0
        stream = self._raw(shards[me::consumers] if by_shard else shards)
        if not by_shard:
            stream = (s for p, s in enumerate(stream) if p % consumers == me)
        if self.even and self.world_size > 1 and self.counts is not None:
            if by_shard:
                share = min(sum(self.counts[s] for s in shards[k::consumers]) for k in range(consumers))
            else:
                share = sum(self.counts.values()) // consumers
            stream = islice(stream, share)
        if self.shuffle:
            stream = _shuffle(stream, self.shuffle_buffer,
                              random.Random(_seed_int(self.seed, self.epoch, _SALT_BUFFER, me)))
        while chunk := list(islice(stream, 64)):  # decode one by one, transform in batches
            loaded = [self._load(url, sample) for url, sample in chunk]
            keep = [k for k, item in enumerate(loaded) if item is not None]
            hashes = None
            if self.transform.aug is not None:
                hashes = sample_hashes(self.seed, self.epoch, [key_id(chunk[k][1]["__key__"]) for k in keep])
            images = self.transform.many([loaded[k][0] for k in keep], hashes)
            yield from ((image, loaded[k][1]) for k, image in zip(keep, images))

    def _load(self, url: str, sample: dict) -> tuple[Tensor, int] | None:
        key = sample["__key__"]
        try:
            data = next((sample[e] for e in WDS_IMAGE_MEMBERS if e in sample), None)
            if data is None:
                raise DataError(f"shard {url} key {key}: no .jpg/.jpeg/.png member")
            try:
                label = int(sample["cls"])
            except (KeyError, ValueError) as exc:
                raise DataError(f"shard {url} key {key}: missing or bad .cls ({_one_line(exc)})") from exc
            if not 0 <= label < self.num_classes:
                raise DataError(f"shard {url} key {key}: class {label} outside 0..{self.num_classes - 1}")
            image = decode_image(data, self.in_chans, name=f"{key} in shard {url}")
        except DataError as exc:
            return _skip(self, exc)
        return image, label


def _shuffle(stream: Iterator, size: int, rng: random.Random) -> Iterator:
    """A shuffle buffer of `size` items: each new item replaces a randomly chosen one that is yielded."""
    if size <= 1:
        yield from stream
        return
    buffer = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        k = rng.randrange(size)
        buffer[k], item = item, buffer[k]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def _scan_shard(path: str, want_labels: bool) -> tuple[list[str], list[int]]:
    """The sample KEYs of a local shard in order (tar headers only) and, if asked, the .cls labels."""
    # the same KEY rule as the streaming reader
    from webdataset.tariterators import base_plus_ext
    keys, labels = [], []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                key, ext = base_plus_ext(member.name) if member.isreg() else (None, None)
                if key is None or os.path.basename(member.name).startswith("__"):
                    continue
                if not keys or keys[-1] != key:
                    keys.append(key)
                if want_labels and ext.lower() == "cls":
                    labels.append(int(tar.extractfile(member).read()))
    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read shard {path}: {_one_line(exc)}") from exc
    return keys, labels


def _read_classes(path: Path) -> list[str]:
    """classes.json: a list of names in index order, or a dict {index: name} or {name: index}."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {_one_line(exc)}") from exc
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, dict) and value:
        try:
            if all(isinstance(v, int) for v in value.values()):  # {name: index}
                pairs = sorted((v, k) for k, v in value.items())
            else:                                               # {index: name}
                pairs = sorted((int(k), str(v)) for k, v in value.items())
        except ValueError:
            pairs = []
        if pairs and [i for i, _ in pairs] == list(range(len(pairs))):
            return [name for _, name in pairs]
    raise DataError(f"{path}: expected a JSON list of class names or a dict index -> name")


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
          train_images: int | None = None) -> Splits:
    """Datasets for a --data spec.

    train_transform None leaves the training split unaugmented, as evaluation sees it (frozen features for
    few-shot evaluation). val_split cuts a deterministic validation split from the training data. split picks
    the evaluation split: "val" (the cut, else the source's own val), "test" (the source's test), None (val if
    any, else test, else no evaluation). train_images keeps that many images of the training split (after the
    val cut), a fixed choice in which smaller subsets nest in larger ones (`in_train_subset`, `subset_indices`).
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
        return _build_wds(data.path, **common)
    if data.kind == "folder":
        train, held_out, names = _folder_sources(data.path, in_chans)
    elif data.kind == "fashion-mnist":
        train, held_out, names = _fashion_mnist_sources()
    elif data.kind in ("pets", "flowers102"):
        train, held_out, names = _image_set_sources(data.kind, in_chans)
    else:
        train, held_out, names = _cifar_sources(data.kind)
    return _map_splits(spec, train, held_out, names, **common)


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
        raise DataError(f"cannot read idx file {path}: {_one_line(exc)}") from exc
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
        raise DataError(f"could not download {name} into {root} ({_one_line(exc)}); "
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
            array = _pil_to_array(image, self.in_chans)
        except Exception as exc:
            raise DataError(f"cannot read image {j} of {self.name}: {_one_line(exc)}") from exc
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
    from torchvision.datasets.folder import find_classes, make_dataset
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"folder:{path}: no such directory")
    has_train = (root / "train").is_dir()
    train_dir = root / "train" if has_train else root
    try:
        class_names, class_to_idx = find_classes(str(train_dir))
        train = make_dataset(str(train_dir), class_to_idx, extensions=IMAGE_EXTENSIONS)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"folder:{path}: {_one_line(exc)}") from exc
    held_out = {}
    for name in ("val", "test") if has_train else ():
        directory = root / name
        if not directory.is_dir():
            continue
        extra = sorted(set(os.listdir(directory)) - set(class_names))
        extra = [e for e in extra if (directory / e).is_dir()]
        if extra:
            raise DataError(f"{directory}: classes {extra} are not in {train_dir}")
        samples = make_dataset(str(directory), class_to_idx, extensions=IMAGE_EXTENSIONS, allow_empty=True)
        held_out[name] = _FileSource(samples, in_chans)
    return _FileSource(train, in_chans), held_out, class_names


def expand_pattern(pattern: str) -> list[str]:
    """Shard paths of a brace pattern: /d/train-000{0..4}.tar -> five paths."""
    import braceexpand
    return list(braceexpand.braceexpand(pattern))


def _build_wds(pattern: str, *, image_size, in_chans, aug, val_split, split, bad_images, train_images) -> Splits:
    shards = expand_pattern(pattern)
    local = all("://" not in s and not s.startswith("pipe:") for s in shards)
    if local:
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise DataError(f"wds:{pattern}: no such shard {missing[0]}")
    classes_json = Path(shards[0]).parent / "classes.json" if local else None
    class_names = _read_classes(classes_json) if classes_json and classes_json.is_file() else None
    counts, shard_keys = None, {}
    if train_images is not None and not local:
        raise DataError(f"wds:{pattern}: train_images needs local shards (their keys are read to choose the subset)")
    if local:  # once per build: tar headers only (and .cls members when there is no classes.json)
        counts = {"train": {}, "val": {}, None: {}}
        max_label = -1
        for shard in shards:
            keys, labels = _scan_shard(shard, want_labels=class_names is None)
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
    if keep is not None and train_images * in_chans * image_size[0] * image_size[1] <= _IN_MEMORY_BYTES:
        train = _in_memory(train, Transform(image_size, in_chans, aug), bad_images)
    evaluation = None
    if val_split:
        evaluation = WdsDataset(shards, subset="val", transform=Transform(image_size, in_chans, None),
                                counts=counts and counts["val"], **common)
    return Splits(train, evaluation, "val" if evaluation is not None else "none", len(class_names),
                  class_names, len(train) if isinstance(train, MapDataset) else train.num_samples)


# A training subset of shards that fits in this many bytes at the model's resolution is decoded once and held in
# memory: a small subset would otherwise cost a read of every shard per (short) epoch.
_IN_MEMORY_BYTES = 2 << 30


def _in_memory(stream: WdsDataset, transform: Transform, bad_images: str) -> MapDataset:
    """The samples of `stream` decoded once, resized to the model's resolution (no augmentation), in shard order:
    a map-style set that augments per (seed, epoch, index) as the other map-style sets do."""
    plain = copy.copy(stream)
    plain.transform = Transform(transform.image_size, transform.in_chans, None)
    plain.configure(shuffle=False, rank=0, world_size=1, even=False)
    items = list(plain)
    if not items:
        raise DataError(f"every image of the {len(stream.keys)} chosen for training is unreadable")
    images = torch.stack([image for image, _ in items])
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    dataset = MapDataset(_TensorSource(images, labels), transform, None, bad_images)
    dataset._skips = plain._skips  # the unreadable ones skipped while decoding
    return dataset


# ------------------------------------------------------------------------------------------- loader

class _ResumedLoader(DataLoader):
    """A DataLoader over a stream that drops its first `start_batch` batches (they are read, then dropped)."""

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


def make_loader(dataset: Dataset | IterableDataset, batch_size: int, *, shuffle: bool, seed: int, epoch: int,
                start_batch: int = 0, num_workers: int = 0, drop_last: bool = False, rank: int = 0,
                world_size: int = 1, collate_fn: Callable | None = None, even: bool = True,
                pin_memory: bool = False) -> DataLoader:
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
                       generator=torch.Generator().manual_seed(_seed_int(seed, epoch, _SALT_LOADER)))
    if isinstance(dataset, IterableDataset):
        if hasattr(dataset, "configure"):
            dataset.configure(shuffle=shuffle, rank=rank, world_size=world_size, even=even)
        return _ResumedLoader(dataset, start_batch=start_batch, **loader_args)
    n = len(dataset)
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_seed_int(seed, epoch, _SALT_ORDER)))
    else:
        order = torch.arange(n)
    if world_size > 1:
        if even and n:
            total = math.ceil(n / world_size) * world_size
            order = order.repeat(math.ceil(total / n))[:total]
        order = order[rank::world_size]
    return DataLoader(dataset, sampler=order[start_batch * batch_size:].tolist(), **loader_args)
