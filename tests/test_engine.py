"""The training engine: learning, one compilation, resume, the NaN guard, data parallelism."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from jaxbrats import engine
from jaxbrats.data.cache import CacheDataset
from jaxbrats.data.pipeline import PipelineConfig, make_loader
from jaxbrats.methods import get_method


def test_a_few_steps_lower_the_loss_on_one_batch_and_compile_once(phantom_cache):
    config = tiny_config()
    method = get_method("baseline")(config)
    optimizers = {"model": optax.adam(3e-3)}
    graphdefs, state = engine.init_state(method, "train", 0, optimizers)
    loader = make_loader(CacheDataset(phantom_cache), PipelineConfig(crop_size=(16, 16, 16), batch_size=2, foreground_oversample=1.0))
    batch = {k: jnp.asarray(v) for k, v in next(iter(loader)).items()}
    step_fn = engine.make_train_step(method, "train", graphdefs, optimizers)
    jitted = jax.jit(step_fn, donate_argnums=0)
    losses = []
    for _ in range(8):
        state, metrics = jitted(state, batch)
        losses.append(float(metrics["loss"]))
    assert step_fn.traces == 1
    assert losses[-1] < 0.8 * losses[0], losses
    assert int(state["step"]) == 8


def test_training_writes_checkpoints_logs_and_config(trained_run):
    assert sorted(p.name for p in (trained_run / "checkpoints" / "train").iterdir() if p.name.isdigit()) == ["2", "4"]
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert any("voxels_per_s" in r for r in rows)
    assert list((trained_run / "tensorboard").iterdir())
    saved = json.loads((trained_run / "config.json").read_text())
    assert saved["data"]["crop_size"] == [16, 16, 16] and saved["method"]["name"] == "baseline"


def test_resume_equals_an_uninterrupted_run(phantom_cache, tmp_path):
    config = tiny_config("stages.train.steps=6", "train.checkpoint_every=3")
    whole = engine.train(config, tmp_path / "whole", phantom_cache)
    first = engine.train(config, tmp_path / "split", phantom_cache, stop_after=3)
    assert [s for _, s, _ in first.losses] == [1, 2, 3]
    second = engine.train(config, tmp_path / "split", phantom_cache)
    assert [s for _, s, _ in second.losses] == [4, 5, 6]
    np.testing.assert_allclose([l for *_, l in first.losses + second.losses], [l for *_, l in whole.losses], rtol=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    again = engine.train(config, tmp_path / "split", phantom_cache)  # complete: nothing to do
    assert again.losses == []


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(phantom_cache, tmp_path, monkeypatch):
    original = engine.make_train_step

    def poisoned(*args):
        step_fn = original(*args)

        def step(state, batch):
            new, metrics = step_fn(state, batch)
            metrics["loss"] = jnp.where(state["step"] >= 3, jnp.nan, metrics["loss"])
            return new, metrics

        return step

    monkeypatch.setattr(engine, "make_train_step", poisoned)
    config = tiny_config("stages.train.steps=6")
    with pytest.raises(engine.TrainingDiverged, match=r"loss became nan at step 4.*Last good checkpoint: step 2"):
        engine.train(config, tmp_path / "run", phantom_cache)
    manager = engine.checkpoint_manager(tmp_path / "run", "train", create=False)
    assert manager.all_steps() == [2]


def test_eight_cpu_devices_give_the_loss_of_one(phantom_cache, tmp_path):
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        import jax
        from conftest import tiny_config
        from jaxbrats import engine
        assert jax.device_count() == 8
        losses = {{}}
        for n in (1, 8):
            config = tiny_config("data.batch_size=8", "data.split_ratios=[1.0,0.0,0.0]", "stages.train.steps=2", "train.data_parallel=%d" % n)
            trainer = engine.train(config, {str(tmp_path)!r} + "/dp%d" % n, {str(phantom_cache)!r})
            losses[n] = [l for *_, l in trainer.losses]
        print(json.dumps(losses))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = json.loads(out.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(losses["8"], losses["1"], rtol=1e-5)


def test_schedules():
    from jaxbrats.config import OptimizerConfig

    cosine = engine.make_schedule(OptimizerConfig(lr=1.0, schedule="cosine", warmup_steps=10), 110)
    assert float(cosine(0)) == 0.0 and float(cosine(10)) == pytest.approx(1.0) and float(cosine(110)) == pytest.approx(0.0, abs=1e-6)
    poly = engine.make_schedule(OptimizerConfig(lr=1.0, schedule="poly"), 100)
    assert float(poly(50)) == pytest.approx(0.5**0.9, rel=1e-5)


def test_a_model_can_have_its_own_learning_rate_in_a_group():
    """M3AE's x_sub: Adam's first step moves each parameter by its learning rate (constant schedule)."""
    from jaxbrats.config import OptimizerConfig

    cfg = OptimizerConfig(lr=1e-3, schedule="constant", model_lr={"x_sub": 5e-3}, clip_norm=10.0)
    optimizer = engine.make_optimizer(cfg, total_steps=10)
    params = {"unet": {"w": jnp.ones(3)}, "x_sub": {"image": jnp.ones((2, 2))}}
    grads = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    np.testing.assert_allclose(updates["unet"]["w"], -1e-3, rtol=1e-4)
    np.testing.assert_allclose(updates["x_sub"]["image"], -5e-3, rtol=1e-4)
    plain = engine.make_optimizer(OptimizerConfig(lr=1e-3, schedule="constant"), total_steps=10)
    np.testing.assert_allclose(plain.update(grads, plain.init(params), params)[0]["x_sub"]["image"], -1e-3, rtol=1e-4)


def test_model_lr_must_name_a_trained_model():
    from jaxbrats.config import ConfigError

    config = tiny_config("stages.train.optimizers.model.model_lr={x_sub=5e-3}")
    with pytest.raises(ConfigError, match="model_lr: x_sub not trained in this group"):
        engine.stage_optimizers(get_method("baseline")(config), "train", 10)
    with pytest.raises(ConfigError, match="model_lr.unet must be positive"):
        tiny_config("stages.train.optimizers.model.model_lr={unet=-1.0}")
