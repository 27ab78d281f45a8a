"""Config schema: unknown keys, types, overrides; every shipped config loads."""

from pathlib import Path

import pytest

from jaxbrats.config import ConfigError, load_config, parse_override

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


def _write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_unknown_keys_are_named(tmp_path):
    path = _write(tmp_path, "[data]\ncrop_sise = [1, 2, 3]\n")
    with pytest.raises(ConfigError, match=r"c.toml: unknown key\(s\) data.crop_sise"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown key.*method.lambda_"):
        load_config(None, ["method.lambda_=0.1"])
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config(None, ["stages.pretrain.epochs=3"])
    with pytest.raises(ConfigError, match="unknown group"):
        load_config(None, ["stages.train.optimizers.disc.lr=1e-3"])


def test_types_and_values_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="data.batch_size must be int"):
        load_config(None, ["data.batch_size=2.5"])
    with pytest.raises(ConfigError, match="crop_size needs 3 values"):
        load_config(None, ["data.crop_size=[16,16]"])
    with pytest.raises(ConfigError, match="schedule must be one of"):
        load_config(None, ["stages.train.optimizers.model.schedule='linear'"])
    with pytest.raises(ConfigError, match="method.name 'm4ae'"):
        load_config(None, ["method.name='m4ae'"])
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[data\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_overrides_take_toml_values_or_strings():
    assert parse_override("data.crop_size=[8, 8, 8]") == (["data", "crop_size"], [8, 8, 8])
    assert parse_override("method.output=labels") == (["method", "output"], "labels")
    config = load_config(None, ["train.seed=3", "data.crop_size=[8,8,8]", "stages.train.optimizers.model.lr=1"])
    assert config.train.seed == 3 and config.data.crop_size == (8, 8, 8)
    assert config.stages["train"].optimizers["model"].lr == 1.0


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    load_config(path)


def test_the_demo_runs_the_phantom_config():
    from jaxbrats import demo

    shipped = load_config(Path(__file__).resolve().parents[1] / "configs" / "baseline_phantom.toml")
    assert demo.demo_config() == shipped
