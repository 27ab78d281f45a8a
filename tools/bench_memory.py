"""Memory of each method's train step at the papers' crops and batches, from XLA's memory analysis.

    python3 tools/bench_memory.py --json memory.json                 # the whole table (slow on a CPU)
    python3 tools/bench_memory.py --only acdis --dtypes bfloat16 --remat off
    python3 tools/bench_memory.py --only baseline --timeout 600       # one method, each row <= 10 min

The engine's train step (`engine.step.make_train_step`, the stage's own
optimisers, the state donated) is compiled, never run, for an abstract state
(`engine.state.abstract_state`) and an abstract batch (ShapeDtypeStructs of
`bench_engine.random_batch`'s keys): nothing large is allocated. From
`compiled.memory_analysis()`: arguments (parameters, optimiser state, batch),
temporaries (activations kept for the backward pass, workspaces) and outputs
not aliased to a donated argument; their sum is the step's peak. The numbers
are those of the backend the step is compiled for: on a CPU, XLA:CPU's buffer
assignment, which differs from XLA:GPU's (fusion, cuDNN workspaces); run this
on the GPU for the GPU's account. Each row compiles in its own process (a
crash or `--timeout` loses that row only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TOOLS, os.path.dirname(TOOLS)]  # bench_engine, and jaxbrats without an install

from jaxbrats import files  # noqa: E402

GIB = 2**30
FITS = (40, 80)  # GB of accelerator memory (decimal, as sold), against the peak


@dataclasses.dataclass(frozen=True)
class Config:
    """One row: a method's stage at its paper's crop and batch."""

    method: str
    stage: str
    crop: tuple[int, int, int]
    batch: int
    students: int = 0  # RIRN: how many students (the first subsets in the library's order); 0: the method's own
    overrides: tuple[str, ...] = ()


#: The papers' crops and batches (RIRN: 160x192x128, batch 1, all 15 students).
CONFIGS = (
    Config("baseline", "train", (128, 128, 128), 2),
    Config("rirn", "train", (160, 192, 128), 1, students=15),
    Config("acdis", "train", (80, 80, 80), 2),
    Config("acdis", "train", (128, 128, 128), 2),
    Config("m3ae", "pretrain", (128, 128, 128), 2),
    Config("m3ae", "finetune", (128, 128, 128), 2),
    Config("mind_the_gap", "teacher", (80, 80, 80), 4),
    Config("mind_the_gap", "students", (80, 80, 80), 4),
)


def abstract_batch(method, stage: str, crop, batch: int) -> dict:
    """`bench_engine.random_batch`'s keys as ShapeDtypeStructs at `crop` (any box, not only cubes)."""
    import jax
    import numpy as np
    from bench_engine import random_batch

    views = method.pipeline(stage)["instantiations"]
    small = random_batch(np.random.default_rng(0), batch, 1, views)
    out = {}
    for key, value in small.items():
        shape = value.shape
        if key in ("image", "label", "valid"):
            shape = (batch, *crop, *value.shape[4:])
        out[key] = jax.ShapeDtypeStruct(shape, value.dtype)
    return out


def compile_row(cfg: Config, dtype: str, remat: bool) -> dict:
    """Compile one train step and read its memory analysis."""
    import jax
    from bench_engine import make_method

    from jaxbrats.engine.optim import stage_optimizers
    from jaxbrats.engine.state import abstract_state
    from jaxbrats.engine.step import make_train_step
    from jaxbrats.modalities import SUBSET_NAMES

    overrides = [
        f"model.dtype='{dtype}'",
        f"model.remat={str(remat).lower()}",
        f"data.crop_size=[{','.join(map(str, cfg.crop))}]",
        *cfg.overrides,
    ]
    if cfg.students:
        overrides.append(f"method.students={json.dumps(list(SUBSET_NAMES[: cfg.students]))}")
    method = make_method(cfg.method, overrides)
    optimizers = stage_optimizers(method, cfg.stage, 1000)
    graphdefs, state = abstract_state(method, cfg.stage, optimizers)
    data = abstract_batch(method, cfg.stage, cfg.crop, cfg.batch)
    step_fn = make_train_step(method, cfg.stage, graphdefs, optimizers)
    t0 = time.perf_counter()
    compiled = jax.jit(step_fn, donate_argnums=0).lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    arguments, temporaries = memory.argument_size_in_bytes, memory.temp_size_in_bytes
    outputs = max(memory.output_size_in_bytes - memory.alias_size_in_bytes, 0)  # not written in place
    total = arguments + temporaries + outputs
    students = getattr(method, "students", None) or getattr(method.options, "students", None)
    if cfg.stage == "teacher":
        students = None  # Mind the Gap's teacher stage trains no student
    return {
        "method": cfg.method,
        "stage": cfg.stage,
        "crop": list(cfg.crop),
        "batch": cfg.batch,
        "students": len(students) if isinstance(students, (list, tuple)) else cfg.students or None,
        "dtype": dtype,
        "remat": remat,
        "arguments_gib": round(arguments / GIB, 2),
        "temporaries_gib": round(temporaries / GIB, 2),
        "outputs_gib": round(outputs / GIB, 2),
        "total_gib": round(total / GIB, 2),
        **{f"fits_{gb}gb": total <= gb * 1e9 for gb in FITS},
        "compile_s": round(compile_s, 1),
        "backend": jax.default_backend(),
    }


