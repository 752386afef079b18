"""vitlab.data on fixtures made here (tests/datasets.py): Fashion-MNIST's idx files, splits, the deterministic loader,
ImageFolder trees, bad images, the torchvision sets without a network."""

from __future__ import annotations

import gzip
import signal
import subprocess
import sys
import time
import urllib.error
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from datasets import N_TEST, N_TRAIN, epoch, fm, fmnist, folder, index_of  # noqa: F401 (fixtures)
from PIL import Image
from tiny import subprocess_env

from vitlab import common, data, specs
from vitlab.common import DataError
from vitlab.images import TrainAug


def test_fashion_mnist_reads_the_idx_files(fmnist):
    _, train_images, test_images = fmnist
    splits = fm()
    assert (splits.num_classes, splits.train_size, splits.eval_name, len(splits.eval)) == (10, N_TRAIN, "test", N_TEST)
    assert splits.class_names[0] == "T-shirt/top" and splits.class_names[9] == "Ankle boot"
    image, label = splits.eval[5]
    assert image.dtype == torch.uint8 and torch.equal(image, test_images[5]) and label == (N_TRAIN + 5) % 10
    images, labels = epoch(splits.train, shuffle=False)
    assert torch.equal(images, train_images) and labels.tolist() == [i % 10 for i in range(N_TRAIN)]


def test_fashion_mnist_model_resolution_and_channels(fmnist):
    splits = fm(image_size=(56, 48), in_chans=3)
    image, _ = splits.eval[0]
    assert image.shape == (3, 56, 48) and image.dtype == torch.uint8
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    train_image, _ = splits.train[0]
    assert train_image.shape == (3, 56, 48)


