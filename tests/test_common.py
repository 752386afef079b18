"""vitlab.common: the coercion every config field goes through, the config base class, atomic writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from vitlab.common import Config, ConfigError, atomic_write, atomic_write_text, coerce


@pytest.mark.parametrize("hint,value,expected", [
    (int, "12", 12), (int, 3.0, 3), (float, "1e-3", 1e-3), (float, 2, 2.0), (bool, "no", False), (bool, "1", True),
    (int | None, "none", None), (int | None, "off", None), (tuple[int, int], "16x24", (16, 24)),
    (tuple[int, int], 7, (7, 7)), (tuple[int, int], [3, 5], (3, 5)), (tuple[float, ...], "0.5,0.25", (0.5, 0.25)),
    (tuple[int, ...], [], ()), (tuple[str, ...], ["a", "b"], ("a", "b")), (Literal["a", "b"], "b", "b"),
])
def test_coerce_reads_values_as_their_type_says(hint, value, expected):
    assert coerce("f", hint, value) == expected and type(coerce("f", hint, value)) is type(expected)


@pytest.mark.parametrize("hint,value,message", [
    (int, True, "f must be an int, got True"), (int, "1.5", "f must be an int, got '1.5'"),
    (bool, "maybe", "f must be true or false"), (tuple[int, int], "1x2x3", "f must be an int or a pair (A, B)"),
    (Literal["a", "b"], "c", "f must be 'a' or 'b', got 'c'"), (str, 5, "f must be a string"),
])
def test_coerce_refuses_naming_the_field(hint, value, message):
    with pytest.raises(ConfigError) as error:
        coerce("f", hint, value)
    assert message in str(error.value)


@dataclass
class Example(Config):
    size: tuple[int, int] = (4, 4)
    rate: float = 0.5
    name: str | None = None
    RULES = (("rate", lambda v: 0 <= v < 1, "in [0, 1)"),)

    def check(self) -> None:
        if self.size[0] > 100:
            raise ConfigError(f"size {self.size} is too large")


def test_config_checks_types_then_rules_then_its_own_checks_and_round_trips():
    cfg = Example(size="8x6", rate="0.25")
    assert cfg.size == (8, 6) and cfg.rate == 0.25
    assert Example.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["size"] == [8, 6]
    assert cfg.replace(rate=0.0).rate == 0.0
    for bad, message in [(dict(rate=1.5), "rate must be in [0, 1), got 1.5"), (dict(size=200), "too large"),
                         (dict(rate=float("nan")), "rate must be in [0, 1)")]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            Example(**bad)
    with pytest.raises(ConfigError, match="unknown Example field"):
        Example.from_dict({"size": 4, "colour": "red"})
    with pytest.raises(ConfigError, match="unknown Example field"):
        cfg.replace(colour="red")


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "file.txt"
    atomic_write_text(path, "old")

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, failing)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["file.txt"]
