"""One XLA compilation per train step and per evaluation, counted from JAX's own events, not from Python traces.

The counts come from `jax.monitoring`'s backend-compile events (named ``jit(<function>)``),
registered here, independently of the engine's own counter (`jaxbrats.runtime.compilation`).
JAX sends that event for a program compiled and for one loaded from the persistent compilation
cache, which the suite shares between its tests (tests/conftest.py): "once" is one program,
compiled or loaded. The last test starts cold, with caches of its own, and tells the two apart.
"""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, tiny_config
from helpers import TOKENS_2023, write_case
from jax import monitoring
from test_engine import RESUME

from jaxbrats import engine
from jaxbrats.data.cache import CacheDataset
from jaxbrats.data.preprocess import prepare_dataset
from jaxbrats.engine import trainer as trainer_module
from jaxbrats.evaluation.program import evaluate
from jaxbrats.inference.trained import load_trained

COMPILES = Counter()


def _count(event, duration, fun_name="", **_):
    if event == "/jax/core/compile/backend_compile_duration":
        COMPILES[fun_name] += 1


monitoring.register_event_duration_secs_listener(_count)


def test_the_train_step_compiles_once_over_changing_pipeline_batches(phantom_cache, tmp_path, monkeypatch):
    seen = []
    place = trainer_module.place_batch

    def spy(batch, mesh):
        seen.append({k: np.array(v) for k, v in batch.items() if k in ("image", "crop_start", "modality_mask")})
        return place(batch, mesh)

    monkeypatch.setattr(trainer_module, "place_batch", spy)
    before = COMPILES["jit(train_step_train)"]
    trainer = engine.train(tiny_config(*RESUME), tmp_path, phantom_cache)  # dropout: the step's key matters
    assert COMPILES["jit(train_step_train)"] - before == 1
    assert sum(trainer.compilations["train"].values()) == 1  # compiled, or loaded from the suite's cache
    assert len(seen) == 6  # real batches from the Grain pipeline, all different
    assert len({b["image"].tobytes() for b in seen}) == 6
    assert len({b["crop_start"].tobytes() for b in seen}) > 1 and len({b["modality_mask"].tobytes() for b in seen}) > 1


def test_the_evaluation_compiles_once_over_cases_of_different_shapes(trained_run, tmp_path):
    data = tmp_path / "data"
    for i, shape in enumerate([(24, 24, 24), (20, 24, 16), (16, 18, 24)]):
        write_case(
            data / f"BraTS-GLI-0000{i}-000", sep="-", tokens=TOKENS_2023, convention="brats2023", seed=i, shape=shape
        )
    assert not prepare_dataset(data, tmp_path / "cache", workers=1, progress=False)["errors"]
    dataset = CacheDataset(tmp_path / "cache")
    assert len({tuple(m["cropped_shape"]) for m in dataset.manifests}) == 3
    method, graphdefs, models, config = load_trained(trained_run)
    before = COMPILES["jit(eval_15_subsets)"]
    evaluate(method, graphdefs, models, dataset, config.eval, tmp_path / "eval", predictions="none", progress=False)
    assert COMPILES["jit(eval_15_subsets)"] - before == 1
    settings = json.loads((tmp_path / "eval" / "eval_settings.json").read_text())
    assert settings["compilations"] + settings["loaded_from_cache"] == 1


def _train_in_a_new_process(phantom_cache, workdir, cache_dir):
    env = dict(
        os.environ,
        JAXBRATS_COMPILE_CACHE=str(cache_dir),
        PYTHONWARNINGS="ignore",
        # JAX stores only programs that took >= 1 s to compile; the tiny test model may compile faster.
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    config = workdir.parent / "tiny.toml"
    config.write_text('[method]\nname = "baseline"\n')
    sets = [a for s in TINY + ["stages.train.steps=1"] for a in ("--set", s)]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxbrats.cli",
            "train",
            "--config",
            str(config),
            "--workdir",
            str(workdir),
            "--data",
            str(phantom_cache),
            *sets,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if "train step" in line]


@pytest.mark.skipif(sys.platform == "win32", reason="the persistent compilation cache is POSIX-only here")
def test_a_second_process_loads_the_train_step_from_the_compilation_cache(phantom_cache, tmp_path):
    cache_dir = tmp_path / "xla"
    first = _train_in_a_new_process(phantom_cache, tmp_path / "a", cache_dir)
    assert len(first) == 1 and "train step compiled" in first[0], first
    assert any(Path(cache_dir).iterdir())
    second = _train_in_a_new_process(phantom_cache, tmp_path / "b", cache_dir)
    assert len(second) == 1 and "train step loaded from the compilation cache" in second[0], second
