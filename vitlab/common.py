"""What every part of vitlab shares: the error types, the config base class, atomic writes.

Nothing here imports torch, numpy or another vitlab module, so that the command line can build its parser (from
the config dataclasses) without paying for them.

Errors. Each user-facing error is one line that names the thing at fault; the command line prints it without a
traceback and exits 2:

    ConfigError       a configuration that cannot work: names the field and its value
    CheckpointError   a checkpoint that cannot be read or does not fit: names the file
    DataError         a data spec, file, shard or image that cannot be read: names it
    UserError         any other mistake the user can fix (a flag out of range, a path that is not a directory)

Configs (`Config`). vitlab's configs are plain dataclasses (`ViTConfig`, `ResNetConfig`, `TrainConfig`) whose
fields are checked in one way: each value is coerced to its field's type (so that a value from JSON, YAML or the
command line is read as the type says, and a wrong one is refused naming the field), then the class's `RULES`
table of range checks runs, then its `check()` for what involves several fields.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import types
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the field and its value."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


class DataError(ValueError):
    """A data spec, file, shard or image that cannot be read; the message names it."""

    def __init__(self, message: str):
        # A DataLoader worker re-raises as DataError("Caught DataError in DataLoader worker process N.\n
        # Original Traceback ...\nvitlab.common.DataError: <message>"); keep the one line the user needs.
        if message.startswith("Caught DataError") and "\nOriginal Traceback" in message:
            message = message.rstrip().splitlines()[-1].split("DataError: ", 1)[-1]
        super().__init__(message)


class UserError(Exception):
    """Any other mistake the user can fix; printed as one line, no traceback."""


USER_ERRORS = (ConfigError, CheckpointError, DataError, UserError)


def one_line(exc: BaseException) -> str:
    """An exception as `Type: first line of its message`."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------------------
# Configs: type-driven coercion, a rule table, and copies and JSON
# --------------------------------------------------------------------------------------------------------------


def type_name(hint) -> str:
    """How a field's type reads in an error message."""
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(hint) if a is not type(None)) + " or none"
    if get_origin(hint) is Literal:
        return " or ".join(repr(a) for a in get_args(hint))
    if get_origin(hint) is tuple:
        args = get_args(hint)
        if args[-1] is Ellipsis:
            return "a comma-separated list of numbers" if args[0] in (int, float) else "a list of strings"
        return "an int or a pair (A, B)" if len(args) == 2 else f"{len(args)} comma-separated values"
    return {bool: "true or false", int: "an int", float: "a number", str: "a string"}.get(hint, str(hint))


def literal_choices(hint) -> tuple:
    """The values of a Literal[...] type, or of the Literal in Literal[...] | None; () for other types."""
    for h in (hint, *get_args(hint)):
        if get_origin(h) is Literal:
            return get_args(h)
    return ()


def coerce(name: str, hint, value):
    """`value` (from Python, JSON, YAML or a command-line string) as the type `hint`; a ConfigError naming `name`.

    "none", "null" and "off" mean None where None is allowed; "true"/"yes"/"1" and "false"/"no"/"0" are bools;
    "224", "224x320", "2,9" and [224, 320] are tuples, and N alone means (N, N) for a pair.
    """
    origin, args = get_origin(hint), get_args(hint)
    text = isinstance(value, str)
    if origin in (Union, types.UnionType):  # X | None
        if value is None or text and value.lower() in ("none", "null", "off"):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(name, inner, value)
    try:
        if origin is Literal and value in args:
            return value
        if hint is bool:
            if isinstance(value, bool):
                return value
            if text and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
        if hint is int and not isinstance(value, bool):
            if isinstance(value, int) or text:
                return int(value)
            if isinstance(value, float) and value.is_integer():
                return int(value)
        if hint is float and not isinstance(value, bool):
            if isinstance(value, (int, float)) or text:
                return float(value)
        if hint is str and text:
            return value
        if origin is tuple:
            if text:
                parts = [p.strip() for p in value.replace("x", ",").split(",")] if args[0] is not str else [value]
            else:
                parts = list(value) if isinstance(value, (list, tuple)) else [value]
            if args[-1] is Ellipsis:
                return tuple(coerce(name, args[0], p) for p in parts)
            if len(parts) == 1:  # N means (N, N)
                parts = parts * len(args)
            if len(parts) == len(args):
                return tuple(coerce(name, a, p) for a, p in zip(args, parts))
    except (ValueError, TypeError, ConfigError):
        pass
    raise ConfigError(f"{name} must be {type_name(hint)}, got {value!r}")


