"""Test-time mirroring (`eval.tta = "flips"`): each window's scores averaged over its 8 mirror images.

The mirrored scores equal the mean of 8 separate predictions of flipped windows, flipped back
(numpy), and commute with every flip; blended by the sliding window they equal the mean of 8
whole-case evaluations of the flipped case where the window grid is symmetric; the window-major
program (ACDIS) equals `segment` per subset with mirroring and compiles once; a window whose depth
is split over two devices ("space") mirrors as on one device.
"""

import dataclasses
import sys
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_on_cpu_devices, tiny_config
from flax import nnx
from jax import monitoring
from test_eval_sharing import built, case

from jaxbrats.config import ConfigError
from jaxbrats.evaluation.program import make_case_program, subset_evaluator
from jaxbrats.inference.segment import MIRRORS, plain_window_scorer, sliding_config, window_scorer
from jaxbrats.inference.windows import sliding_window
from jaxbrats.modalities import FULL_SUBSET_INDEX, SUBSET_MASKS, SUBSET_NAMES

COMPILES = Counter()


def _count(event, duration, fun_name="", **_):
    if event == "/jax/core/compile/backend_compile_duration":
        COMPILES[fun_name] += 1


monitoring.register_event_duration_secs_listener(_count)


def flip(array, axes, first: int = 1):
    """`array` flipped along the spatial axes `axes` ((3,) bool) that start at axis `first`."""
    return np.flip(array, tuple(first + int(k) for k in np.flatnonzero(axes)))


def mirrored_cfg(method):
    return dataclasses.replace(method.config.eval, tta="flips")


def scorers(method, graphdefs, cfg):
    """(one prediction, the mirrored one) of a window batch, full subset, jitted."""
    mask, subset = jnp.asarray(SUBSET_MASKS[FULL_SUBSET_INDEX]), jnp.int32(FULL_SUBSET_INDEX)

    def models(states):
        return {n: nnx.merge(g, states[n]) for n, g in graphdefs.items()}

    plain = jax.jit(lambda s, x: plain_window_scorer(method, models(s), cfg, mask, subset)(x))
    mirrored = jax.jit(lambda s, x: window_scorer(method, models(s), cfg, mask, subset)(x))
    return plain, mirrored


@pytest.mark.parametrize("average", ["probabilities", "logits"])
def test_mirroring_is_the_mean_of_eight_flipped_predictions(average):
    method, graphdefs, states = built("baseline", f"eval.average='{average}'")
    plain, mirrored = scorers(method, graphdefs, mirrored_cfg(method))
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 16, 4)).astype(np.float32)
    reference = np.mean([flip(np.asarray(plain(states, flip(x, axes))), axes) for axes in MIRRORS], axis=0)
    got = np.asarray(mirrored(states, x))
    np.testing.assert_allclose(got, reference, rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(plain(states, x)) - reference).max() > 1e-2  # the mirror images do differ
    for axes in MIRRORS[[1, 5, 7]]:  # the mean over the group commutes with each of its flips
        np.testing.assert_allclose(mirrored(states, flip(x, axes)), flip(got, axes), rtol=1e-5, atol=1e-6)


def test_the_sliding_window_blends_the_mirrored_scores():
    """A 24^3 case under 16^3 windows with overlap 0.5 (starts 0 and 8 on each axis) has a grid, and
    Gaussian weights, that every flip maps onto themselves, so blending each window's mean over its
    flips equals the mean of the blends of the 8 flipped cases."""
    method, graphdefs, states = built("baseline")
    cfg = mirrored_cfg(method)
    volume = np.random.default_rng(2).normal(size=(24, 24, 24, 4)).astype(np.float32)
    plain, mirrored = scorers(method, graphdefs, cfg)
    blend = jax.jit(
        lambda s, v, tta: sliding_window(lambda x: (mirrored if tta else plain)(s, x), v, sliding_config(cfg), 3),
        static_argnums=2,
    )
    reference = np.mean([flip(np.asarray(blend(states, flip(volume, axes, 0), False)), axes, 0) for axes in MIRRORS], 0)
    np.testing.assert_allclose(blend(states, volume, True), reference, rtol=1e-5, atol=1e-6)


def test_the_window_major_program_mirrors_as_segment_does_and_compiles_once():
    method, graphdefs, states = built("acdis", "eval.window_batch=1")
    cfg = mirrored_cfg(method)
    program = make_case_program(method, graphdefs, cfg)  # window-major: `segment_subsets`
    before = COMPILES["jit(eval_15_subsets)"]
    image, labels, valid, where = case(shape=(16, 14, 24), bucket=(16, 16, 24))  # 2 windows: cheap
    counts, predicted = program(states, image, labels, valid, where)
    one = jax.jit(subset_evaluator(method, graphdefs, cfg))  # `segment`: case-major, one subset
    for s in (0, 8, FULL_SUBSET_INDEX):
        c, p = one(states, image, labels, valid, jnp.asarray(SUBSET_MASKS[s]), jnp.int32(s), where)
        np.testing.assert_array_equal(predicted[s], p, err_msg=SUBSET_NAMES[s])
        np.testing.assert_array_equal(counts[s], c, err_msg=SUBSET_NAMES[s])
    program(states, *case(shape=(11, 16, 19), bucket=(16, 16, 24)))  # another shape, the same bucket
    assert COMPILES["jit(eval_15_subsets)"] - before == 1 and program.traces == 1


SPLIT_DEPTH = """
import dataclasses, sys
import jax, numpy as np
sys.path[:0] = [sys.argv[1], sys.argv[2]]  # tests/, and the package beside it
from test_tta import built, mirrored_cfg, scorers
from jaxbrats.runtime.sharding import OnMesh, eval_mesh
method, graphdefs, states = built("baseline", "eval.mesh={space = 2}")
cfg = mirrored_cfg(method)
_, mirrored = scorers(method, graphdefs, cfg)
x = np.random.default_rng(0).normal(size=(2, 16, 16, 16, 4)).astype(np.float32)
one = np.asarray(mirrored(states, x))
split = np.asarray(OnMesh(mirrored, eval_mesh(cfg))(states, x))
print(len(jax.devices()), float(np.abs(one - split).max()))
"""


def test_a_depth_split_window_mirrors_as_on_one_device():
    here = str(Path(__file__).resolve().parent)
    stdout = run_on_cpu_devices([sys.executable, "-c", SPLIT_DEPTH, here, str(Path(here).parent)], 2, timeout=300)
    devices, difference = stdout.split()[-2:]
    assert devices == "2" and float(difference) < 1e-5


def test_an_unknown_tta_is_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"^config: eval.tta must be one of \['none', 'flips'\], got 'mirror'$"):
        tiny_config("eval.tta='mirror'")
    assert tiny_config().eval.tta == "none" and tiny_config("eval.tta='flips'").eval.tta == "flips"
