"""Shared results on shared machines: everything written gets the mode the user's umask gives.

`tempfile.mkstemp`/`mkdtemp` make 0600 files and 0700 folders whatever the
umask; a lab's shared cache or results folder must be readable by the group.
And every file is written atomically (`files.write_atomic`): whole, or not at all.
"""

import gzip
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from jaxbrats import files
from jaxbrats.cli import main
from jaxbrats.data.phantom import write_phantom


@pytest.fixture
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _wrong_modes(root: Path, mask: int) -> list[str]:
    """Every folder (root included) not 0777 & ~mask and every file not 0666 & ~mask."""
    want_dir, want_file = 0o777 & ~mask, 0o666 & ~mask
    wrong = []
    for path in [root, *root.rglob("*")]:
        mode, is_dir = stat.S_IMODE(path.lstat().st_mode), path.is_dir()
        if mode != (want_dir if is_dir else want_file):
            wrong.append(f"{oct(mode)} {path.relative_to(root.parent)}")
    return wrong


@pytest.mark.parametrize("umask", [0o022, 0o027], indirect=True, ids=["umask022", "umask027"])
def test_umask_helpers(tmp_path, umask):
    assert files.current_umask() == umask and os.umask(umask) == umask  # read without changing it
    assert stat.S_IMODE(files.mkdtemp(prefix="d", dir=tmp_path).stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(files.mkstemp(prefix="f", suffix=".x", dir=tmp_path).stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize(
    "name, suffix",
    [("seg.nii.gz", ".nii.gz"), ("summary.json", ".json"), ("case.v2.json", ".json"), ("x.tar.bz2", ".tar.bz2")],
)
def test_write_atomic_keeps_a_compound_suffix_and_a_failed_write_leaves_nothing(tmp_path, name, suffix):
    """The writer sees a temporary name with the final suffix (nibabel picks the format from it);
    a write that fails leaves no file under the final name, no temporary file, and an older file
    under the final name untouched."""
    seen = []
    files.write_atomic(tmp_path / name, lambda tmp: seen.append(Path(tmp).name) or Path(tmp).write_text("new"))
    assert seen[0].startswith(".partial-") and seen[0].endswith(suffix) and not seen[0].endswith("." + suffix)
    assert files.full_suffix(seen[0]) == suffix and (tmp_path / name).read_text() == "new"

    def half_then_fail(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    for final in (tmp_path / f"fresh-{name}", tmp_path / name):  # no file yet; an older file
        with pytest.raises(OSError, match="disk full"):
            files.write_atomic(final, half_then_fail)
    assert not (tmp_path / f"fresh-{name}").exists() and (tmp_path / name).read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    with pytest.raises(FileNotFoundError):
        files.write_text_atomic(tmp_path / "missing" / name, "no such folder")  # mkstemp fails: nothing left
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_write_nifti_is_atomic_and_compresses_by_the_name(tmp_path, monkeypatch):
    """`write_nifti` goes through `files.write_atomic`: ``.nii.gz`` is gzipped, ``.nii`` and an unknown
    name (``seg``) are plain NIfTI; a failed save leaves nothing under the final name."""
    import nibabel as nib

    from jaxbrats.inference.nifti import write_nifti

    data = np.arange(64, dtype=np.uint8).reshape(4, 4, 4)
    for name, gzipped in (("seg.nii.gz", True), ("seg.nii", False), ("seg", False), ("seg.gz", True)):
        write_nifti(data, np.eye(4), tmp_path / name)
        assert ((tmp_path / name).read_bytes()[:2] == b"\x1f\x8b") == gzipped, name
        raw = (tmp_path / name).read_bytes()
        image = nib.Nifti1Image.from_bytes(gzip.decompress(raw) if gzipped else raw)
        assert np.array_equal(np.asarray(image.dataobj), data) and np.array_equal(image.affine, np.eye(4))

    def broken_save(image, path):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_nifti(data, np.eye(4), tmp_path / "other.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg", "seg.gz", "seg.nii", "seg.nii.gz"]


@pytest.mark.parametrize("umask", [0o022], indirect=True, ids=["umask022"])
def test_everything_the_cli_writes_follows_the_umask(tmp_path, umask):
    """phantom -> prepare -> train (2 steps) -> eval -> predict, and an M3AE x_sub, under umask 022."""
    from jaxbrats.engine.trainer import train
    from jaxbrats.methods.m3ae import save_substitute

    raw, cache, run, out = tmp_path / "raw", tmp_path / "cache", tmp_path / "run", tmp_path / "out"
    write_phantom(raw, 3, (16, 16, 16), layout="brats2023", seed=1, workers=1)
    assert main(["prepare", str(raw), str(cache), "--workers", "1"]) == 0
    assert (
        main(["prepare", str(raw), str(cache), "--workers", "1", "--normalize", "percentile"]) == 0
    )  # entries replaced
    train(
        tiny_config("stages.train.steps=2", "data.workers=0", "model.widths=[8,8,8]", "model.blocks=[1,1,1]"),
        run,
        cache,
    )
    assert (
        main(["eval", "--workdir", str(run), "--data", str(cache), "--out", str(out / "eval"), "--predictions", "full"])
        == 0
    )
    case = min(p for p in raw.iterdir() if p.is_dir())
    assert main(["predict", "--workdir", str(run), "--case", str(case), "--out", str(out / "pred" / "seg.nii.gz")]) == 0
    save_substitute(np.random.default_rng(0).normal(size=(8, 8, 8, 4)).astype(np.float32), out / "x_sub")

    assert list((out / "eval" / "predictions").glob("*.nii.gz")) and list((run / "checkpoints" / "train").glob("2/*"))
    assert (out / "pred" / "seg.nii.gz").is_file() and (out / "x_sub" / "x_sub.png").is_file()
    assert not list(cache.glob("cases/.partial-*"))
    wrong = [w for root in (cache, run, out) for w in _wrong_modes(root, umask)]
    assert not wrong, wrong


@pytest.mark.parametrize("umask", [0o027], indirect=True, ids=["umask027"])
def test_cache_and_predictions_follow_a_group_umask(tmp_path, umask):
    """Under umask 027 (group may read, others nothing): 0640 files, 0750 folders."""
    from jaxbrats.inference.nifti import write_nifti
    from jaxbrats.methods.m3ae import save_substitute

    raw, cache, out = tmp_path / "raw", tmp_path / "cache", tmp_path / "out"
    write_phantom(raw, 2, (16, 16, 16), layout="brats2020", seed=2, workers=1)
    assert main(["prepare", str(raw), str(cache), "--workers", "1"]) == 0
    write_nifti(np.zeros((4, 4, 4), np.uint8), np.eye(4), out / "seg.nii.gz")
    save_substitute(np.zeros((8, 8, 8, 4), np.float32), out / "x_sub")
    wrong = [w for root in (cache, out) for w in _wrong_modes(root, umask)]
    assert not wrong, wrong


@pytest.mark.parametrize("umask", [0o022], indirect=True, ids=["umask022"])
def test_phantom_follows_the_umask(tmp_path, umask):
    write_phantom(tmp_path / "raw", 1, (16, 16, 16), layout="brats2023", seed=0, workers=1)
    assert not _wrong_modes(tmp_path / "raw", umask)