# A rule: (field names separated by spaces, a predicate on a value that is not None, what the value must be).
Rule = tuple[str, Callable[[Any], bool], str]


class Config:
    """The base of vitlab's config dataclasses: checked on construction, copied with `replace`, saved as JSON.

    A subclass lists range checks in `RULES` and puts what involves several fields in `check()`. A class attribute
    `family` (BiT's "bit") is written into the JSON, so that a checkpoint's config.json says which model it holds.
    """

    family: ClassVar[str | None] = None
    RULES: ClassVar[tuple[Rule, ...]] = ()

    def __post_init__(self):
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(f.name, hints[f.name], getattr(self, f.name)))
        for names, ok, wanted in self.RULES:
            for name in names.split():
                value = getattr(self, name)
                if value is not None and not ok(value):  # (NaN fails every test)
                    raise ConfigError(f"{name} must be {wanted}, got {value!r}")
        self.check()

    def check(self) -> None:
        """Checks of several fields at once, and defaults that depend on other fields."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **changes):
        """A copy with some fields changed, checked again."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ConfigError(f"unknown {type(self).__name__} field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = {"family": self.family} if self.family else {}
        for key, value in dataclasses.asdict(self).items():
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict):
        if not isinstance(data, dict):
            raise ConfigError(f"a {cls.__name__} must be a JSON object, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k != "family" or not cls.family}
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**data)


def positive(v) -> bool:
    return v >= 1


def check_inputs_and_classes(cfg) -> None:
    """Check and fill in the fields every model config shares: the input normalisation per channel (None: 0.5,
    images in [-1, 1]) and the class names."""
    for field in ("mean", "std"):
        value = getattr(cfg, field)
        value = (0.5,) * cfg.in_chans if value is None else value
        if len(value) != cfg.in_chans:
            raise ConfigError(f"{field} has {len(value)} values for in_chans {cfg.in_chans}: {value}")
        setattr(cfg, field, value)
    if any(s <= 0 for s in cfg.std):
        raise ConfigError(f"std must be > 0, got {cfg.std}")
    if cfg.class_names is not None and cfg.num_classes and len(cfg.class_names) != cfg.num_classes:
        raise ConfigError(f"class_names has {len(cfg.class_names)} names for num_classes {cfg.num_classes}")


# --------------------------------------------------------------------------------------------------------------
# Atomic writes: a process killed at any moment leaves either the old file or the new one, never half of one.
# --------------------------------------------------------------------------------------------------------------


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call `write(tmp_path)`, flush it to disk, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file owner-only; a checkpoint is an ordinary file
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


# --------------------------------------------------------------------------------------------------------------
# The allocator
# --------------------------------------------------------------------------------------------------------------


def tune_allocator() -> None:
    """Tell glibc's malloc to keep the memory a training step frees instead of handing it back to the system, so
    that the next step does not fault it in again: large blocks from the heap (mmap threshold 32 MiB), no trimming
    below 1 GiB, and 512 MiB of padding when the heap grows. Measured on a machine of this project's kind, a bare
    demo step ran 1,207-1,274 img/s so against 998-1,021 without; on the other kind it changes nothing measurable.
    Called by the `vitlab` command before torch is imported; what the user sets (MALLOC_*_ variables) wins."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...)
        return
    settings = {"MALLOC_MMAP_THRESHOLD_": (-3, 32 << 20), "MALLOC_TRIM_THRESHOLD_": (-1, 1 << 30),
                "MALLOC_TOP_PAD_": (-2, 512 << 20)}  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD
    for variable, (option, value) in settings.items():
        if variable not in os.environ:
            libc.mallopt(option, value)

