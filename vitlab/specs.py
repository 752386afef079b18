"""The --data strings: the one list of the forms a data spec takes, their parsing, and the help text built from it.

Kept apart from vitlab.data (which imports torch and torchvision) so that the command line can describe and check
`--data` without importing them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .common import DataError

# name or prefix -> what it reads; `--data` help and error messages are built from this table.
SPECS = {
    "fashion-mnist": "the four idx .gz files of Fashion-MNIST (Debian's dataset-fashion-mnist, else downloaded)",
    "cifar10": "torchvision's CIFAR-10, downloaded into the cache directory",
    "cifar100": "torchvision's CIFAR-100, likewise",
    "pets": "torchvision's Oxford-IIIT Pet (trainval / test), a transfer dataset of the paper's Table 2",
    "flowers102": "torchvision's Oxford Flowers 102 (train / val / test), likewise",
    "folder:PATH": "an ImageFolder tree: PATH/train (else PATH itself), eval from PATH/val or PATH/test",
    "wds:PATTERN": "WebDataset tar shards KEY.jpg|jpeg|png + KEY.cls, e.g. /data/train-{0000..0004}.tar",
}
NAMED = tuple(k for k in SPECS if ":" not in k)
TORCHVISION_SETS = ("cifar10", "cifar100", "pets", "flowers102")
SPEC_FORMS = ", ".join(SPECS)


def spec_help(purpose: str = "the data") -> str:
    """The help of a `--data` flag: every form, from the one table."""
    return f"{purpose}: {', '.join(NAMED)}, folder:PATH or wds:PATTERN"


@dataclass
class DataSpec:
    kind: str          # "fashion-mnist" | "cifar10" | "cifar100" | "pets" | "flowers102" | "folder" | "wds"
    path: str | None   # the directory (folder) or shard pattern (wds)


def parse_spec(spec: str) -> DataSpec:
    """Parse a --data string; DataError listing the valid forms if it is none of them."""
    name = spec.strip()
    if name.lower() in NAMED:
        return DataSpec(name.lower(), None)
    kind, sep, path = name.partition(":")
    if sep and kind in ("folder", "wds") and path:
        return DataSpec(kind, path)
    raise DataError(f"unknown data spec {spec!r}: expected one of {SPEC_FORMS}")
