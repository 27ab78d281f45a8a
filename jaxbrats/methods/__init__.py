"""The methods, by the name used in a config's `[method] name`, and the config loader that
lets the named method check its own section (`jaxbrats.config` knows no method)."""

from __future__ import annotations

from jaxbrats.config import Config, parse_config, read_config
from jaxbrats.errors import ConfigError
from jaxbrats.methods.acdis import ACDIS
from jaxbrats.methods.base import Method, Update
from jaxbrats.methods.baseline import Baseline
from jaxbrats.methods.m3ae import M3AE
from jaxbrats.methods.mind_the_gap import MindTheGap
from jaxbrats.methods.rirn import RIRN

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (ACDIS, Baseline, M3AE, MindTheGap, RIRN)}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"method.name {name!r} is not one of {sorted(METHODS)}")
    return METHODS[name]


def check_method(config: Config, source: str) -> Config:
    """The method named in `config` checks its `[method]` keys and `[stages]`; errors name `source`."""
    try:
        get_method(config.method_name).check_config(config)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return config


def load_config(path=None, overrides=()) -> Config:
    """Read a TOML (or a saved JSON) config, apply `--set` overrides, check the schema and the method."""
    config, source = read_config(path, overrides)
    return check_method(config, source)


def config_from_data(data: dict, source: str = "config") -> Config:
    """Check parsed TOML data against the schema and the method; errors name `source`."""
    return check_method(parse_config(data, source), source)


__all__ = ["METHODS", "Method", "Update", "config_from_data", "get_method", "load_config"]
