"""tools/gpu_bench.sh --tiny end to end, as the bare GPU machine runs it: jaxbrats from source, without
grain, nibabel and tensorboardX (hidden from the import path); every step ok, one JSON and one table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HIDE = ROOT / "tests" / "support" / "hide_modules"
HIDDEN = "grain,nibabel,tensorboardX"
STEPS = [
    "train_bf16",
    "train_f32",
    "eval_case",
    "train_m3ae",
    "train_rirn",
    "train_mind_the_gap",
    "train_acdis",
    "rirn_students",
    "eval_flops",
    "memory",
]


def bare_env() -> dict:
    """This process's environment (the suite's XLA flags) with the missing packages hidden, nothing installed."""
    env = dict(os.environ, JAXBRATS_HIDE_MODULES=HIDDEN, PYTHONPATH=str(HIDE), JAX_PLATFORMS="cpu")
    env["JAXBRATS_COMPILE_CACHE"] = ""  # every program is compiled once in a run: no cache to fill
    # PyTorch's CPU threads spin while they wait: on a loaded 2-core machine its tiny steps took 20x
    # longer with 2 threads than with 1 (a 20x16x16 evaluation: 22.7 s against 0.94 s).
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_hidden_packages_cannot_be_imported():
    """The premise of the run below: with the bare environment, each hidden package fails to import."""
    pytest.importorskip("nibabel")  # installed here: hiding it is what is tested
    code = (
        "import importlib, sys\n"
        "for n in sys.argv[1:]:\n"
        "    try: importlib.import_module(n)\n"
        "    except ModuleNotFoundError: print(n)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *HIDDEN.split(",")], env=bare_env(), capture_output=True, text=True
    )
    assert done.stdout.split() == HIDDEN.split(","), done.stderr


def test_gpu_bench_tiny_runs_every_step(tmp_path):
    pytest.importorskip("torch")  # the PyTorch rows
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_bench.sh"), "--tiny"],
        env=dict(bare_env(), OUT=str(out)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((out / "logs").glob("*.log")))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + logs
    result = json.loads((out / "gpu_bench.json").read_text())
    steps = {s["name"]: s for s in result["steps"]}
    assert list(steps) == STEPS
    assert {name: s["status"] for name, s in steps.items()} == dict.fromkeys(STEPS, "ok"), logs
    assert result["versions"]["jax"] and result["device"]["backend"] == "cpu"
    rows = {name: s["rows"] for name, s in steps.items()}

    # The baseline against PyTorch eager: times, XLA's FLOPs, the precision of the peak.
    for name, dtype, peak in (("train_bf16", "bfloat16", "bf16"), ("train_f32", "float32", "fp32")):
        (row,) = rows[name]
        assert (row["what"], row["dtype"], row["peak"], row["torch"]) == ("train_step", dtype, peak, "eager")
        assert row["jax_s"] > 0 and row["torch_s"] > 0 and row["gflop"] > 0 and row["jax_tflops"] > 0
    (case,) = rows["eval_case"]
    assert case["what"] == "eval_15_subsets" and case["size"] == [20, 16, 16] and case["window"] == [16, 16, 16]
    assert case["torch_s"] > 0 and case["windows"] == 2
    assert case["gflop_per_window"] == pytest.approx(15 * case["gflop_per_subset"], rel=0.02)  # nothing shared

    # Each method's step (the serving stage at --tiny), RIRN's students, the evaluation's FLOPs, memory.
    for method in ("m3ae", "rirn", "mind_the_gap", "acdis"):
        (row,) = rows[f"train_{method}"]
        assert row["method"] == method and row["size"] == [16, 16, 16] and row["dtype"] == "bfloat16"
        assert row["step_s"] > 0 and row["gflop"] > 0
    assert [r["students"] for r in rows["rirn_students"]] == [1]
    assert all(r["step_s"] > 0 for r in rows["rirn_students"])
    (shared,) = rows["eval_flops"]  # Mind the Gap's teacher: its per-modality work is done once per window
    assert shared["method"] == "mind_the_gap" and shared["jax_s"] > 0
    assert 0 < shared["gflop_per_subset"] < shared["gflop_per_window"] < 15 * shared["gflop_per_subset"]
    (memory,) = rows["memory"]
    assert memory["total_gib"] > 0 and memory["backend"] == "cpu"

    # One table: a line per row of every step, each step named with its status.
    table = (out / "gpu_bench.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    for name in STEPS:
        assert any(line.startswith(f"| {name} | ok |") for line in lines), name
    assert len(lines) == 1 + sum(len(r) for r in rows.values())  # the header, then the rows
    assert "| eval_15_subsets mind_the_gap/teacher |" in table and "GFLOP/window" in table
