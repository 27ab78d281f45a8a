"""The install: the accelerator extras, the configs that ship in the wheel, and a config found by name
from any directory (`jaxbrats train --config baseline_phantom`)."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from jaxbrats.config import ConfigError, config_file, read_raw, shipped_configs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_shipped_config_is_found_by_name_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert len(CONFIGS) >= 14 and sorted(shipped_configs()) == [p.stem for p in CONFIGS]
    for path in CONFIGS:
        assert config_file(path.stem).resolve() == path.resolve()
        assert config_file(path.name).resolve() == path.resolve()
    assert read_raw("baseline_phantom")["method"]["name"] == "baseline"


def test_a_path_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "baseline_phantom.toml").write_text('[method]\nname = "m3ae"\n')
    assert read_raw("baseline_phantom.toml")["method"]["name"] == "m3ae"  # the file here
    assert read_raw("baseline_phantom")["method"]["name"] == "baseline"  # a bare name: the shipped one
    assert config_file(ROOT / "configs" / "rirn_phantom.toml") == ROOT / "configs" / "rirn_phantom.toml"


@pytest.mark.parametrize("text", ["baseline_phantomm", "nowhere/baseline_phantom.toml"])
def test_neither_a_file_nor_a_shipped_name_is_one_line_listing_the_names(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        config_file(text)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{text}: config file not found, nor a shipped config (shipped: ")
    assert all(p.stem in message for p in CONFIGS)


def test_a_missing_saved_config_is_not_replaced(tmp_path):
    with pytest.raises(ConfigError, match=r"config.json: config file not found$"):
        config_file(tmp_path / "config.json")


def test_extras_pull_jax_accelerator_builds():
    """`pip install ".[cuda]"` / `".[tpu]"` (README): the extras name JAX's own, which must exist."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert extras["cuda"] == ["jax[cuda12]>=0.10.2"]
    assert extras["cuda13"] == ["jax[cuda13]>=0.10.2"]
    assert extras["tpu"] == ["jax[tpu]>=0.10.2"]
    offered = set(importlib.metadata.metadata("jax").get_all("Provides-Extra"))
    assert {"cuda12", "cuda13", "tpu"} <= offered


def test_every_package_is_listed_for_the_wheel():
    """The packages are listed by hand (configs/ maps to jaxbrats.configs): a new one must be added."""
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "jaxbrats").rglob("__init__.py")} | {
        "jaxbrats.configs"
    }
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == found
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"jaxbrats.configs": "configs"}


def _setuptools_builds_offline() -> bool:
    try:  # a wheel without build isolation (no download): setuptools >= 70.1 builds it alone
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    return tuple(int(part) for part in version.split(".")[:2]) >= (70, 1)


@pytest.mark.skipif(not _setuptools_builds_offline(), reason="needs setuptools >= 70.1 to build a wheel offline")
def test_the_wheel_ships_the_configs_and_finds_them_by_name(tmp_path):
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "jaxbrats", source / "jaxbrats", ignore=skip)
    shutil.copytree(ROOT / "configs", source / "configs", ignore=skip)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("jaxbrats-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    assert {f"jaxbrats/configs/{p.name}" for p in CONFIGS} <= names
    published = (ROOT / "jaxbrats" / "evaluation" / "published").glob("*.json")  # the papers' tables
    assert {f"jaxbrats/evaluation/published/{p.name}" for p in published} <= names
    # installed: no checkout beside the package, run from a directory without configs/
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    code = "from jaxbrats.config import config_file; print(config_file('m3ae_phantom'))"
    found = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr[-2000:]
    assert Path(found.stdout.strip()) == tmp_path / "site" / "jaxbrats" / "configs" / "m3ae_phantom.toml"
