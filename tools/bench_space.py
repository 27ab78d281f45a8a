"""Volume sharding: memory and time per device of the train step, each crop's depth split over "space".

    python3 tools/bench_space.py                                     # 128^3, 240x240x160, 160x240x240; space 1 2 4 8
    python3 tools/bench_space.py --sizes 128,128,128 --spaces 1 2 --time --out space.json
    python3 tools/bench_space.py --sizes 160,240,240 --remat --conv-impl native --no-time   # GPU lowering, memory only

For each crop size (D,H,W: D, the first, is the axis split over the devices) and
each number of "space" devices S, the method's real train step
(`engine.step.make_train_step`, the stage's configured optimiser, state placed by
`runtime.sharding.shard_state`, jitted as the trainer's `engine.step.compile_step`
does: state donated, lowered under `jax.set_mesh`) is compiled for one sample on a mesh of
data 1 x model 1 x space S, its batch holding every key of the pipeline with
the shardings `runtime.sharding.place_batch` gives. Reported per device:

- memory: `compiled.memory_analysis()`: arguments, outputs, temporaries and
  "peak" = arguments + outputs + temporaries - aliased (donated state that the
  outputs reuse). XLA's own `peak_memory_in_bytes` is kept in the JSON as
  xla_peak: XLA:CPU puts little more than the arguments' size there. It is
  the compiler's buffer assignment for this backend: a guide to the memory a
  GPU would need, not a measurement of it (XLA:CPU appears to compute bfloat16
  convolutions in float32, and its figures barely move with --remat at
  space 1). `--conv-impl native` is the lowering GPUs run; the default, auto,
  is depth2d on CPU (`networks.layers`).
- halo: bytes received by the collective-permutes of one step (the 3x3x3
  convolutions' boundary slices, `networks.layers.halo_conv3d`); all-reduce:
  bytes of the all-reduces (gradients of the replicated weights, GroupNorm and
  loss sums, XLA combining many into one op); all-gather: how many and the
  largest array. Sizes are each op's result on one device (a device at an end
  of the volume receives zeros from its missing neighbour), every op in the
  compiled HLO counted once (none is in a loop). An all-gather of an
  activation would be a bug.
- time (`--time`; by default only for crops up to 128^3): median of
  `--repeats` steps after one warm-up. With no accelerator the devices are
  fake CPU devices: this tool sets ``--xla_force_host_platform_device_count=8``
  in XLA_FLAGS when that flag is not set, before JAX starts, so all of them
  share the machine's cores. Those times say that the split step runs, not
  how much faster it is: they are not a speed-up figure.

A size that S cannot split is reported as refused (config validation: every U-Net
level's depth must split into whole slabs, i.e. D divisible by 8 x S for 4
levels): 240 splits over 2 devices at most, 160 over 4, 128 over 8. With
jax 0.10.2, `--dtype bfloat16` at space > 1 aborts XLA:CPU's compiler (a
bfloat16 weight-gradient all-reduce; docs/benchmarks/README.md), which ends this process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from collections import defaultdict

# Before JAX starts: 8 fake CPU devices, unless the caller chose a count (one statement, so the
# imports below may follow it).
os.environ["XLA_FLAGS"] = (
    flags
    if "--xla_force_host_platform_device_count" in (flags := os.environ.get("XLA_FLAGS", ""))
    else f"{flags} --xla_force_host_platform_device_count=8".strip()
)

import jax
import numpy as np

from jaxbrats import engine, files
from jaxbrats.errors import ConfigError
from jaxbrats.interop import benchmark
from jaxbrats.methods import get_method, load_config
from jaxbrats.runtime import compilation, sharding

MIB = 2**20


def host_batch(size, views: int, rng) -> dict:
    """One sample of every key the pipeline (`data.pipeline`) yields, random values."""
    masks = rng.random((1, views, 4)) < 0.5
    masks[..., 1] = True  # never an empty subset
    shape = (1, *size)
    return {
        "image": rng.normal(size=shape + (4,)).astype(np.float32),
        "label": rng.integers(0, 4, shape, dtype=np.uint8),
        "valid": np.ones(shape, bool),
        "modality_mask": masks,
        "subset": np.full((1, views), 14, np.int32),
        "present": np.ones((1, 4), bool),
        "case_index": np.zeros(1, np.int32),
        "crop_start": np.zeros((1, 3), np.int32),
        "flipped": np.zeros((1, 3), bool),
        "case_shape": np.asarray([size], np.int32),
        "box_start": np.zeros((1, 3), np.int32),
    }


_COMBINED = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+(all-reduce|all-gather|all-to-all|reduce-scatter)\(")


def exchanges(hlo: str) -> dict:
    """Collectives of a compiled step: count and bytes per device of each op, largest all-gathered array.

    Halos: `compilation.collectives`. XLA combines small all-reduces (and all-gathers) into one op
    with a tuple result (its type holds /*index=5*/ comments), of which `compilation.collectives`
    counts only a tail, so their bytes are summed over every element here (synchronous ops, as
    XLA:CPU emits them)."""
    out = defaultdict(int)
    for op, size in compilation.collectives(hlo):
        if op == "collective-permute":
            out[f"{op}_n"] += 1
            out[f"{op}_bytes"] += size
    for match in map(_COMBINED.search, hlo.splitlines()):
        if match:
            sizes = compilation.array_bytes(match.group(1))
            out[f"{match.group(2)}_n"] += 1
            out[f"{match.group(2)}_bytes"] += sum(sizes)
            if match.group(2) == "all-gather":
                out["all-gather_max_bytes"] = max([out["all-gather_max_bytes"], *sizes])
    return {k: v for k, v in out.items() if v}


def bench(args, size, space: int) -> dict:
    row = {
        "method": args.method,
        "size": list(size),
        "space": space,
        "slab": size[0] // space,
        "dtype": args.dtype,
        "remat": args.remat,
        "conv_impl": args.conv_impl,
    }
    overrides = [
        f"method.name='{args.method}'",
        f"model.dtype='{args.dtype}'",
        f"model.remat={str(args.remat).lower()}",
        f"model.conv_impl='{args.conv_impl}'",
        f"data.crop_size=[{size[0]},{size[1]},{size[2]}]",
        "data.batch_size=1",
        f"train.mesh={{data = 1, space = {space}, model = 1}}",
        *args.set,
    ]
    try:
        method = get_method(args.method)(load_config(None, overrides))
        mesh = sharding.make_mesh(method.config.train.mesh)
        stage = args.stage or method.stages[-1]
        sharding.check_families(mesh, method.families(stage))
    except ConfigError as e:
        return {**row, "refused": str(e)}
    row["stage"] = stage
    optimizers = engine.stage_optimizers(method, stage, 1000)
    graphdefs, state = engine.init_state(method, stage, 0, optimizers)
    families = method.families(stage)
    state = sharding.shard_state(state, mesh, families)
    data = host_batch(size, method.pipeline(stage).get("instantiations", 1), np.random.default_rng(0))
    abstract = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh, v.ndim))
        for k, v in data.items()
    }
    step_fn = engine.make_train_step(method, stage, graphdefs, optimizers)
    jitted = jax.jit(
        step_fn,
        donate_argnums=0,
        out_shardings=(sharding.state_shardings(state, mesh, families), sharding.replicated(mesh)),
    )
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):  # the layers see the split depth (networks.layers.space_shards)
        compiled = jitted.lower(state, abstract).compile()
    row["compile_s"] = round(time.perf_counter() - t0, 1)
    m = compiled.memory_analysis()
    if m is not None:
        row["memory"] = {
            "argument": m.argument_size_in_bytes,
            "output": m.output_size_in_bytes,
            "alias": m.alias_size_in_bytes,
            "temp": m.temp_size_in_bytes,
            "peak": m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes,
            "xla_peak": getattr(m, "peak_memory_in_bytes", 0),
        }
    row["collectives"] = exchanges(compiled.as_text())
    timing = args.time if args.time is not None else math.prod(size) <= 128**3
    if timing:
        batch = sharding.place_batch(data, mesh)
        holder = {"state": state}
        times = []
        for _ in range(args.repeats + 1):  # the first call is the warm-up
            t0 = time.perf_counter()
            holder["state"], metrics = compiled(holder["state"], batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        row["step_s"] = round(statistics.median(times[1:]), 3)
        row["loss"] = float(next(v for k, v in metrics.items() if k.endswith("loss")))
    return row


def table_line(row: dict) -> str:
    size = "x".join(map(str, row["size"]))
    if "refused" in row:
        return f"| {size} | {row['space']} | - | refused: {row['refused']} |"
    mem, c = row.get("memory", {}), row["collectives"]
    mib = {k: f"{v / MIB:.0f}" for k, v in mem.items()}
    gathers = (
        f"{c.get('all-gather_n', 0)} ({c.get('all-gather_max_bytes', 0) / MIB:.2f} MiB)"
        if c.get("all-gather_n")
        else "0"
    )
    step = f"{row['step_s']:.1f}" if "step_s" in row else "-"
    return (
        f"| {size} | {row['space']} | {row['slab']} | {mib.get('argument', '-')} | {mib.get('output', '-')} | "
        f"{mib.get('alias', '-')} | {mib.get('temp', '-')} | **{mib.get('peak', '-')}** | "
        f"{c.get('collective-permute_bytes', 0) / MIB:.1f} ({c.get('collective-permute_n', 0)}) | "
        f"{c.get('all-reduce_bytes', 0) / MIB:.1f} ({c.get('all-reduce_n', 0)}) | {gathers} | "
        f"{row['compile_s']:.0f} | {step} |"
    )


HEADER = (
    "| crop DxHxW | space | slab D | args MiB | out MiB | aliased MiB | temp MiB | peak MiB | halo MiB (ops) | "
    "all-reduce MiB (ops) | all-gathers (largest) | compile s | step s |\n" + "|---" * 3 + "|---:" * 10 + "|"
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="baseline")
    parser.add_argument("--stage", help="the method's stage (default: its last)")
    parser.add_argument(
        "--sizes", nargs="+", default=["128,128,128", "240,240,160", "160,240,240"], help="crops D,H,W (D is split)"
    )
    parser.add_argument("--spaces", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--remat", action="store_true", help="model.remat: recompute each residual block in the backward pass"
    )
    parser.add_argument("--conv-impl", choices=["auto", "native", "depth2d"], default="auto")
    parser.add_argument(
        "--time",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the step (default: only crops up to 128^3)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override, repeatable")
    parser.add_argument("--out", help="write the JSON rows here")
    args = parser.parse_args(argv)

    info = benchmark.machine(with_torch=False)  # JAX only
    result = {
        "machine": info,
        "devices": f"{jax.device_count()} x {info['accelerator']} ({info['backend']})",
        "date": time.strftime("%Y-%m-%d"),
        "argv": sys.argv[1:] if argv is None else argv,
        "rows": [],
    }
    print(f"{info['cpu']} ({info['cpu_cores']} cores); {result['devices']}; jax {info['jax']}")
    if info["backend"] == "cpu":
        print("fake CPU devices share the host's cores: step times are not a speed-up figure")
    print(HEADER, flush=True)
    for size in args.sizes:
        size = tuple(int(v) for v in size.replace("x", ",").split(","))
        for space in args.spaces:
            row = bench(args, size, space)
            result["rows"].append(row)
            print(table_line(row), flush=True)
            if args.out:
                files.write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
