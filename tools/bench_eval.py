"""FLOPs and time of the 15-subset evaluation per method: what sharing window features saves.

    python3 tools/bench_eval.py --json eval.json
    python3 tools/bench_eval.py --window 32 --case 48 --set model.widths=[8,16,32,64] --methods acdis

For each method (Mind the Gap twice: serving its teacher, serving its students) on tiny random
models: XLA's cost analysis of the lowered per-window work (`evaluation.cost.window_flops`:
"gflop_per_window", the 15-subset program's work per window of `--window`^3, batch 1;
"gflop_per_subset", one subset's predict; their "ratio", 15 when nothing is shared), and the
median time per case of the compiled 15-subset program (`evaluation.program.make_case_program`)
on a random `--case`^3 case. On a tree without `evaluation.cost` (the code before window features)
the per-window work is the served subsets' predicts by construction: counted as that many times
one predict, with the same lowered cost analysis.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbrats.evaluation.program import make_case_program
from jaxbrats.methods import get_method, load_config
from jaxbrats.modalities import FULL_SUBSET_INDEX, SUBSET_MASKS

#: (label, method name, stage served, extra settings)
METHODS = {
    "baseline": ("baseline", None, []),
    "m3ae": ("m3ae", None, []),
    "rirn": ("rirn", None, []),
    "mtg_teacher": ("mind_the_gap", "teacher", []),
    "mtg_students": ("mind_the_gap", "students", []),
    "acdis": ("acdis", None, ["model.family_map='vmap'"]),
}
NARROW = ["model.widths=[8,16,32,64]", "model.blocks=[1,1,1,1]", "model.groups=8"]


def build(label: str, window: int, settings: list[str]):
    name, stage, extra = METHODS[label]
    overrides = [f"method.name='{name}'", f"eval.window=[{window},{window},{window}]"] + NARROW + extra + settings
    config = load_config(None, overrides)
    method = get_method(name)(config)
    stage = stage or method.stages[-1]
    method.serve(stage)
    models = method.init_models(stage, nnx.Rngs(0))
    keep = method.inference_models(stage) or tuple(models)
    split = {n: nnx.split(models[n]) for n in keep}
    return method, {n: g for n, (g, _) in split.items()}, {n: s for n, (_, s) in split.items()}, config


def flops(method, graphdefs, states, cfg) -> dict:
    try:
        from jaxbrats.evaluation.cost import window_flops
    except ImportError:  # the tree before window features: every subset runs the whole predict
        return predicts_flops(method, graphdefs, states, cfg)
    return {**window_flops(method, graphdefs, states, cfg), "counted": "window_flops"}


def predicts_flops(method, graphdefs, states, cfg) -> dict:
    served = method.served_subsets()
    one = FULL_SUBSET_INDEX if FULL_SUBSET_INDEX in served else served[0]
    window = jax.ShapeDtypeStruct((1, *cfg.window, 4), jnp.float32)

    def predict(state, x):
        models = {n: nnx.merge(g, state[n]) for n, g in graphdefs.items()}
        return method.predict(models, x, jnp.asarray(SUBSET_MASKS[one]), jnp.int32(one))

    cost = jax.jit(predict).lower(states, window).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    subset = float(cost["flops"]) / 1e9
    return {
        "gflop_per_window": len(served) * subset,
        "gflop_per_subset": subset,
        "gflop_shared": 0.0,
        "subsets": len(served),
        "ratio": float(len(served)),
        "necessary_gflop": None,
        "counted": f"{len(served)} x predict",
    }


def time_case(method, graphdefs, states, cfg, size: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(size, size, size, 4)).astype(np.float32)
    labels = rng.integers(0, 4, (size, size, size)).astype(np.uint8)
    valid = np.ones((size,) * 3, bool)
    case = {"shape": np.asarray((size,) * 3, np.int32), "box_start": np.zeros(3, np.int32)}
    program = make_case_program(method, graphdefs, cfg)
    t0 = time.perf_counter()
    jax.block_until_ready(program(states, image, labels, valid, case))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(program(states, image, labels, valid, case))
        times.append(time.perf_counter() - t0)
    return {"first_call_s": first, "s_per_case": statistics.median(times)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--case", type=int, default=48, help="edge of the timed case (0: no timing)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-flops", action="store_true", help="time only")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    rows, nan = [], float("nan")
    print(f"{'method':14s} {'GFLOP/window':>13s} {'GFLOP/subset':>13s} {'shared':>8s} {'ratio':>6s} {'s/case':>7s}")
    for label in args.methods:
        method, graphdefs, states, config = build(label, args.window, args.set)
        row = {"method": label, "window": args.window}
        if not args.no_flops:
            row.update(flops(method, graphdefs, states, config.eval))
        if args.case:
            row.update(case=args.case, **time_case(method, graphdefs, states, config.eval, args.case, args.repeats))
        rows.append(row)
        print(
            f"{label:14s} {row.get('gflop_per_window', nan):13.3f} {row.get('gflop_per_subset', nan):13.3f} "
            f"{row.get('gflop_shared', nan):8.3f} {row.get('ratio', nan):6.2f} {row.get('s_per_case', nan):7.2f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": jax.__version__, "settings": NARROW + args.set, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
