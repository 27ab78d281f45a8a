"""FLOPs of the 15-subset evaluation per window, from XLA's cost analysis of the lowered programs.

`window_flops` counts, for one window of `eval.window` (batch 1), the work the evaluation program
(`evaluation.program.make_case_program`) does per window for all the subsets the method serves, and
one subset's `Method.predict`. The per-window function is the program's own
(`inference.segment.subsets_window_scorer`), with its subset loop unrolled: XLA's cost analysis
counts a loop's body once. Counts come from the lowered program, not the compiled one: on GPU the
compiled program's cuDNN custom calls may report no FLOPs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbrats.config import EvalConfig
from jaxbrats.inference.segment import subsets_window_scorer
from jaxbrats.modalities import FULL_SUBSET_INDEX, MODALITIES, SUBSET_MASKS


def lowered_flops(fn, *args) -> float:
    """XLA's FLOP count of `fn` lowered for `args` (arrays or `jax.ShapeDtypeStruct`s)."""
    cost = jax.jit(fn).lower(*args).cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0]
    return float((cost or {}).get("flops", 0.0))


def window_flops(method, graphdefs: dict, models_state, cfg: EvalConfig) -> dict:
    """GFLOP per window of `cfg.window` (batch 1) of the evaluation, from XLA's cost analysis.

    "gflop_per_window": the 15-subset program's work per window (for a method with window
    features: them once, then `predict_from_features` of each served subset; otherwise each served
    subset's `predict`); "gflop_per_subset": one subset's `Method.predict` (the full set, or the
    first served subset); "gflop_shared": `window_features` alone (0 without); "subsets": how many
    are served; "ratio": per window / per subset (15 when nothing is shared); "necessary_gflop":
    the shared work once plus each served subset's own (`predict_from_features` counted directly).
    """
    served = np.asarray(method.served_subsets(), np.int32)
    masks, indices = jnp.asarray(SUBSET_MASKS[served]), jnp.asarray(served)
    one = FULL_SUBSET_INDEX if FULL_SUBSET_INDEX in served else int(served[0])
    window = jax.ShapeDtypeStruct((1, *cfg.window, len(MODALITIES)), jnp.float32)

    def merged(state):
        return {n: nnx.merge(g, state[n]) for n, g in graphdefs.items()}

    def per_window(state, x):  # what the program runs per window, its subset loop unrolled
        return subsets_window_scorer(method, merged(state), cfg, masks, indices, unroll=True)(x)

    def per_subset(state, x):
        return method.predict(merged(state), x, jnp.asarray(SUBSET_MASKS[one]), jnp.int32(one))

    def shared(state, x):
        return method.window_features(merged(state), x)

    features = jax.eval_shape(shared, models_state, window)
    shared_flops = 0.0 if features is None else lowered_flops(shared, models_state, window)
    subset_flops = lowered_flops(per_subset, models_state, window)
    if features is None:
        own = len(served) * subset_flops
    else:

        def own_work(state, f, x):  # each subset's part alone, given the features
            models = merged(state)
            return [method.predict_from_features(models, f, x, masks[i], indices[i]) for i in range(len(served))]

        own = lowered_flops(own_work, models_state, features, window)
    window_total = lowered_flops(per_window, models_state, window)
    return {
        "gflop_per_window": window_total / 1e9,
        "gflop_per_subset": subset_flops / 1e9,
        "gflop_shared": shared_flops / 1e9,
        "subsets": len(served),
        "ratio": window_total / subset_flops if subset_flops else float("nan"),
        "necessary_gflop": (shared_flops + own) / 1e9,
    }
