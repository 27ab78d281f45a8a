"""The 15-subset evaluation shares each window's subset-independent work (`Method.window_features`).

ACDIS (mono encoders + AFEB) and Mind the Gap's teacher (per-modality latents) encode each window
once for all subsets; their labels and Dice counts equal `segment`'s per subset (the subset-major
path), and XLA's count of the program's FLOPs per window falls below the issue's bounds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY
from flax import nnx

from jaxbrats.evaluation.cost import window_flops
from jaxbrats.evaluation.program import make_case_program, subset_evaluator
from jaxbrats.methods import get_method, load_config
from jaxbrats.modalities import SUBSET_MASKS, SUBSET_NAMES

NARROW = ["model.widths=[4,8]", "model.groups=4", "model.blocks=[1,1]", "eval.window=[16,16,16]", "eval.window_batch=2"]
ACDIS = ["method.name='acdis'", "model.family_map='vmap'"]
MTG = ["method.name='mind_the_gap'", "method.students=['t1ce','flair']"]
SETUPS = {
    "acdis": (ACDIS, "train"),
    "mtg_each": (MTG, "teacher"),
    "mtg_mean_latent": (MTG + ["method.teacher_inference='mean_latent'"], "teacher"),
    "mtg_students": (MTG, "students"),
}


def built(name, *extra):
    """(method serving the stage, graphdefs, states) of tiny random models of the inference models."""
    options, stage = SETUPS[name] if name in SETUPS else ([f"method.name='{name}'"], "train")
    settings = [s for s in TINY if not s.startswith("stages.")] + NARROW + options + list(extra)
    method = get_method(load_config(None, settings).method["name"])(load_config(None, settings))
    method.serve(stage)
    models = method.init_models(stage, nnx.Rngs(0))
    keep = method.inference_models(stage) or tuple(models)
    split = {n: nnx.split(models[n]) for n in keep}
    return method, {n: g for n, (g, _) in split.items()}, {n: s for n, (_, s) in split.items()}


def case(shape=(24, 20, 24), bucket=(24, 24, 24)):
    rng = np.random.default_rng(0)
    image = np.zeros(bucket + (4,), np.float32)
    image[: shape[0], : shape[1], : shape[2]] = rng.normal(size=shape + (4,))
    labels = np.zeros(bucket, np.uint8)
    labels[: shape[0], : shape[1], : shape[2]] = rng.integers(0, 4, shape)
    valid = np.zeros(bucket, bool)
    valid[: shape[0], : shape[1], : shape[2]] = True
    return image, labels, valid, {"shape": np.asarray(shape, np.int32), "box_start": np.zeros(3, np.int32)}


@pytest.mark.parametrize("name", ["acdis", "mtg_each", "mtg_mean_latent"])
def test_the_window_major_program_equals_segment_per_subset(name):
    method, graphdefs, states = built(name)
    image, labels, valid, where = case()
    counts, predicted = make_case_program(method, graphdefs, method.config.eval)(states, image, labels, valid, where)
    one = jax.jit(subset_evaluator(method, graphdefs, method.config.eval))  # `segment`, one subset at a time
    for s, mask in enumerate(SUBSET_MASKS):
        c, p = one(states, image, labels, valid, jnp.asarray(mask), jnp.int32(s), where)
        np.testing.assert_array_equal(predicted[s], p, err_msg=SUBSET_NAMES[s])
        np.testing.assert_array_equal(counts[s], c, err_msg=SUBSET_NAMES[s])
    assert len({np.asarray(p).tobytes() for p in predicted}) > 1  # the subsets do differ


@pytest.mark.parametrize("name", ["acdis", "mtg_each", "mtg_mean_latent"])
def test_predict_is_predict_from_the_window_features(name):
    method, graphdefs, states = built(name)
    models = {n: nnx.merge(g, states[n]) for n, g in graphdefs.items()}
    window = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 16, 16, 4)), jnp.float32)
    mask, subset = jnp.asarray(SUBSET_MASKS[3]), jnp.int32(3)
    direct = jax.jit(lambda w: method.predict(models, w, mask, subset))(window)
    features = jax.jit(lambda w: method.window_features(models, w))(window)
    split = jax.jit(lambda f, w: method.predict_from_features(models, f, w, mask, subset))(features, window)
    np.testing.assert_allclose(direct, split, rtol=1e-5, atol=1e-6)


def test_mind_the_gaps_students_share_nothing():
    method, graphdefs, states = built("mtg_students")
    models = {n: nnx.merge(g, states[n]) for n, g in graphdefs.items()}
    assert method.window_features(models, jnp.zeros((1, 16, 16, 16, 4))) is None
    flops = window_flops(method, graphdefs, states, method.config.eval)
    assert flops["subsets"] == 2 and flops["gflop_shared"] == 0 and abs(flops["ratio"] - 2) < 0.01


def test_a_method_that_fills_per_subset_cannot_share_window_features():
    method, graphdefs, states = built("acdis")

    class Filling(type(method)):
        def fill(self, models, image, modality_mask, case):
            return image * modality_mask

    method.__class__ = Filling
    image, labels, valid, where = case()
    with pytest.raises(TypeError, match="overrides both `fill` and `window_features`"):
        make_case_program(method, graphdefs, method.config.eval)(states, image, labels, valid, where)


@pytest.mark.parametrize("name,bound", [("baseline", None), ("acdis", 0.35 * 15), ("mtg_each", 0.7 * 15)])
def test_the_programs_flops_per_window(name, bound):
    method, graphdefs, states = built(name)
    flops = window_flops(method, graphdefs, states, method.config.eval)
    assert flops["subsets"] == 15
    if bound is None:  # nothing shared: 15 predicts
        assert flops["gflop_shared"] == 0 and abs(flops["ratio"] - 15) < 0.05
    else:
        assert 0 < flops["gflop_shared"] < flops["gflop_per_subset"] and flops["ratio"] <= bound
    assert flops["gflop_per_window"] <= 1.1 * flops["necessary_gflop"]
