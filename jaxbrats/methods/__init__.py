"""The methods, by the name used in a config's `[method] name`."""

from __future__ import annotations

from jaxbrats.config import ConfigError
from jaxbrats.methods.base import Method, Update
from jaxbrats.methods.baseline import Baseline
from jaxbrats.methods.m3ae import M3AE

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Baseline, M3AE)}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"method.name {name!r} is not one of {sorted(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "Method", "Update", "get_method"]