def run_isolated(cfg: Config, dtype: str, remat: bool, timeout: float) -> dict:
    """`compile_row` in a child process: a row that crashes or times out is reported, not fatal."""
    spec = json.dumps({"config": dataclasses.asdict(cfg), "dtype": dtype, "remat": remat})
    try:
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--row", spec],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {**_row_key(cfg, dtype, remat), "error": f"compile exceeded {timeout:g} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {**_row_key(cfg, dtype, remat), "error": tail[:300]}
    return json.loads(lines[-1])


def _row_key(cfg: Config, dtype: str, remat: bool) -> dict:
    return {
        "method": cfg.method,
        "stage": cfg.stage,
        "crop": list(cfg.crop),
        "batch": cfg.batch,
        "students": cfg.students or None,
        "dtype": dtype,
        "remat": remat,
    }


def afeb_rows(crop: int, chunk: int, samples: int = 8) -> list[dict]:
    """Each level's AFEB alone at a `crop`^3 crop (`samples`: 4 modality encoders x batch 2), its
    attention in blocks of `chunk` queries (0: the whole tokens^2 logits at once): XLA's
    temporaries of its forward pass and of its gradient."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxbrats.networks.acdis import AFEB, afeb_heads
    from jaxbrats.networks.unet import UNetConfig

    cfg = UNetConfig(in_channels=1)
    levels, rows = len(cfg.widths), []
    for level, channels in enumerate(cfg.widths):
        pool, edge = 2 ** (levels - 1 - level), crop // 2**level
        graphdef, state = nnx.split(nnx.eval_shape(lambda: AFEB(channels, pool, cfg, nnx.Rngs(0), chunk)))
        x = jax.ShapeDtypeStruct((samples, edge, edge, edge, channels), jnp.float32)

        def forward(s, x):
            return nnx.merge(graphdef, s)(x)

        tokens = (edge // pool) ** 3
        row = {"crop": crop, "level": level, "channels": channels, "tokens": tokens, "chunk": chunk}
        row["logits_gib"] = round(samples * afeb_heads(channels) * tokens**2 * 4 / GIB, 2)  # float32, all at once
        for name, fn in (("forward", forward), ("gradient", jax.grad(lambda s, x: jnp.sum(forward(s, x) ** 2)))):
            memory = jax.jit(fn).lower(state, x).compile().memory_analysis()
            row[f"{name}_temporaries_gib"] = round(memory.temp_size_in_bytes / GIB, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


COLUMNS = (
    "method",
    "stage",
    "crop",
    "batch",
    "students",
    "dtype",
    "remat",
    "arguments GiB",
    "temporaries GiB",
    "total GiB",
    "fits 40 GB",
    "fits 80 GB",
    "compile s",
    "backend",
)


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table (an error row keeps its key and says why it has no numbers)."""

    def cells(r: dict) -> list[str]:
        key = [
            r["method"],
            r["stage"],
            "x".join(map(str, r["crop"])),
            str(r["batch"]),
            str(r.get("students") or "-"),
            r["dtype"],
            "yes" if r["remat"] else "no",
        ]
        if "error" in r:
            return key + [f"({r['error']})"] + [""] * (len(COLUMNS) - len(key) - 1)
        yes_no = {True: "yes", False: "no"}
        return key + [
            f"{r['arguments_gib']:.2f}",
            f"{r['temporaries_gib']:.2f}",
            f"{r['total_gib']:.2f}",
            yes_no[r["fits_40gb"]],
            yes_no[r["fits_80gb"]],
            f"{r['compile_s']:.0f}",
            r["backend"],
        ]

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="METHOD", help="these methods only (default: every one)")
    parser.add_argument("--stages", nargs="+", help="these stages only")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    parser.add_argument("--remat", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--crop", type=int, nargs=3, help="every row at this crop (a quick check)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per row's compilation")
    parser.add_argument("--json", help="write the rows here (rewritten after every row)")
    parser.add_argument("--afeb", type=int, metavar="CROP", help="AFEB alone per level at CROP^3 instead")
    parser.add_argument("--afeb-chunk", type=int, default=None, help="--afeb: queries per block (0: all at once)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: one row, JSON on stdout
    args = parser.parse_args(argv)
    if args.row:
        spec = json.loads(args.row)
        cfg = spec["config"]
        cfg = Config(**{**cfg, "crop": tuple(cfg["crop"]), "overrides": tuple(cfg["overrides"])})
        print(json.dumps(compile_row(cfg, spec["dtype"], spec["remat"])), flush=True)
        return 0

    if args.afeb:
        from jaxbrats.networks.acdis import ATTENTION_CHUNK

        chunk = ATTENTION_CHUNK if args.afeb_chunk is None else args.afeb_chunk
        rows = afeb_rows(args.afeb, chunk)
        if args.json:
            files.write_text_atomic(args.json, json.dumps({"afeb": rows}, indent=1) + "\n")
        return 0
    from bench_engine import machine

    result = {"device": machine(), "date": time.strftime("%Y-%m-%d"), "rows": []}
    print(result["device"], flush=True)
    configs = [
        c for c in CONFIGS if (not args.only or c.method in args.only) and (not args.stages or c.stage in args.stages)
    ]
    if args.crop:
        configs = [dataclasses.replace(c, crop=tuple(args.crop)) for c in configs]
    for cfg in configs:
        for dtype in args.dtypes:
            for remat in args.remat:
                row = run_isolated(cfg, dtype, remat == "on", args.timeout)
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
                if args.json:
                    files.write_text_atomic(args.json, json.dumps(result, indent=1) + "\n")
    print(markdown(result["rows"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
