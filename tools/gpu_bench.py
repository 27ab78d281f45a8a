"""One prepared GPU run: the step times users ask first, each step a subprocess within one budget.

    OUT=DIR bash tools/gpu_bench.sh [--tiny] [--budget SECONDS]     # the wrapper: wheels, versions, caches
    python3 tools/gpu_bench.py --out DIR [--tiny] [--budget SECONDS] [--only STEP...]

Most important first (`STEPS`): the baseline's bfloat16 train step at 128^3
batch 2 against PyTorch eager AMP and torch.compile; the same in float32 (TF32
on a GPU) against eager; the 15-subset evaluation of a 240x240x155 case;
each method's train step at its paper's crop in bfloat16; RIRN with 1 and 15
students; then, while the budget lasts, each method's evaluation FLOPs per
window and per subset, and XLA's memory analysis of two methods' steps.

Each step runs as its own process (its own JAX and PyTorch: a crash, or a
GPU left full, costs that step only) under its own timeout, never past the
budget: a step whose minimum no longer fits is skipped, one that runs out of
time is killed with its process group and recorded as "timeout". After every
step, DIR/gpu_bench.json (the device, the versions, each step's command,
status, seconds and rows) and DIR/gpu_bench.md (one table) are rewritten
atomically, so a run cut short keeps what it measured. Each step's output is
in DIR/logs/STEP.log. `--tiny` runs the same steps at tiny sizes (16^3
crops, U-Nets of 16 channels: three levels for the baseline and M3AE, two
for the other methods, their families vmapped as on a GPU; a 20x16x16
evaluation case with 16^3 windows; one repeat): the CPU test of this
script (tests/test_gpu_bench.py).

This driver imports neither JAX nor PyTorch: the steps own the device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = [sys.executable, "-m", "jaxbrats", "bench"]
ENGINE = [sys.executable, str(ROOT / "tools" / "bench_engine.py")]
STUDENTS = [sys.executable, str(ROOT / "tools" / "bench_students.py")]
MEMORY = [sys.executable, str(ROOT / "tools" / "bench_memory.py")]

#: The methods' train steps at their papers' crops and batches (bfloat16).
PAPER_CROPS = {"m3ae": ((128, 128, 128), 2), "rirn": ((160, 192, 128), 1), "mind_the_gap": ((80, 80, 80), 4)}
PAPER_CROPS["acdis"] = ((80, 80, 80), 2)
EVAL_METHODS = ("baseline", "m3ae", "rirn", "mind_the_gap", "acdis")
LAST_STAGE = {"m3ae": "finetune", "mind_the_gap": "students"}

#: --tiny: U-Nets of 16 channels, one block per level (RIRN's students half the widths, GroupNorm 8
#: groups): three levels for the baseline and M3AE (its deep supervision needs three), two for the
#: other methods (`TWO_LEVELS`: a third less to compile); the methods' families (RIRN's students,
#: ACDIS's and Mind the Gap's per-modality encoders) vmapped, as "auto" maps them on a GPU: one copy
#: of a member's layers to compile, not one per member (XLA:CPU's "auto" unrolls them).
TINY_NET = ["--widths", "16", "16", "16", "--blocks", "1", "1", "1"]
TINY_SET = ["--set", "model.widths=[16,16,16]", "--set", "model.blocks=[1,1,1]", "--set", "model.family_map='vmap'"]
TWO_LEVELS = ["--set", "model.widths=[16,16]", "--set", "model.blocks=[1,1]"]
TINY_TIMES = ["--repeats", "1", "--warmup", "1"]


@dataclasses.dataclass
class Step:
    """One measurement: a command that writes its rows into `json`; `minimum` seconds it needs to start."""

    name: str
    title: str
    command: list[str]
    minimum: float
    timeout: float
    status: str = "pending"
    seconds: float | None = None
    rows: list = dataclasses.field(default_factory=list)
    error: str | None = None
    device: object = None  # the step's own account of the machine (`interop.benchmark.machine`)


def steps(out: Path, tiny: bool) -> list[Step]:
    """The steps, most important first, with their JSON files under `out`. Each step's (minimum,
    timeout) in seconds: a GPU's guess (compilation dominates), or --tiny's on a loaded 2-core CPU."""
    j = lambda name: ["--json", str(out / "steps" / f"{name}.json")]  # noqa: E731
    t = lambda gpu, cpu=(5, 150): cpu if tiny else gpu  # noqa: E731
    if tiny:  # torch.compile (Inductor building C++ on 2 cores) alone takes minutes: eager only
        train, net, times = ["--size", "16", "--batch", "1"], TINY_NET, TINY_TIMES
        window, case, torch_compile, engine_net = "16", ["20", "16", "16"], ["--no-compile"], TINY_SET
        # PyTorch's bfloat16 autocast on a CPU without bfloat16 units is slow (0.4 s a 16^3 window):
        # float32; Mind the Gap alone for the FLOPs per window (its teacher shares work, and is
        # quicker to compile than ACDIS, whose train step the run already covers).
        eval_dtype, eval_methods = "float32", ("mind_the_gap",)
    else:
        train, net, times = ["--size", "128", "--batch", "2"], [], ["--repeats", "5", "--warmup", "2"]
        window, case, torch_compile, engine_net = "128", ["240", "240", "155"], [], []
        eval_dtype, eval_methods = "bfloat16", EVAL_METHODS
    vs_eager = ["--vs", "torch", "--no-compile"]
    result = [
        Step(
            "train_bf16",
            "baseline train step, bfloat16, vs PyTorch eager AMP" + (" and torch.compile" if not tiny else ""),
            [*BENCH, *train, "--dtype", "bfloat16", "--what", "train", "--vs", "torch", *torch_compile, *net, *times]
            + j("train_bf16"),
            *t((120, 210)),
        ),
        Step(
            "train_f32",
            "baseline train step, float32 (TF32 on a GPU), vs PyTorch eager",
            [*BENCH, *train, "--dtype", "float32", "--what", "train", *vs_eager, *net, *times, *j("train_f32")],
            *t((60, 120)),
        ),
        Step(
            "eval_case",
            f"15-subset evaluation of a {'x'.join(case)} case, {window}^3 windows (baseline, {eval_dtype}), "
            "vs PyTorch eager",
            [*BENCH, "--what", "eval", "--eval-shape", *case, "--eval-window", window, "--dtype", eval_dtype]
            + [*vs_eager, *net, *(times if tiny else ["--repeats", "3", "--warmup", "1"]), *j("eval_case")],
            *t((60, 150)),
        ),
    ]
    for method, (crop, batch) in PAPER_CROPS.items():
        crop, batch = ((16, 16, 16), 1) if tiny else (crop, batch)
        # --tiny: RIRN with 2 students (its default, all 15, is the GPU's figure and step rirn_students').
        few = ["--set", 'method.students=["flair","t1ce"]'] if tiny and method == "rirn" else []
        # --tiny: one Mind the Gap student, AFEB at ACDIS's bottleneck only (compile time).
        few += ["--set", 'method.students=["flair"]'] if tiny and method == "mind_the_gap" else []
        few += ["--set", "method.afeb_levels=[1]"] if tiny and method == "acdis" else []
        few += TWO_LEVELS if tiny and method != "m3ae" else []
        # --tiny: M3AE's substitute image at 24^3, not a BraTS grid's 240x240x155 (36 M values to make).
        few += ["--set", "method.substitute_shape=[24,24,24]"] if tiny and method == "m3ae" else []
        # --tiny: the serving stage only (M3AE's fine-tuning, Mind the Gap's students).
        few += ["--stages", LAST_STAGE[method]] if tiny and method in LAST_STAGE else []
        result.append(
            Step(
                f"train_{method}",
                f"{method} train step at {'x'.join(map(str, crop))} batch {batch}, bfloat16",
                [*ENGINE, "--method", method, "--crop", *map(str, crop), "--batch", str(batch), *engine_net, *few]
                + ["--dtype", "bfloat16", "--no-eval", "--repeats", "1" if tiny else "5", *j(f"train_{method}")],
                *t((45, 150)),
            )
        )
    # --tiny: 1 student (train_rirn already ran 2).
    students, size = (["1"], "16") if tiny else (["1", "15"], "128")
    result.append(
        Step(
            "rirn_students",
            f"RIRN with {' and '.join(students)} students, {size}^3 batch 1, bfloat16",
            [*STUDENTS, "--students", *students, "--size", size, *engine_net, *(TWO_LEVELS if tiny else [])]
            + ["--dtype", "bfloat16"]
            + ["--repeats", "1" if tiny else "3", *j("rirn_students")],
            *t((60, 200)),
        )
    )
    result.append(  # if time is left: where each method's evaluation FLOPs go (a row per method, written as it goes)
        Step(
            "eval_flops",
            f"each method's evaluation: FLOPs per window and per subset, time on one {window}^3 window",
            [*BENCH, "--method", *eval_methods, "--what", "eval", "--size", window, "--dtype", "bfloat16", *net]
            + ["--repeats", "1" if tiny else "3", "--warmup", "1", *j("eval_flops")],
            *t((30, 240)),
        )
    )
    memory = ["--only", "baseline", "--crop", "16", "16", "16"] if tiny else ["--only", "rirn", "acdis"]
    result.append(
        Step(
            "memory",
            "XLA's memory analysis of the train step" + (" (16^3)" if tiny else " at the papers' crops: RIRN, ACDIS"),
            [*MEMORY, *memory, "--dtypes", "bfloat16", "--remat", "off", *([] if tiny else ["on"])]
            + ["--timeout", "100" if tiny else "200", *j("memory")],
            *t((60, 400)),
        )
    )
    return result


def run_step(step: Step, remaining: float, out: Path, env: dict) -> None:
    """Runs one step in its own process group, killed (the whole group) at its timeout."""
    timeout = min(step.timeout, remaining)
    log = out / "logs" / f"{step.name}.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + " ".join(step.command) + "\n")
        f.flush()
        process = subprocess.Popen(
            step.command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the step and anything it started (torch.compile's workers)
            process.wait()
            rc = None
    step.seconds = round(time.monotonic() - t0, 1)
    if rc is None:
        step.status, step.error = "timeout", f"killed after {timeout:.0f} s"
    elif rc != 0:
        step.status, step.error = "failed", f"exit {rc}: " + _tail(log)
    else:
        step.status = "ok"
    written = _result(out / "steps" / f"{step.name}.json")  # what a killed step wrote before is kept too
    step.rows = written.get("runs", written.get("rows", []))
    step.device = written.get("device")


def _result(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _tail(log: Path, lines: int = 3) -> str:
    text = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(text[-lines:])[-600:]


def probe(env: dict) -> dict:
    """The versions, asked of a child process without importing them (the devices come with the
    first step's rows: JAX starts in the steps only)."""
    code = (
        "import json, platform, importlib.metadata as m\n"
        "info = {'python': platform.python_version()}\n"
        "for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'torch', 'numpy'):\n"
        "    try: info[name] = m.version(name)\n"
        "    except m.PackageNotFoundError: info[name] = None\n"
        "print(json.dumps(info))\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _ms(seconds) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.1f}"


def _cells(row: dict) -> list[str]:
    """(what, size, dtype, JAX ms, PyTorch ms, torch/jax, TFLOP/s, MFU, notes) of a row of any step:
    `jaxbrats bench`'s, tools/bench_engine.py's, tools/bench_students.py's or tools/bench_memory.py's."""
    memory = "total_gib" in row
    what = "memory" if memory else row.get("what", "train_step")
    if row.get("method"):
        what += f" {row['method']}" + (f"/{row['stage']}" if row.get("stage") else "")
    elif "students" in row:  # tools/bench_students.py: RIRN's step
        what += " rirn"
    size = row.get("size") or row.get("crop") or []
    shape = "x".join(map(str, size)) + (f" w{row['window'][0]}" if "window" in row else "") + f" b{row.get('batch')}"
    if memory:
        shape += " remat" if row.get("remat") else ""
    jax_s = row.get("jax_s", row.get("step_s", row.get("per_case_s")))
    torch = f"{row['torch']} {_ms(row.get('torch_s'))}" if "torch_s" in row else row.get("torch_error", "")[:40]
    ratio = f"{row['ratio_torch_over_jax']:.2f}" if "ratio_torch_over_jax" in row else ""
    tflops = row.get("jax_tflops", row.get("tflops"))
    tflops = "" if tflops is None else f"{tflops:.3g}"
    mfu = f"{row['mfu']:.1%} {row['peak']}" if "mfu" in row else ""
    notes = []
    if "gflop_per_window" in row:
        notes.append(f"{row['gflop_per_window']:.3g} GFLOP/window, {row['gflop_per_subset']:.3g}/subset")
    if row.get("students"):
        notes.append(f"{row['students']} students")
    if memory:
        fits = [f"{gb} GB" for gb in (40, 80) if row.get(f"fits_{gb}gb")]
        notes.append(f"peak {row['total_gib']:g} GiB (fits {', '.join(fits) or 'neither 40 nor 80 GB'})")
    if row.get("temporaries_mib") is not None:
        notes.append(f"temp {row['temporaries_mib']:g} MiB")
    if row.get("memory_bytes"):
        notes.append(f"memory {row['memory_bytes'] / 2**30:.2f} GiB")
    if row.get("compile_s") is not None:
        notes.append(f"compile {row['compile_s']:g} s")
    if row.get("torch_note"):
        notes.append(row["torch_note"])
    return [what, shape, row.get("dtype", ""), _ms(jax_s), torch, ratio, tflops, mfu, "; ".join(notes)]


def _device(device) -> str:
    if not isinstance(device, dict):
        return "not reported (no step ran)"
    text = (
        f"{device.get('accelerator')} ({device.get('backend')}), {device.get('cpu')} ({device.get('cpu_cores')} cores)"
    )
    return text + (f", PyTorch on {device['torch_device']}" if device.get("torch_device") else "")


def markdown(result: dict) -> str:
    versions = result["versions"]
    head = [
        f"# GPU bench ({'tiny, ' if result['tiny'] else ''}{result['date']})",
        "",
        f"Device: {_device(result.get('device'))}; "
        + ", ".join(f"{k} {versions[k]}" for k in ("python", "jax", "jaxlib", "flax", "torch") if versions.get(k))
        + f". Budget {result['budget_s']:.0f} s, used {result['elapsed_s']:.0f} s.",
        "",
        "| step | status | s | what | size | dtype | JAX ms | PyTorch ms | torch/jax | TFLOP/s | MFU | notes |",
        "|---|---|---:|---|---|---|---:|---|---:|---:|---:|---|",
    ]
    for step in result["steps"]:
        lead = [step["name"], step["status"], "" if step["seconds"] is None else f"{step['seconds']:.0f}"]
        rows = step["rows"] or [{}]
        for row in rows:
            cells = _cells(row) if row else ["", "", "", "", "", "", "", "", step.get("error") or step["title"]]
            head.append("| " + " | ".join(str(c).replace("|", "/") for c in lead + cells) + " |")
    return "\n".join(head) + "\n"


def save(out: Path, result: dict, plan: list[Step], t0: float) -> None:
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    result["device"] = next((s.device for s in plan if isinstance(s.device, dict)), None)
    result["steps"] = [dataclasses.asdict(s) for s in plan]
    write_atomic(out / "gpu_bench.json", json.dumps(result, indent=1) + "\n")
    write_atomic(out / "gpu_bench.md", markdown(result))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="the folder of the results (default: $OUT)")
    parser.add_argument("--tiny", action="store_true", help="the same steps at tiny sizes (the CPU test)")
    parser.add_argument("--budget", type=float, help="seconds for all steps (default 450; --tiny: 480)")
    parser.add_argument("--only", nargs="+", metavar="STEP", help="these steps only")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("--out DIR or OUT=DIR")
    t0 = time.monotonic()
    # --tiny takes 2-3 minutes on a quiet 2-core CPU; the margin is for a loaded one.
    budget = args.budget or (480.0 if args.tiny else 450.0)
    out = Path(args.out).resolve()
    for sub in ("steps", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    plan = [s for s in steps(out, args.tiny) if not args.only or s.name in args.only]
    versions = probe(env)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "tiny": args.tiny, "budget_s": budget, "versions": versions}
    print(json.dumps(versions), flush=True)
    save(out, result, plan, t0)
    for step in plan:
        remaining = budget - (time.monotonic() - t0)
        if remaining < step.minimum:
            step.status, step.error = "skipped", f"{remaining:.0f} s left, the step needs {step.minimum:.0f}"
        else:
            print(f"[{time.monotonic() - t0:6.0f} s] {step.name}: {step.title}", flush=True)
            run_step(step, remaining, out, env)
            print(f"[{time.monotonic() - t0:6.0f} s] {step.name}: {step.status} ({step.seconds} s)", flush=True)
        save(out, result, plan, t0)
    print(markdown(result))
    print(f"wrote {out / 'gpu_bench.json'} and {out / 'gpu_bench.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
