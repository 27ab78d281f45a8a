"""Benchmark of dedicated students trained together (RIRN): step time and memory per student.

    python3 tools/bench_students.py                          # 1, 4, 15 students at 64^3, batch 1
    python3 tools/bench_students.py --students 1 4 --size 48 --json out.json
    python3 tools/bench_students.py --size 128 --dtype bfloat16   # on a GPU
    python3 tools/bench_students.py --students 1 15 --crop 160 192 128 --dtype bfloat16   # the paper's crop

One RIRN train step (`engine.make_train_step`: the teacher's forward and
backward pass once, every student vmapped, the discriminators' update) is
timed with K students, the first K subsets in the library's order (4
singles, 6 pairs, 4 triples, full), on the paper's U-Net (16 initial
channels) and random inputs. "One per run" is what peers do, one run per
student, each with its own teacher: K x the step time of 1 student. The
teacher's pass is shared and nothing leaves the program, so the cost per
student must fall as students are added; the bound checked below: 15
students in at most 8x the step of 1 (`--bound`). Memory: XLA's buffer
assignment of the compiled step (arguments + temporaries), from
`compiled.memory_analysis()`. Times are the median of `--repeats` after one
warm-up call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_engine import _crop, _timed, machine, make_method, random_batch

from jaxbrats import files
from jaxbrats.modalities import SUBSET_NAMES


def bench(k: int, size, batch: int, dtype: str, repeats: int, extra: tuple[str, ...] = ()) -> dict:
    """One row: K students' step at `size` (an edge, or a (D, H, W) crop)."""
    from jaxbrats.engine.optim import stage_optimizers
    from jaxbrats.engine.state import init_state
    from jaxbrats.engine.step import make_train_step

    students = json.dumps(list(SUBSET_NAMES[:k]))
    method = make_method(
        "rirn", [f"method.students={students}", f"model.dtype='{dtype}'", f"data.crop_size={list(_crop(size))}", *extra]
    )
    optimizers = stage_optimizers(method, "train", 1000)
    graphdefs, state = init_state(method, "train", 0, optimizers)
    data = random_batch(np.random.default_rng(0), batch, size, 1)
    step_fn = make_train_step(method, "train", graphdefs, optimizers)
    t0 = time.perf_counter()
    compiled = jax.jit(step_fn, donate_argnums=0).lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], data)
        return metrics["model/loss"]

    _, step_s = _timed(call, repeats)
    total = (memory.argument_size_in_bytes + memory.temp_size_in_bytes) if memory is not None else None
    return {
        "students": k,
        "size": list(_crop(size)),
        "batch": batch,
        "dtype": dtype,
        "compile_s": round(compile_s, 1),
        "step_s": round(step_s, 3),
        "step_per_student_s": round(step_s / k, 3),
        "memory_bytes": total,
        "memory_per_student_bytes": None if total is None else total // k,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=int, nargs="+", default=[1, 4, 15])
    parser.add_argument("--size", type=int, default=64, help="cubic crop")
    parser.add_argument("--crop", type=int, nargs=3, metavar=("D", "H", "W"), help="a crop instead of --size")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bound", type=float, default=8.0, help="15 students in at most this many times 1's step")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    result = {"device": machine(), "date": time.strftime("%Y-%m-%d"), "runs": []}
    print(result["device"])
    for k in sorted(args.students):
        size = tuple(args.crop) if args.crop else args.size
        row = bench(k, size, args.batch, args.dtype, args.repeats, tuple(args.set))
        result["runs"].append(row)
        mem = ""
        if row["memory_bytes"]:  # None where the backend gives no memory analysis
            per_student = f"{row['memory_per_student_bytes'] / 2**20:.0f} MiB per student"
            mem = f", memory {row['memory_bytes'] / 2**30:.2f} GiB ({per_student})"
        print(
            f"{k:2d} students, {'x'.join(map(str, row['size']))} x{args.batch} {args.dtype}: "
            f"step {row['step_s']:.2f} s "
            f"({row['step_per_student_s']:.2f} s per student), compile {row['compile_s']:.0f} s{mem}",
            flush=True,
        )
    one = next((r for r in result["runs"] if r["students"] == 1), None)
    if one:
        for row in result["runs"]:
            row["vs_one_per_run"] = round(row["step_s"] / (row["students"] * one["step_s"]), 3)
            print(
                f"{row['students']:2d} together: {row['step_s']:.2f} s vs one per run "
                f"{row['students'] * one['step_s']:.2f} s (x{row['vs_one_per_run']:.2f}); "
                f"vs 1 student x{row['step_s'] / one['step_s']:.2f}"
            )
        fifteen = next((r for r in result["runs"] if r["students"] == 15), None)
        if fifteen:
            result["bound_ok"] = fifteen["step_s"] <= args.bound * one["step_s"]
            print(f"bound: 15 students <= {args.bound:g} x 1 student: {'yes' if result['bound_ok'] else 'NO'}")
    if args.json:
        files.write_text_atomic(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
