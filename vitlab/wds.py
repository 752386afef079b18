"""WebDataset shards: a stream of (image, label) read from tar files with members KEY.jpg|jpeg|png and KEY.cls,
split over processes and DataLoader workers, shuffled per (seed, epoch), a validation split cut by the KEY's hash.
"""

from __future__ import annotations

import json
import os
import random
import tarfile
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from .common import DataError, one_line
from .images import (
    SALT_BUFFER,
    SALT_SHARDS,
    SkipCounter,
    Transform,
    decode_image,
    in_val_split,
    key_id,
    sample_hashes,
    seed_int,
    skip_bad,
)

WDS_IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")


def expand_pattern(pattern: str) -> list[str]:
    """Shard paths of a brace pattern: /d/train-000{0..4}.tar -> five paths."""
    import braceexpand
    return list(braceexpand.braceexpand(pattern))

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
        self._skips = SkipCounter()

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
                raise DataError(f"cannot read shard {url}: {one_line(exc)}") from exc

    def __iter__(self) -> Iterator[tuple[Tensor, int]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        consumers, me = self.world_size * workers, self.rank * workers + worker
        shards = list(self.shards)
        if self.shuffle:
            random.Random(seed_int(self.seed, self.epoch, SALT_SHARDS)).shuffle(shards)
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
                              random.Random(seed_int(self.seed, self.epoch, SALT_BUFFER, me)))
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
                raise DataError(f"shard {url} key {key}: missing or bad .cls ({one_line(exc)})") from exc
            if not 0 <= label < self.num_classes:
                raise DataError(f"shard {url} key {key}: class {label} outside 0..{self.num_classes - 1}")
            image = decode_image(data, self.in_chans, name=f"{key} in shard {url}")
        except DataError as exc:
            return skip_bad(self, exc)
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


def scan_shard(path: str, want_labels: bool) -> tuple[list[str], list[int]]:
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
        raise DataError(f"cannot read shard {path}: {one_line(exc)}") from exc
    return keys, labels


def read_classes(path: Path) -> list[str]:
    """classes.json: a list of names in index order, or a dict {index: name} or {name: index}."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {one_line(exc)}") from exc
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

