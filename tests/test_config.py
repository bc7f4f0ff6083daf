"""core.config: dataclass configs from plain data, strict about keys, converting values as YAML gives them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from core.config import apply_overrides, from_dict, to_dict
from core.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    rate: float = 0.5
    mode: Literal["mean", "max"] = "mean"
    layers: tuple[int, ...] = (1, 2)

    def __post_init__(self) -> None:
        if not 0 <= self.rate <= 1:
            raise ConfigError(f"rate must be in [0, 1], got {self.rate}")


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    epochs: int = 3
    amp: bool = True
    language: str | None = None
    inner: Inner = field(default_factory=Inner)


def test_values_are_converted_as_yaml_and_overrides_give_them():
    cfg = from_dict(Outer, {"name": 123, "epochs": "7", "amp": "off", "inner": {"rate": 1, "layers": [3]}})
    assert cfg == Outer(name="123", epochs=7, amp=False, inner=Inner(rate=1.0, layers=(3,)))
    assert isinstance(cfg.inner.rate, float) and isinstance(cfg.inner.layers, tuple)
    assert from_dict(Outer, {"epochs": 4.0}).epochs == 4
    assert from_dict(Outer, to_dict(cfg)) == cfg
    assert apply_overrides(cfg, ["inner.mode=max", "language=en"]) == Outer(
        name="123", epochs=7, amp=False, language="en", inner=Inner(rate=1.0, mode="max", layers=(3,)))


@pytest.mark.parametrize(("data", "message"), [
    ({"epoch": 3}, r"unknown key\(s\) \['epoch'\] for Outer; allowed: \['amp', 'epochs', 'inner', 'language'"),
    ({"inner": {"rates": 1}}, r"inner: unknown key\(s\) \['rates'\] for Inner"),
    ({"epochs": 2.5}, r"^epochs: .*integer"),
    ({"epochs": True}, r"^epochs: expected int, got True"),
    ({"amp": "maybe"}, r"^amp: .*boolean"),
    ({"inner": {"mode": "median"}}, r"^inner.mode: .*'mean' or 'max'"),
    ({"inner": {"layers": [1, "two"]}}, r"^inner.layers\[1\]: .*integer"),
    ({"inner": 3}, r"^inner: expected a mapping for Inner"),
    ({"inner": {"rate": 2}}, r"^inner: rate must be in \[0, 1\], got 2.0"),
])
def test_bad_keys_and_values_are_config_errors_naming_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_an_override_of_an_unknown_key_is_refused():
    with pytest.raises(ConfigError, match="unknown key 'inner.rat'"):
        apply_overrides(Outer(), ["inner.rat=0.1"])
