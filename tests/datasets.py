"""Data fixtures made in the tests: a tiny Fashion-MNIST as idx files, an ImageFolder tree, WebDataset shards whose
samples name themselves (sample n is a solid image of value 4n), and the helpers that read them back."""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab import data
from vitlab.images import TrainAug

N_TRAIN = 40


N_TEST = 12


NO_AUG = TrainAug(crop="none", flip=False)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fmnist(tmp_path, monkeypatch):
    """A tiny Fashion-MNIST: random 28x28 images (all distinct), labels i % 10."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N_TRAIN + N_TEST, 28, 28), dtype=np.uint8)
    labels = np.arange(N_TRAIN + N_TEST) % 10
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images[:N_TRAIN])
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels[:N_TRAIN])
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images[N_TRAIN:])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[N_TRAIN:])
    monkeypatch.setenv("VITLAB_FASHION_MNIST_DIR", str(tmp_path))
    return tmp_path, torch.from_numpy(images[:N_TRAIN])[:, None], torch.from_numpy(images[N_TRAIN:])[:, None]


def fm(aug: TrainAug = NO_AUG, **kw) -> data.Splits:
    return data.build("fashion-mnist", image_size=kw.pop("image_size", (28, 28)), in_chans=kw.pop("in_chans", 1),
                      train_transform=aug, **kw)


def epoch(dataset, batch_size=8, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    kw = {"shuffle": True, "seed": 0, "epoch": 0, **kw}
    batches = list(data.make_loader(dataset, batch_size, **kw))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "PNG") if mode else Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def solid(value: int, size=(8, 8)) -> np.ndarray:
    """An RGB image whose every pixel is (value, 255 - value, 7): names its sample even after cropping."""
    a = np.empty((*size, 3), np.uint8)
    a[...] = (value, 255 - value, 7)
    return a


@pytest.fixture
def folder(tmp_path):
    """train/{cat,dog} with 40x30 RGB PNGs, val/{cat,dog}."""
    rng = np.random.default_rng(1)
    for split, n in (("train", 5), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png")
    return tmp_path


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_shards(root: Path, per_shard=30, shards=2, classes=True, bad: str | None = None) -> str:
    """Shards shard-000{0..}.tar of solid 8x8 PNGs: sample n has value 4n (unique), class n % 3."""
    root.mkdir(exist_ok=True)
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:04d}.tar", "w") as tar:
            for i in range(per_shard):
                n = s * per_shard + i
                key = f"s{s}_{i:03d}"
                add_member(tar, f"{key}.png", b"not an image" if key == bad else png(solid(4 * n)))
                add_member(tar, f"{key}.cls", str(n % 3).encode())
    if classes:
        (root / "classes.json").write_text(json.dumps(["a", "b", "c"]))
    return f"wds:{root}/shard-000{{0..{shards - 1}}}.tar"


def sample_number(image: torch.Tensor) -> int:
    return int(image[0, image.shape[1] // 2, image.shape[2] // 2]) // 4


def shard_splits(spec: str, aug: TrainAug = NO_AUG, **kw) -> data.Splits:
    """The splits of shards, streamed (in_memory=True holds them decoded instead)."""
    return data.build(spec, image_size=(8, 8), in_chans=3, train_transform=aug, **{"in_memory": False, **kw})


def numbers(dataset, **kw) -> list[int]:
    x, _ = epoch(dataset, shuffle=kw.pop("shuffle", False), **kw)
    return [sample_number(image) for image in x]


def index_of(images: torch.Tensor, reference: torch.Tensor) -> list[int]:
    flat = reference.flatten(1)
    return [int((flat == x.flatten()).all(1).nonzero()[0]) for x in images]


def write_cls_shards(root: Path, n: int = 40, seed: int = 5) -> str:
    """One shard of the tiny set's images (tests/tiny.py: class k lights block k) as grey PNGs, with Fashion-MNIST's
    class names in classes.json: a test set of the tiny model's classes. Returns the shard's path."""
    from tiny import blocks

    from vitlab.data import FASHION_MNIST_CLASSES

    root.mkdir(parents=True, exist_ok=True)
    images, labels = blocks(n, seed)
    with tarfile.open(root / "test-0000.tar", "w") as tar:
        for i, (image, label) in enumerate(zip(images, labels)):
            add_member(tar, f"t{i:04d}.png", png(image))
            add_member(tar, f"t{i:04d}.cls", str(int(label)).encode())
    (root / "classes.json").write_text(json.dumps(FASHION_MNIST_CLASSES))
    return str(root / "test-0000.tar")
