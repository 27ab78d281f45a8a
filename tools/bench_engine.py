"""Benchmark of the engine: train-step time, voxels/s and compile time; 15-subset evaluation per case.

    python3 tools/bench_engine.py                       # 64^3 and 128^3, batch 2, float32
    python3 tools/bench_engine.py --sizes 64 --batch 1 --dtype bfloat16 --json out.json
    python3 tools/bench_engine.py --eval-shape 144 176 144   # a brain-cropped BraTS case
    python3 tools/bench_engine.py --method m3ae --sizes 64   # each M3AE stage's step, its evaluation
    python3 tools/bench_engine.py --method acdis --sizes 64 --no-eval --set model.family_map='"vmap"'
    python3 tools/bench_engine.py --method rirn --crop 160 192 128 --batch 1 --dtype bfloat16 --no-eval

The model is the method's full U-Net (by default 16, 32, 64, 128 channels with
1, 2, 2, 4 residual blocks per level) on random
inputs. A train step is the engine's own jitted step (`engine.step.make_train_step`
with the method's loss and Adam) for each stage of the method; times are the
median of `--repeats` after one warm-up call, each call synchronised with
`block_until_ready`. `--batch` counts samples: an M3AE fine-tuning sample is
two missing-modality views. Memory is XLA's own account of the compiled step
(`memory_analysis()`): its arguments (parameters, optimiser state, batch) and
its temporaries (activations kept for the backward pass, workspace), in MiB.
`--set key=value` overrides the method's config as `jaxbrats train --set`.
`--crop D H W` times one non-cubic crop instead of the cubes of `--sizes`.
FLOPs (`gflop`, `tflops`) are XLA's cost analysis of the lowered step (on GPU
the compiled step's cuDNN custom calls may count nothing).
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

from jaxbrats import files
from jaxbrats.inference.segment import case_locator
from jaxbrats.interop import benchmark
from jaxbrats.modalities import subset_index


def machine() -> str:
    info = benchmark.machine(with_torch=False)  # JAX only
    devices = f"{jax.device_count()} x {info['accelerator']} ({info['backend']})"
    return f"{info['cpu']} ({info['cpu_cores']} cores); {devices}; jax {info['jax']}"


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


#: The source grid of the random cases: a BraTS volume.
CASE_SHAPE = (240, 240, 155)


def random_batch(rng, batch: int, size, views: int) -> dict:
    """A pipeline-shaped batch of random crops (`size`: an edge or a (D, H, W) crop; every key
    `data.pipeline` documents) from whole 240x240x155 cases (a brain box at the origin of the source grid)."""
    crop = _crop(size)
    shape = (batch, *crop)
    masks = rng.random((batch, views, 4)) < 0.5
    masks[..., 1] = True  # never empty
    subsets = np.asarray([[subset_index(m) for m in sample] for sample in masks], np.int32)
    return {
        "image": jnp.asarray(rng.normal(size=shape + (4,)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 4, shape), jnp.uint8),
        "valid": jnp.ones(shape, bool),
        "modality_mask": jnp.asarray(masks),
        "subset": jnp.asarray(subsets),
        "present": jnp.ones((batch, 4), bool),
        "case_index": jnp.arange(batch, dtype=jnp.int32),
        "crop_start": jnp.asarray(rng.integers(0, np.maximum(np.subtract(CASE_SHAPE, crop), 1), (batch, 3)), jnp.int32),
        "flipped": jnp.asarray(rng.random((batch, 3)) < 0.5),
        "case_shape": jnp.asarray(np.tile(CASE_SHAPE, (batch, 1)), jnp.int32),
        "box_start": jnp.zeros((batch, 3), jnp.int32),
    }


def _crop(size) -> tuple[int, int, int]:
    """An edge (a cube) or a (D, H, W) crop -> (D, H, W)."""
    return (int(size),) * 3 if np.ndim(size) == 0 else tuple(int(s) for s in size)


def make_method(name: str, overrides: list[str]):
    from jaxbrats.methods import get_method, load_config

    config = load_config(None, [f"method.name='{name}'", *overrides])
    return get_method(name)(config)


def bench_train_step(
    method_name: str,
    stage: str,
    size: int,
    batch: int,
    dtype: str,
    repeats: int,
    conv_impl: str,
    overrides: tuple[str, ...] = (),
) -> dict:
    from jaxbrats.engine.state import init_state
    from jaxbrats.engine.step import make_train_step

    method = make_method(
        method_name,
        [
            f"model.dtype='{dtype}'",
            f"model.conv_impl='{conv_impl}'",
            f"data.crop_size={list(_crop(size))}",
            *overrides,
        ],
    )
    optimizers = {group: optax.adam(3e-4) for group in method.groups(stage)}
    graphdefs, state = init_state(method, stage, 0, optimizers)
    views = method.pipeline(stage)["instantiations"]
    batch_data = random_batch(np.random.default_rng(0), batch, size, views)
    step_fn = make_train_step(method, stage, graphdefs, optimizers)
    jitted = jax.jit(step_fn, donate_argnums=0)
    holder = {"state": state}

    def call():
        holder["state"], metrics = jitted(holder["state"], batch_data)
        return metrics  # its keys are the method's ("loss", RIRN's "model/loss", ...): wait for them all

    t0 = time.perf_counter()
    lowered = jitted.lower(holder["state"], batch_data)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    flops = benchmark.lowered_flops(lowered)
    memory = compiled.memory_analysis()
    del compiled
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(holder["state"]["models"]))
    _, step_s = _timed(call, repeats)
    return {
        "what": "train_step",
        "method": method_name,
        "stage": stage,
        "size": list(_crop(size)),
        "batch": batch,
        "views": views,
        "dtype": dtype,
        "conv_impl": conv_impl,
        "compile_s": round(compile_s, 3),
        "step_s": round(step_s, 4),
        "voxels_per_s": round(batch * views * int(np.prod(_crop(size))) / step_s),
        "gflop": None if flops is None else round(flops / 1e9, 3),
        "tflops": None if flops is None else round(flops / step_s / 1e12, 4),
        "traces": step_fn.traces,
        "parameters": params,
        # None where the backend gives no memory analysis.
        "arguments_mib": memory and round(memory.argument_size_in_bytes / 2**20, 1),
        "temporaries_mib": memory and round(memory.temp_size_in_bytes / 2**20, 1),
    }


def bench_eval(method_name: str, shape, window: int, repeats: int, dtype: str, overrides: tuple[str, ...] = ()) -> dict:
    from jaxbrats.engine.state import init_state
    from jaxbrats.evaluation.program import make_case_program

    method = make_method(
        method_name,
        [
            f"model.dtype='{dtype}'",
            f"eval.window=[{window},{window},{window}]",
            f"data.crop_size=[{window},{window},{window}]",
            *overrides,
        ],
    )
    stage = [s for s in method.stages if method.can_predict(s)][-1]
    graphdefs, state = init_state(method, stage, 0, {g: optax.adam(1e-3) for g in method.groups(stage)})
    program = make_case_program(method, graphdefs, method.config.eval)
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.normal(size=tuple(shape) + (4,)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, shape), jnp.uint8)
    valid = jnp.ones(shape, bool)
    case = case_locator(shape, (0, 0, 0))  # the whole padded volume is the case, at the source grid's origin
    first, per_case = _timed(lambda: program(state["models"], image, labels, valid, case), repeats)
    return {
        "what": "eval_15_subsets",
        "method": method_name,
        "size": list(shape),
        "window": [window] * 3,
        "overlap": method.config.eval.overlap,
        "dtype": dtype,
        "first_call_s": round(first, 2),
        "per_case_s": round(per_case, 3),
        "traces": program.traces,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="baseline", help="a registered method; every stage's step is timed")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="cubic crops")
    parser.add_argument("--crop", type=int, nargs=3, metavar=("D", "H", "W"), help="one crop instead of --sizes")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--conv-impl", choices=["auto", "native", "depth2d"], default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--eval-shape",
        type=int,
        nargs=3,
        default=[128, 128, 128],
        help="padded case shape for the 15-subset evaluation",
    )
    parser.add_argument("--eval-window", type=int, default=128)
    parser.add_argument("--stages", nargs="+", help="these stages only (default: every stage of the method)")
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    result = {"device": machine(), "date": time.strftime("%Y-%m-%d"), "runs": []}
    print(result["device"])
    from jaxbrats.methods import get_method

    for size in [tuple(args.crop)] if args.crop else args.sizes:
        for stage in [s for s in get_method(args.method).stages if not args.stages or s in args.stages]:
            row = bench_train_step(
                args.method, stage, size, args.batch, args.dtype, args.repeats, args.conv_impl, tuple(args.set)
            )
            result["runs"].append(row)
            print(
                f"{args.method} {stage} step {'x'.join(map(str, row['size']))} x{args.batch} "
                f"(x{row['views']} views) {args.dtype} "
                f"({row['conv_impl']}): {row['step_s'] * 1e3:.0f} ms, {row['voxels_per_s'] / 1e6:.2f} Mvoxel/s, "
                f"compile {row['compile_s']:.1f} s, {row['parameters'] / 1e6:.2f} M parameters, "
                f"memory {row['arguments_mib'] or 0:.0f} MiB arguments + "
                f"{row['temporaries_mib'] or 0:.0f} MiB temporaries"
            )
    if not args.no_eval:
        row = bench_eval(
            args.method, args.eval_shape, args.eval_window, max(args.repeats - 1, 1), args.dtype, tuple(args.set)
        )
        result["runs"].append(row)
        print(
            f"evaluation of 15 subsets, case {tuple(args.eval_shape)}, window {args.eval_window}^3: "
            f"{row['per_case_s']:.1f} s per case (first call with compilation {row['first_call_s']:.1f} s)"
        )
    if args.json:
        files.write_text_atomic(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
