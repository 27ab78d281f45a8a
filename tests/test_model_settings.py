"""Every model setting through the whole product: train a few steps, evaluate 15 subsets, predict a case.

Each setting is seen to act: remat, the convolutions' lowering and the compute dtype in the train
step's program (its jaxpr), deep supervision and the upsampling in the trained model's output.

The settings are combined (not a full product) so that each value appears at least once and the
riskiest pairs meet: remat with both convolution lowerings (the custom VJP of depth2d under
`jax.checkpoint`) and with bfloat16, deep supervision with both. A model trained with
`model.remat = true` used to fail evaluation and prediction with flax's TraceContextError
(networks.unet.run_block).
"""

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from jaxbrats.data.cache import CacheDataset
from jaxbrats.engine import trainer as trainer_module
from jaxbrats.engine.trainer import train
from jaxbrats.engine.workdir import load_splits
from jaxbrats.evaluation.program import evaluate
from jaxbrats.inference.predict import predict_case
from jaxbrats.inference.trained import load_trained
from jaxbrats.modalities import SUBSETS

SETTINGS = [
    pytest.param(
        {"remat": True, "dtype": "bfloat16", "upsample": "trilinear", "conv_impl": "native", "deep_supervision": False},
        id="remat-bf16-trilinear-native",
    ),
    pytest.param(
        {"remat": False, "dtype": "float32", "upsample": "nearest", "conv_impl": "depth2d", "deep_supervision": True},
        id="f32-nearest-depth2d-deep",
        marks=pytest.mark.slow,
    ),  # float32 and depth2d: what the other tests run
    pytest.param(
        {"remat": True, "dtype": "bfloat16", "upsample": "nearest", "conv_impl": "depth2d", "deep_supervision": True},
        id="remat-bf16-nearest-depth2d-deep",
    ),
]


@pytest.fixture(scope="module")
def raw_case(tmp_path_factory):
    """One raw phantom case folder (BraTS 2020 layout) with T1 and T2 missing, no label."""
    from jaxbrats.data.phantom import write_phantom

    raw = tmp_path_factory.mktemp("raw")
    write_phantom(raw, 1, (20, 24, 18), layout="brats2020", seed=9, workers=1)
    case = next(raw.iterdir())
    for f in case.iterdir():
        if f.name.endswith(("_t1.nii.gz", "_t2.nii.gz", "_seg.nii.gz")):
            f.unlink()
    return case


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (jit, remat, custom VJP, scan...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def _program(step_fn, state, batch, mesh) -> dict:
    """What the train step computes, from its jaxpr: remat, and its convolutions' spatial dims and dtypes."""
    with jax.set_mesh(mesh):
        eqns = list(_equations(jax.make_jaxpr(step_fn)(state, batch).jaxpr))
    convs = [e.invars[0].aval for e in eqns if e.primitive.name == "conv_general_dilated"]
    return {
        "remat": any(e.primitive.name in ("checkpoint", "remat", "remat2") for e in eqns),  # jax.checkpoint's
        "conv_impl": {5: "native", 4: "depth2d"}[max(a.ndim for a in convs)],  # 3D, or 2D over depth slices
        "dtype": {str(a.dtype) for a in convs},
    }


@pytest.mark.parametrize("settings", SETTINGS)
def test_train_evaluate_and_predict_with_every_model_setting(settings, phantom_cache, raw_case, tmp_path, monkeypatch):
    overrides = [
        f"model.{k}={str(v).lower() if isinstance(v, bool) else v}"
        for k, v in settings.items()
        if k != "deep_supervision"
    ]
    overrides.append(f"method.deep_supervision={str(settings['deep_supervision']).lower()}")
    programs, compile_step = [], trainer_module.compile_step

    def recording(step_fn, state, batch, mesh, families):
        programs.append(_program(step_fn, state, batch, mesh))
        return compile_step(step_fn, state, batch, mesh, families)

    monkeypatch.setattr(trainer_module, "compile_step", recording)
    workdir = tmp_path / "run"
    trainer = train(tiny_config("stages.train.steps=2", *overrides), workdir, phantom_cache)
    assert [step for _, step, _ in trainer.losses] == [1, 2] and all(np.isfinite(loss) for *_, loss in trainer.losses)
    # the settings changed the step's program: remat, the convolutions' lowering and dtype
    assert programs == [{k: settings[k] if k != "dtype" else {settings[k]} for k in ("remat", "conv_impl", "dtype")}]

    method, graphdefs, models, config = load_trained(workdir, overrides=["eval.hd95=false"])
    unet = nnx.merge(graphdefs["unet"], models["unet"])
    assert {k: getattr(unet.config, k) for k in settings} == settings  # the settings reached the model
    # and the model's output: deep-supervision heads, and another upsampling gives other logits
    image = jnp.asarray(np.random.default_rng(0).normal(size=(1, 16, 16, 16, 4)), jnp.float32)
    out = unet(image)
    assert len(out["deep"]) == (2 if settings["deep_supervision"] else 0)
    unet.decoder.upsample = "nearest" if settings["upsample"] == "trilinear" else "trilinear"
    assert not np.allclose(unet(image)["logits"], out["logits"], atol=1e-3)

    ids = load_splits(workdir, CacheDataset(phantom_cache))["test"][:1]
    summary = evaluate(
        method,
        graphdefs,
        models,
        CacheDataset(phantom_cache, ids),
        config.eval,
        tmp_path / "eval",
        predictions="none",
        progress=False,
    )
    assert len(summary["subsets"]) == len(SUBSETS) == 15
    assert all(np.isfinite(row["dice"][r]) for row in summary["subsets"] for r in ("WT", "TC", "ET"))

    info = predict_case(workdir, raw_case, tmp_path / "seg.nii.gz")
    assert info["present"] == ["flair", "t1ce"]
    written = nib.load(tmp_path / "seg.nii.gz")
    assert written.shape == nib.load(next(raw_case.glob("*_flair.nii.gz"))).shape
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 4}
