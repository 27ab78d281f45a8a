"""Where the JAX train step spends its time: a profiler trace of one step, grouped by kind of operation.

    python3 tools/profile_step.py --size 64 --batch 1

Runs the engine's jitted step of the full baseline U-Net (as `jaxbrats bench`)
under `jax.profiler.trace`, reads the Perfetto trace it writes, and sums the
device-side time of each compiled operation. Operations are grouped by what
they compute, from the compiled HLO: convolutions and dots whose output is
the size of a kernel (weight gradients) or of an activation (forward passes
and input gradients), layout transposes, and the rest (GroupNorm, ReLU,
residual adds, loss, Adam), which XLA fuses into loops.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import re
import tempfile
from pathlib import Path

import jax

from jaxbrats.interop.benchmark import JaxSide, _inputs, add_arguments

KERNEL_SIZED = 100_000  # elements: every weight of the U-Net is smaller, every activation larger


def op_kinds(hlo_text: str) -> dict[str, str]:
    """Instruction name -> kind, from the compiled module's text."""
    kinds = {}
    for name, shape, body in re.findall(r"%([\w.\-]+) = (\w+\[[\d,]*\])\S* (\w+)", hlo_text):
        size = math.prod(int(v) for v in re.findall(r"\d+", shape.split("[", 1)[1])) if "[" in shape else 1
        is_conv = (
            "ynn_fusion" in name
            or "onednn" in name
            or body in ("convolution", "dot", "custom-call")
            or name.startswith(("convolution", "conv_general_dilated", "dot"))
        )
        if is_conv:
            kinds[name] = "conv/dot -> weight gradient" if size < KERNEL_SIZED else "conv/dot -> activation"
        elif "transpose" in name or body == "transpose":
            kinds[name] = "layout transpose"
        else:
            kinds[name] = "fused elementwise / reductions"
    return kinds


def profile(args) -> dict[str, float]:
    side = JaxSide(args, args.remat)
    image, labels = _inputs((args.size[0],) * 3, args.batch[0])
    call, _ = side.train_step(image, labels)
    for _ in range(2):
        call()
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            call()
        with gzip.open(next(Path(tmp).rglob("*.trace.json.gz"))) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_op = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and not e["name"].startswith("$") and "Thunk" not in e["name"]:
            per_op[e["name"]] += e["dur"] / 1e6
    kinds = op_kinds(side.compiled_text)
    totals = collections.Counter()
    for name, seconds in per_op.items():
        if name in kinds:
            totals[kinds[name]] += seconds
    return dict(totals)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    totals = profile(args)
    whole = sum(totals.values())
    print(f"train step {args.size[0]}^3, batch {args.batch[0]}, {args.dtype}: {whole * 1e3:.0f} ms of operations")
    for kind, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {seconds * 1e3:8.0f} ms  {seconds / whole:6.1%}  {kind}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
