"""Grain, nibabel and tensorboardX are optional: without them (hidden by tests/support/hide_modules)
the package imports, and a command that needs one stops with one line naming it. The benchmarks'
run without them is tests/test_gpu_bench.py."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import write_case

REPO = Path(__file__).resolve().parents[1]
HIDE = REPO / "tests" / "support" / "hide_modules"
OPTIONAL = "grain,nibabel,tensorboardX"


def _run(args, hide=OPTIONAL, cwd=None):
    path = os.pathsep.join(p for p in (str(HIDE), str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, JAXBRATS_HIDE_MODULES=hide, PYTHONPATH=path, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


IMPORTS = textwrap.dedent(
    """
    import sys

    for name in ("grain", "nibabel.orientations", "tensorboardX"):
        try:
            __import__(name)
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit(f"{name} was not hidden")

    import jaxbrats
    import jaxbrats.engine.state, jaxbrats.engine.step, jaxbrats.engine.trainer
    import jaxbrats.interop.benchmark
    from jaxbrats.evaluation.program import make_case_program
    from jaxbrats.errors import MissingPackageError
    from jaxbrats.data.pipeline import PipelineConfig, make_loader
    from jaxbrats.methods import METHODS, get_method, load_config

    for name in METHODS:
        get_method(name)(load_config(None, [f"method.name='{name}'"]))
    try:
        make_loader(None, PipelineConfig())
    except MissingPackageError as e:
        assert "grain" in str(e) and "pip install grain" in str(e), e
    else:
        raise SystemExit("make_loader ran without grain")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("grain", "nibabel", "tensorboardX"))
    print("imported", loaded)
    """
)


def test_imports_without_optional_packages():
    result = _run(["-c", IMPORTS])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "imported []" in result.stdout


def _one_line_naming(result, package):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert package in lines[0] and f"pip install {package}" in lines[0], lines[0]


def test_commands_needing_nibabel_say_so(tmp_path):
    _one_line_naming(_run(["-m", "jaxbrats", "phantom", tmp_path / "phantom", "--cases", "1"]), "nibabel")
    write_case(tmp_path / "raw" / "BraTS20_Training_001")  # with nibabel, in this process
    _one_line_naming(_run(["-m", "jaxbrats", "prepare", tmp_path / "raw", tmp_path / "cache"]), "nibabel")
