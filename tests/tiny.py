"""A tiny Fashion-MNIST-shaped set and a tiny ViT for the tests that train (test_train, test_rundir, test_evaluate,
...), and the helpers of those runs: flags, subprocesses, an uninterrupted reference run, weight comparisons.

Ten classes of 28x28 grey images, class k a bright 7x7 block at position k of a 4x4 grid over noise, written as the
four idx .gz files that VITLAB_FASHION_MNIST_DIR points `--data fashion-mnist` at: 512 training and 128 test
images. The model is 2 layers of width 32 on 16x16 inputs (patches of 4)."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vitlab import cli
from vitlab.config import TrainConfig
from vitlab.train import train

TINY = dict(
    data="fashion-mnist", model="vit-ti/4", hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, image_size=16,
    batch_size=32, num_workers=0, crop="none", flip=False, lr=3e-3, warmup=5,
)


def blocks(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images (n, 28, 28) uint8 and their labels: class k lights the 7x7 block k of a 4x4 grid."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, 28, 28))
    for image, k in zip(images, labels):
        r, c = divmod(int(k), 4)
        image[r * 7:(r + 1) * 7, c * 7:(c + 1) * 7] += 180
    return images.astype(np.uint8), labels


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(root: Path) -> Path:
    """The tiny set as Fashion-MNIST's four files in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    for part, n, seed in (("train", 512, 0), ("t10k", 128, 1)):
        images, labels = blocks(n, seed)
        write_idx(root / f"{part}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{part}-labels-idx1-ubyte.gz", labels)
    return root


@contextlib.contextmanager
def tiny_world(fashion_dir: Path):
    """`--data fashion-mnist` reads the tiny set, and torch runs one thread, as the tests' subprocesses do (float
    results then compare bit for bit across processes; two threads on a busy 2-core machine also run far slower)."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VITLAB_FASHION_MNIST_DIR", str(fashion_dir))
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def flags(fields: dict) -> list[str]:
    """The `vitlab train` flags of TrainConfig fields."""
    out = []
    for key, value in fields.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, str(value)]
    return out


# Fixtures of the modules that train on the tiny set, imported there: `from tiny import fashion_dir, world`.


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    """The tiny set's idx files, written once per test module."""
    return write_fashion_mnist(tmp_path_factory.mktemp("fashion-mnist"))


@pytest.fixture(autouse=True)
def world(fashion_dir):
    """Every test of the module runs with `--data fashion-mnist` pointing at the tiny set."""
    with tiny_world(fashion_dir):
        yield


# For bit-exact resumes: everything random on (dropout, mixup, pad-crop and flips), saved every 8 steps.
RANDOM = dict(TINY, epochs=3, dropout=0.1, mixup=0.2, crop="pad", flip=True, deterministic=True, save_every=8)


def subprocess_env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def vitlab_train(*args, **env):
    return subprocess.run([sys.executable, "-m", "vitlab", "train", *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(**env), timeout=120)


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, fashion_dir):
    """An uninterrupted RANDOM run: what every killed-and-resumed run must end with, bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with tiny_world(fashion_dir):
        train(TrainConfig(**RANDOM, out=str(out)))
    return out


def _one_line_error(capsys, argv, *fragments):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


CNN = {k: v for k, v in TINY.items() if k not in ("model", "hidden_size", "num_layers", "num_heads", "mlp_dim")}
