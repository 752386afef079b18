"""The --data strings: every form parsed, an unknown one refused listing them all."""

from __future__ import annotations

import pytest

from vitlab import specs
from vitlab.common import DataError


def test_parse_spec_forms():
    assert specs.parse_spec("fashion-mnist") == specs.DataSpec("fashion-mnist", None)
    assert specs.parse_spec("CIFAR10") == specs.DataSpec("cifar10", None)
    assert specs.parse_spec("folder:/a/b") == specs.DataSpec("folder", "/a/b")
    assert specs.parse_spec("wds:/d/x-{0..3}.tar") == specs.DataSpec("wds", "/d/x-{0..3}.tar")


@pytest.mark.parametrize("spec", ["imagenet", "folder:", "tfds:cifar10", ""])
def test_unknown_spec_lists_the_forms(spec):
    with pytest.raises(DataError) as err:
        specs.parse_spec(spec)
    message = str(err.value)
    assert "\n" not in message and repr(spec) in message
    for form in ("fashion-mnist", "cifar10", "cifar100", "folder:PATH", "wds:PATTERN"):
        assert form in message
