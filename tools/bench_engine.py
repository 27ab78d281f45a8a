"""Benchmark of the engine: train-step time, voxels/s and compile time; 15-subset evaluation per case.

    python3 tools/bench_engine.py                       # 64^3 and 128^3, batch 2, float32
    python3 tools/bench_engine.py --sizes 64 --batch 1 --dtype bfloat16 --json out.json
    python3 tools/bench_engine.py --eval-shape 144 176 144   # a brain-cropped BraTS case

The model is the baseline's full U-Net (METHODS.md section 2) on random
inputs. A train step is the engine's own jitted step (`engine.make_train_step`
with the baseline's loss and Adam); times are the median of `--repeats` after
one warm-up call, each call synchronised with `block_until_ready`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbrats import benchmark


def machine() -> str:
    info = benchmark.machine()
    return f"{info['cpu']} ({info['cpu_cores']} cores); {jax.device_count()} x {info['accelerator']} ({info['backend']}); jax {info['jax']}"


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(first call incl. compilation, median of the following calls) in seconds."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def bench_train_step(size: int, batch: int, dtype: str, repeats: int, conv_impl: str) -> dict:
    from jaxbrats.config import load_config
    from jaxbrats.engine import init_state, make_train_step
    from jaxbrats.methods import get_method

    config = load_config(None, [f"model.dtype='{dtype}'", f"model.conv_impl='{conv_impl}'"])
    method = get_method("baseline")(config)
    optimizers = {"model": optax.adam(3e-4)}
    graphdefs, state = init_state(method, "train", 0, optimizers)
    rng = np.random.default_rng(0)
    shape = (batch, size, size, size)
    batch_data = {
        "image": jnp.asarray(rng.normal(size=shape + (4,)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 4, shape), jnp.uint8),
        "valid": jnp.ones(shape, bool),
        "modality_mask": jnp.ones((batch, 1, 4), bool),
    }
    step_fn = make_train_step(method, "train", graphdefs, optimizers)
    jitted = jax.jit(step_fn, donate_argnums=0)
    holder = {"state": state}

    def call():
        holder["state"], metrics = jitted(holder["state"], batch_data)
        return metrics["loss"]

    t0 = time.perf_counter()
    compiled = jitted.lower(holder["state"], batch_data).compile()
    compile_s = time.perf_counter() - t0
    del compiled
    _, step_s = _timed(call, repeats)
    return {
        "what": "train_step", "size": [size] * 3, "batch": batch, "dtype": dtype, "conv_impl": conv_impl,
        "compile_s": round(compile_s, 3), "step_s": round(step_s, 4),
        "voxels_per_s": round(batch * size**3 / step_s), "traces": step_fn.traces,
    }


def bench_eval(shape, window: int, repeats: int, dtype: str) -> dict:
    from jaxbrats.config import load_config
    from jaxbrats.engine import init_state
    from jaxbrats.evaluation import make_case_program
    from jaxbrats.methods import get_method

    config = load_config(None, [f"model.dtype='{dtype}'", f"eval.window=[{window},{window},{window}]"])
    method = get_method("baseline")(config)
    graphdefs, state = init_state(method, "train", 0, {"model": optax.adam(1e-3)})
    program = make_case_program(method, graphdefs, config.eval)
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.normal(size=tuple(shape) + (4,)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, shape), jnp.uint8)
    valid = jnp.ones(shape, bool)
    first, per_case = _timed(lambda: program(state["models"], image, labels, valid), repeats)
    return {
        "what": "eval_15_subsets", "size": list(shape), "window": [window] * 3, "overlap": config.eval.overlap,
        "dtype": dtype, "first_call_s": round(first, 2), "per_case_s": round(per_case, 3), "traces": program.traces,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--conv-impl", choices=["auto", "native", "depth2d"], default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-shape", type=int, nargs=3, default=[128, 128, 128], help="padded case shape for the 15-subset evaluation")
    parser.add_argument("--eval-window", type=int, default=128)
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    result = {"device": machine(), "date": time.strftime("%Y-%m-%d"), "runs": []}
    print(result["device"])
    for size in args.sizes:
        row = bench_train_step(size, args.batch, args.dtype, args.repeats, args.conv_impl)
        result["runs"].append(row)
        print(f"train step {size}^3 x{args.batch} {args.dtype} ({row['conv_impl']}): {row['step_s'] * 1e3:.0f} ms, "
              f"{row['voxels_per_s'] / 1e6:.2f} Mvoxel/s, compile {row['compile_s']:.1f} s")
    if not args.no_eval:
        row = bench_eval(args.eval_shape, args.eval_window, max(args.repeats - 1, 1), args.dtype)
        result["runs"].append(row)
        print(f"evaluation of 15 subsets, case {tuple(args.eval_shape)}, window {args.eval_window}^3: "
              f"{row['per_case_s']:.1f} s per case (first call with compilation {row['first_call_s']:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