@pytest.mark.parametrize("payload, gzipped", [(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", True),   # 2 of 5 labels
                                              (b"\x00\x00\x09\x01\x00\x00\x00\x01\x01", True),       # dtype 0x09
                                              (b"plain bytes, no gzip", False)])
def test_bad_idx_file_names_the_file(fmnist, payload, gzipped):
    path = fmnist[0] / "train-labels-idx1-ubyte.gz"
    if gzipped:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz") as err:
        fm()
    assert "\n" not in str(err.value)


def test_missing_override_dir_names_the_missing_files(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        fm()


def test_val_split_is_deterministic_and_disjoint(fmnist):
    _, train_images, _ = fmnist
    a, b = fm(val_split=0.25), fm(val_split=0.25)
    assert a.eval_name == "val" and len(a.eval) == 10 and a.train_size == 30
    assert a.eval.indices == b.eval.indices and a.train.indices == b.train.indices
    assert set(a.eval.indices).isdisjoint(a.train.indices)
    assert sorted(a.eval.indices + a.train.indices) == list(range(N_TRAIN))
    assert a.eval.indices != list(range(10))  # a permutation, not the head of the set
    # the cut does not depend on the training seed, and the eval half is not augmented
    val_images, _ = epoch(a.eval, shuffle=False, seed=123)
    assert torch.equal(val_images, train_images[a.eval.indices])
    # split="test" keeps the cut out of training but evaluates on the test set
    c = fm(val_split=0.25, split="test")
    assert c.eval_name == "test" and c.train_size == 30


def test_split_val_without_val_data_asks_for_val_split(fmnist):
    with pytest.raises(DataError, match="--val-split"):
        fm(split="val")


# -------------------------------------------------------------------------------------------- make_loader

def test_resume_mid_epoch_gives_the_tail_of_the_epoch(fmnist):
    train = fm(TrainAug()).train  # pad-crop + flip
    full_x, full_y = epoch(train, seed=3, epoch=2)
    loader = data.make_loader(train, 8, shuffle=True, seed=3, epoch=2, start_batch=2)
    assert len(loader) == N_TRAIN // 8 - 2
    tail_x, tail_y = torch.cat([b[0] for b in loader]), torch.cat([b[1] for b in loader])
    assert torch.equal(tail_x, full_x[16:]) and torch.equal(tail_y, full_y[16:])
    other_x, _ = epoch(train, seed=3, epoch=3)
    assert not torch.equal(other_x, full_x)


def test_resume_does_not_load_skipped_batches(fmnist):
    train = fm().train
    loader = data.make_loader(train, 8, shuffle=True, seed=0, epoch=0, start_batch=3)
    assert len(loader.sampler) == N_TRAIN - 24


def test_two_ranks_cover_the_epoch_disjointly(fmnist):
    _, train_images, _ = fmnist
    train = fm(val_split=0.125).train  # 35 samples: not a multiple of 2
    seen = []
    for rank in (0, 1):
        x, _ = epoch(train, batch_size=4, rank=rank, world_size=2, even=False, seed=5)
        seen.append(index_of(x, train_images))
    assert (len(seen[0]), len(seen[1])) == (18, 17)
    assert set(seen[0]).isdisjoint(seen[1]) and sorted(seen[0] + seen[1]) == sorted(train.indices)
    # even (the default) pads by wrapping, as DistributedSampler: equal counts, one sample twice
    padded = [index_of(epoch(train, batch_size=4, rank=r, world_size=2, seed=5)[0], train_images) for r in (0, 1)]
    assert len(padded[0]) == len(padded[1]) == 18 and set(padded[0] + padded[1]) == set(train.indices)


def test_loader_leaves_the_callers_rng_alone(fmnist):
    train = fm(TrainAug(crop="rrc", crop_scale=0.3, randaugment=(2, 9))).train
    torch.manual_seed(7)
    state = torch.get_rng_state()
    epoch(train)
    assert torch.equal(torch.get_rng_state(), state)


NUMBERED = [(torch.full((3, 4, 4), i, dtype=torch.uint8), i) for i in range(64)]  # 8 batches of 8, labelled in order


def _send(signum: int, pid: int) -> None:
    """Signal `pid` from another process than its parent, as a terminal's Ctrl-C or a scheduler's SIGTERM does."""
    subprocess.run(["kill", f"-{signal.Signals(signum).name[3:]}", str(pid)], check=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_loader_worker_leaves_a_signal_to_the_main_process(signum):
    """The worker goes on serving (the main process may still wait for a batch of it before it stops); PyTorch's
    own worker died of SIGTERM, or returned on SIGINT, and the main process failed: 'exited unexpectedly'."""
    it = iter(data.make_loader(NUMBERED, 8, shuffle=False, seed=0, epoch=0, num_workers=1))
    first, worker = next(it), it._workers[0]
    _send(signum, worker.pid)
    time.sleep(0.5)  # (the worker has taken the signal: only 2 of the 7 batches left were asked of it yet)
    labels = torch.cat([first[1], *(y for _, y in it)])
    assert labels.tolist() == list(range(64)) and worker.exitcode == 0  # ended by the loader's shut-down


def test_a_signal_while_a_worker_starts_waits_for_its_init(tmp_path):
    """Workers start with SIGINT and SIGTERM blocked (data.Loader): before, a SIGTERM that came before a worker's
    init had run killed it (a flaky test found that)."""
    started = tmp_path / "started"

    def slow_init(worker_id: int) -> None:  # (the worker is forked: a closure will do)
        started.touch()
        time.sleep(1.0)
        data.signals_to_main(worker_id)

    it = iter(data.Loader(NUMBERED, batch_size=8, num_workers=1, worker_init_fn=slow_init))
    deadline = time.monotonic() + 30
    while not started.exists():
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.01)
    _send(signal.SIGTERM, it._workers[0].pid)
    assert torch.cat([y for _, y in it]).tolist() == list(range(64))


def test_a_process_with_a_live_loader_worker_exits():
    """multiprocessing's exit clean-up terminates live DataLoader workers with SIGTERM, from their parent, and joins
    them: the worker must end on it. A first version of data.signals_to_main that ignored every SIGTERM hung here."""
    script = ("import torch; from vitlab.data import make_loader\n"
              "it = iter(make_loader([(torch.zeros(3, 4, 4, dtype=torch.uint8), 0)] * 64, 8, shuffle=False, seed=0,"
              " epoch=0, num_workers=1)); next(it)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env=subprocess_env())
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------- augmentation


# -------------------------------------------------------------------------------------------------- folder

def test_folder_train_and_val(folder):
    splits = data.build(f"folder:{folder}", image_size=(32, 32), in_chans=3, train_transform=TrainAug())
    assert (splits.class_names, splits.num_classes, splits.train_size) == (["cat", "dog"], 2, 10)
    assert splits.eval_name == "val" and len(splits.eval) == 4
    image, label = splits.eval[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label == 1
    x, y = epoch(splits.train, batch_size=4)
    assert x.shape == (10, 3, 32, 32) and sorted(y.tolist()) == [0] * 5 + [1] * 5
    with pytest.raises(DataError, match="no test split"):
        data.build(f"folder:{folder}", image_size=(32, 32), in_chans=3, train_transform=TrainAug(), split="test")


def test_folder_without_train_dir_is_the_training_set(folder):
    splits = data.build(f"folder:{folder / 'train'}", image_size=(16, 16), in_chans=1, train_transform=TrainAug())
    assert splits.train_size == 10 and splits.eval is None and splits.train[0][0].shape == (1, 16, 16)


def test_folder_val_with_unknown_class(folder):
    (folder / "val" / "cow").mkdir()
    with pytest.raises(DataError, match="cow"):
        data.build(f"folder:{folder}", image_size=(32, 32), in_chans=3, train_transform=TrainAug())


def test_folder_rrc_for_large_images_is_deterministic(folder):
    big = folder / "big"
    for cls in ("x", "y"):
        (big / cls).mkdir(parents=True)
        pixels = np.random.default_rng(2).integers(0, 256, (90, 100, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(big / cls / "0.png")
    splits = data.build(f"folder:{big}", image_size=(24, 24), in_chans=3, train_transform=TrainAug(randaugment=(2, 5)))
    assert splits.train.transform.crop_mode(90, 100) == "rrc"
    a, _ = epoch(splits.train, batch_size=2, seed=4)
    b, _ = epoch(splits.train, batch_size=2, seed=4)
    assert a.shape == (2, 3, 24, 24) and torch.equal(a, b)


def test_unreadable_image_error_and_skip(folder):
    bad = folder / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    kw = dict(image_size=(32, 32), in_chans=3, train_transform=TrainAug())
    splits = data.build(f"folder:{folder}", **kw)
    with pytest.raises(DataError, match="broken.png"):
        epoch(splits.train, batch_size=4)
    with pytest.raises(DataError, match="broken.png") as err:  # re-raised from a worker: still one line
        epoch(splits.train, batch_size=4, num_workers=1)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)

    splits = data.build(f"folder:{folder}", bad_images="skip", **kw)
    x, _ = epoch(splits.train, batch_size=4)
    assert len(x) == 10 and splits.train.skipped == 1
    x, _ = epoch(splits.train, batch_size=4, num_workers=1)  # counted in the worker, seen here
    assert len(x) == 10 and splits.train.skipped == 2
    assert data.collate([None, None]) is None


# -------------------------------------------------------------------------------------------- image kinds


# --------------------------------------------------------------------------------------------- WebDataset


def test_map_train_images_is_a_nested_subset(fmnist):
    small, large = fm(val_split=0.25, train_images=5), fm(val_split=0.25, train_images=9)
    assert (small.train_size, large.train_size) == (5, 9)
    assert set(small.train.indices) <= set(large.train.indices)
    assert not set(large.train.indices) & set(fm(val_split=0.25).eval.indices)


# ------------------------------------------------------------------------------------------------- cifar

@pytest.mark.parametrize("error", [URLError("[Errno -3] Temporary failure in name resolution"),
                                   OSError("Network is unreachable\nsecond line")])
def test_cifar_without_network_is_one_line(tmp_path, monkeypatch, error):
    class Offline:
        def __init__(self, *args, **kwargs):
            raise error

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    monkeypatch.setenv("VITLAB_CACHE_DIR", str(tmp_path))
    with pytest.raises(DataError) as err:
        data.build("cifar10", image_size=(32, 32), in_chans=3, train_transform=TrainAug())
    message = str(err.value)
    assert "\n" not in message and message.startswith("could not download cifar10")
    assert "folder:PATH" in message and "wds:PATTERN" in message and str(tmp_path) in message


# ---------------------------------------------------------------------------------------- batch helpers


class FakeFlowers:
    """torchvision's Flowers102 interface (split, _labels, classes, (PIL image, label) items), no download."""

    classes = [f"flower {i}" for i in range(102)]

    def __init__(self, root, split, download):
        n = {"train": 204, "val": 102, "test": 51}[split]
        self._labels = [i % 102 for i in range(n)]
        self.split = split

    def __len__(self):
        return len(self._labels)

    def __getitem__(self, i):
        return Image.new("RGB", (20 + i % 3, 24), (i % 256, 0, 0)), self._labels[i]


@pytest.mark.slow
def test_flowers_and_pets_specs(monkeypatch, tmp_path):
    import torchvision.datasets

    monkeypatch.setenv("VITLAB_CACHE_DIR", str(tmp_path))
    assert specs.parse_spec("Pets").kind == "pets" and specs.parse_spec("flowers102").kind == "flowers102"
    monkeypatch.setattr(torchvision.datasets, "Flowers102", FakeFlowers)
    splits = data.build("flowers102", image_size=(16, 16), in_chans=3, train_transform=None)
    assert (splits.num_classes, splits.train_size, splits.eval_name, len(splits.eval)) == (102, 204, "val", 102)
    assert splits.class_names[3] == "flower 3"
    image, label = splits.train[5]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and label == 5
    assert data.labels_of(splits.train).tolist() == [i % 102 for i in range(204)]
    assert len(data.build("flowers102", image_size=16, in_chans=1, train_transform=None, split="test").eval) == 51

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "OxfordIIITPet", offline)
    with pytest.raises(common.DataError) as error:
        data.build("pets", image_size=16, in_chans=3, train_transform=None)
    assert str(error.value).startswith("could not download pets into ") and "\n" not in str(error.value)
