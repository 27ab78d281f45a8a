"""The command line: its contract, and errors as one line without a traceback."""

import json
import os
import subprocess
import sys

import pytest

from helpers import write_case
from jaxbrats.cli import main


def _run(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "jaxbrats.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env)


def _one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_phantom_then_prepare(tmp_path, capsys):
    assert main(["phantom", tmp_path / "raw", "--cases", "3", "--shape", "24", "20", "16", "--layout", "brats2020", "--seed", "1", "--workers", "1"]) == 0
    assert main(["prepare", tmp_path / "raw", tmp_path / "cache", "--normalize", "percentile", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "layout: brats2020" in out and "cases: 3 (flair 3, t1ce 3, t1 3, t2 3; seg 3)" in out and "3 written" in out
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["settings"]["normalization"] == "percentile" and len(index["cases"]) == 3


def test_prepare_lists_every_bad_case_and_fails(tmp_path):
    data = tmp_path / "data"
    write_case(data / "BraTS2021_00000")
    for i in (1, 2):
        write_case(data / f"BraTS2021_0000{i}", seed=i)
    (data / "BraTS2021_00001" / "BraTS2021_00001_t1.nii.gz").write_bytes(b"\x1f\x8b truncated")
    (data / "BraTS2021_00002" / "BraTS2021_00002_seg.nii.gz").unlink()
    result = _run("prepare", data, tmp_path / "cache", "--workers", "1")
    _one_line_error(result, "2 bad case(s)", "--skip-bad")
    assert "bad: case BraTS2021_00001:" in result.stdout and "BraTS2021_00001_t1.nii.gz" in result.stdout
    assert "bad: case BraTS2021_00002:" in result.stdout and "segmentation file missing" in result.stdout
    assert not (tmp_path / "cache" / "index.json").exists()
    skipped = _run("prepare", data, tmp_path / "cache", "--workers", "1", "--skip-bad")
    assert skipped.returncode == 0 and "skipped 2 bad case(s)" in skipped.stdout
    assert json.loads((tmp_path / "cache" / "index.json").read_text())["cases"] == ["BraTS2021_00000"]


def test_check_only_writes_nothing(tmp_path, capsys):
    write_case(tmp_path / "data" / "BraTS2021_00000")
    assert main(["prepare", tmp_path / "data", tmp_path / "cache", "--check-only"]) == 0
    assert "1 ok" in capsys.readouterr().out and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["prepare", "{tmp}/missing", "{tmp}/cache"], ["missing: not a directory"]),
        (["prepare", "{tmp}", "{tmp}/cache"], ["no BraTS cases found"]),
        (["phantom", "{tmp}/p", "--layout", "brats2023", "--shape", "8", "8", "8"], ["at least 16 per axis"]),
    ],
)
def test_errors_are_one_line(tmp_path, args, fragments):
    (tmp_path / "stray").mkdir()
    _one_line_error(_run(*[a.format(tmp=tmp_path) for a in args]), *fragments)


def test_demo_makes_a_batch_and_a_picture(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layout brats2023, 8 cases" in out and "image          (2, 48, 48, 48, 4)" in out
    assert (tmp_path / "batch.png").stat().st_size > 1000
