"""WebDataset shards: classes, the val split by key hash, nested training subsets, shuffling, resuming and ranks,
augmentation independent of workers, bad images named by shard and key."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import (  # noqa: F401 (fixtures)
    NO_AUG,
    epoch,
    fmnist,
    folder,
    numbers,
    sample_number,
    shard_splits,
    write_shards,
)

from vitlab import common, data
from vitlab.common import DataError
from vitlab.images import TrainAug, in_val_split


def test_wds_reads_shards_and_classes_json(tmp_path):
    splits = shard_splits(write_shards(tmp_path / "d"))
    assert (splits.num_classes, splits.class_names, splits.train_size, splits.eval) == (3, ["a", "b", "c"], 60, None)
    x, y = epoch(splits.train, batch_size=16, shuffle=False)
    assert x.shape == (60, 3, 8, 8) and x.dtype == torch.uint8
    assert [sample_number(i) for i in x] == list(range(60)) and y.tolist() == [n % 3 for n in range(60)]
    assert isinstance(splits.train, torch.utils.data.IterableDataset)


def test_wds_classes_counted_without_classes_json(tmp_path):
    assert shard_splits(write_shards(tmp_path / "d", classes=False)).num_classes == 3


def test_wds_classes_json_as_dict(tmp_path):
    spec = write_shards(tmp_path / "d")
    (tmp_path / "d" / "classes.json").write_text(json.dumps({"2": "c", "0": "a", "1": "b"}))
    assert shard_splits(spec).class_names == ["a", "b", "c"]


def test_wds_val_split_by_key_hash(tmp_path):
    spec = write_shards(tmp_path / "d")
    splits = shard_splits(spec, val_split=0.3)
    val, train = numbers(splits.eval), numbers(splits.train)
    assert splits.eval_name == "val" and set(val).isdisjoint(train) and sorted(val + train) == list(range(60))
    assert len(val) == splits.eval.num_samples and len(train) == splits.train_size
    keys = [f"s{n // 30}_{n % 30:03d}" for n in range(60)]
    assert val == [n for n, k in enumerate(keys) if in_val_split(k, 0.3)]
    # stable under shard order, seed and epoch
    reversed_order = shard_splits(spec.replace("{0..1}", "{1,0}"), val_split=0.3)
    assert sorted(numbers(reversed_order.eval, seed=9, epoch=4)) == val
    assert sorted(numbers(reversed_order.train, shuffle=True, seed=9)) == sorted(train)


def test_wds_train_images_is_a_nested_subset_outside_the_val_split(tmp_path):
    spec = write_shards(tmp_path / "d")
    full = shard_splits(spec, val_split=0.3)
    val = set(numbers(full.eval))
    small, large = shard_splits(spec, val_split=0.3, train_images=10), shard_splits(spec, val_split=0.3, train_images=25)
    assert small.train_size == 10 and large.train_size == 25
    a, b = numbers(small.train), numbers(large.train)
    assert len(a) == 10 and len(b) == 25 and set(a) <= set(b) and not set(b) & val
    assert numbers(small.eval) == numbers(full.eval)  # the val split is untouched
    with pytest.raises(common.DataError, match="more than the"):
        shard_splits(spec, val_split=0.3, train_images=len(numbers(full.train)) + 1)


def test_wds_shuffle_resume_and_ranks(tmp_path):
    train = shard_splits(write_shards(tmp_path / "d")).train
    full = numbers(train, shuffle=True, seed=2, epoch=1)
    assert sorted(full) == list(range(60)) and full != list(range(60))
    assert numbers(train, shuffle=True, seed=2, epoch=1) == full
    assert numbers(train, shuffle=True, seed=2, epoch=2) != full
    assert numbers(train, shuffle=True, seed=2, epoch=1, start_batch=3) == full[24:]
    ranks = [numbers(train, shuffle=True, rank=r, world_size=2, even=False) for r in (0, 1)]
    assert set(ranks[0]).isdisjoint(ranks[1]) and sorted(ranks[0] + ranks[1]) == list(range(60))
    # three consumers over two shards: sample round-robin; even cuts every rank to the same count
    ranks = [numbers(train, rank=r, world_size=3) for r in range(3)]
    assert [len(r) for r in ranks] == [20, 20, 20] and sorted(n for r in ranks for n in r) == list(range(60))


def test_wds_even_ranks_with_a_val_cut(tmp_path):
    splits = shard_splits(write_shards(tmp_path / "d"), val_split=0.3)
    counts = [len(numbers(splits.train, rank=r, world_size=4)) for r in range(4)]
    assert len(set(counts)) == 1 and counts[0] == splits.train_size // 4


def test_wds_augmentation_does_not_depend_on_worker_count(tmp_path):
    train = shard_splits(write_shards(tmp_path / "d"), TrainAug(crop="pad")).train
    by_sample = []
    for workers in (0, 1):
        x, _ = epoch(train, shuffle=True, seed=6, num_workers=workers)
        by_sample.append({sample_number(image): image for image in x})
    assert by_sample[0].keys() == set(range(60))
    assert all(torch.equal(by_sample[0][n], by_sample[1][n]) for n in range(60))
    assert any((image == 0).any() for image in by_sample[0].values())  # some crops show the zero padding


def test_wds_bad_image_names_shard_and_key(tmp_path):
    spec = write_shards(tmp_path / "d", bad="s1_004")
    with pytest.raises(DataError, match=r"s1_004.*shard-0001\.tar"):
        epoch(shard_splits(spec).train)
    splits = shard_splits(spec, bad_images="skip")
    assert len(numbers(splits.train)) == 59 and splits.train.skipped == 1


def test_wds_missing_shard(tmp_path):
    spec = write_shards(tmp_path / "d")
    with pytest.raises(DataError, match="shard-0002.tar"):
        shard_splits(spec.replace("{0..1}", "{0..2}"))


def test_local_shards_that_fit_are_held_in_memory_with_the_same_images(tmp_path):
    spec = write_shards(tmp_path / "d")
    held = data.build(spec, image_size=(8, 8), in_chans=3, train_transform=NO_AUG, val_split=0.3)
    streamed = shard_splits(spec, val_split=0.3)
    assert isinstance(held.train, data.MapDataset) and isinstance(held.eval, data.MapDataset)  # the default here
    assert held.train_size == streamed.train_size and len(held.eval) == streamed.eval.num_samples
    assert sorted(numbers(held.train)) == sorted(numbers(streamed.train))
    assert numbers(held.eval) == numbers(streamed.eval)  # the same val cut, in shard order
    augmented = data.build(spec, image_size=(8, 8), in_chans=3, train_transform=TrainAug(crop="pad"))
    assert isinstance(augmented.train, data.MapDataset)
    x0, _ = epoch(augmented.train, seed=3)
    x1, _ = epoch(augmented.train, seed=3, num_workers=1)
    assert torch.equal(x0, x1) and (x0 == 0).any()  # augmented per sample, padding shows
