"""The cache: normalisation, cropping, idempotence and crash safety."""

import json
import pickle
import warnings

import numpy as np
import pytest
from helpers import write_case

import jaxbrats.data.cache as cache_module
from jaxbrats.data.cache import CacheDataset
from jaxbrats.data.preprocess import NORMALIZATIONS, brain_bbox, normalize, prepare_dataset
from jaxbrats.errors import JaxbratsError


def test_brain_bbox_with_margin_is_clipped():
    mask = np.zeros((10, 12, 8), bool)
    mask[3:5, 0:2, 6:8] = True
    np.testing.assert_array_equal(brain_bbox(mask, 2), [[1, 7], [0, 4], [4, 8]])


def test_zscore_and_percentile_against_numpy():
    rng = np.random.default_rng(0)
    image = rng.gamma(2.0, 100.0, (8, 8, 8)).astype(np.float32)
    brain = np.zeros(image.shape, bool)
    brain[1:7, 1:7, 1:7] = True
    out, stats = normalize(image, brain, "zscore")
    assert abs(out[brain].mean()) < 1e-5 and abs(out[brain].std() - 1) < 1e-4 and not out[~brain].any()
    assert stats["mean"] == pytest.approx(image[brain].mean(), rel=1e-6)
    out, stats = normalize(image, brain, "percentile")
    lo, hi = np.percentile(image[brain], [1, 99])
    np.testing.assert_allclose(out[brain], (np.clip(image[brain], lo, hi) - lo) / (hi - lo), rtol=1e-5, atol=1e-6)
    assert out.min() == 0 and out.max() == pytest.approx(1)


def test_minmax_maps_the_brain_range_onto_minus_one_to_one():
    rng = np.random.default_rng(0)
    image = rng.gamma(2.0, 100.0, (8, 8, 8)).astype(np.float32)
    brain = np.zeros(image.shape, bool)
    brain[1:7, 1:7, 1:7] = True
    image[~brain] = 1e4  # outside the brain: neither the range nor the output
    out, stats = normalize(image, brain, "minmax")
    lo, hi = float(image[brain].min()), float(image[brain].max())
    assert stats == {"min": lo, "max": hi}
    assert out.dtype == np.float32 and out[brain].min() == -1 and out[brain].max() == 1  # attained, exactly
    np.testing.assert_allclose(out[brain], 2 * (image[brain] - lo) / (hi - lo) - 1, rtol=1e-5, atol=1e-6)
    assert not out[~brain].any()


def test_minmax_of_a_modality_constant_over_the_brain_is_zero():
    image = np.full((6, 6, 6), 3.0, np.float32)
    brain = np.zeros(image.shape, bool)
    brain[1:5, 1:5, 1:5] = True
    image[~brain] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division by zero, no invalid value
        out, stats = normalize(image, brain, "minmax")
    assert stats == {"min": 3.0, "max": 3.0}
    assert np.isfinite(out).all() and not out.any()


def test_cli_offers_every_normalization():
    from jaxbrats.cli import build_parser

    parser = build_parser()
    for name in NORMALIZATIONS:
        assert parser.parse_args(["prepare", "data", "cache", "--normalize", name]).normalize == name
    with pytest.raises(SystemExit):
        parser.parse_args(["prepare", "data", "cache", "--normalize", "unknown"])


def test_prepare_minmax_from_the_cli(tmp_path, capsys):
    from jaxbrats.cli import main

    data, cache = tmp_path / "data", tmp_path / "cache"
    write_case(data / "BraTS2021_00000", skip=("t1",))
    write_case(data / "BraTS2021_00001", seed=1)
    assert main(["prepare", str(data), str(cache), "--normalize", "minmax", "--workers", "1"]) == 0
    assert "2 written" in capsys.readouterr().out
    assert json.loads((cache / "index.json").read_text())["settings"]["normalization"] == "minmax"
    dataset = CacheDataset(cache)
    for i, manifest in enumerate(dataset.manifests):
        assert manifest["settings"]["normalization"] == "minmax" and manifest["normalization"]["method"] == "minmax"
        image = np.asarray(dataset.arrays(i)["image"])
        assert image.min() >= -1 and image.max() <= 1
        for c, present in enumerate(manifest["present"]):
            stats = manifest["normalization"]["stats"]
            if not present:
                assert not image[..., c].any()  # the missing modality: zeros
                continue
            modality = manifest["modalities"][c]
            assert set(stats[modality]) == {"min", "max"} and stats[modality]["min"] < stats[modality]["max"]
            assert image[..., c].min() == -1 and image[..., c].max() == 1
    # Another normalisation is another setting: the entries are rebuilt, and rebuilt again on the way back.
    assert set(
        prepare_dataset(data, cache, normalization="zscore", workers=1, progress=False)["prepared"].values()
    ) == {"written"}
    assert set(
        prepare_dataset(data, cache, normalization="minmax", workers=1, progress=False)["prepared"].values()
    ) == {"written"}
    assert set(
        prepare_dataset(data, cache, normalization="minmax", workers=1, progress=False)["prepared"].values()
    ) == {"cached"}


def test_cache_entries_describe_the_case(phantom_dir, phantom_cache):
    dataset = CacheDataset(phantom_cache)
    assert len(dataset) == 6 and dataset.index["layout"] == "brats2023"
    manifest = dataset.manifests[0]
    arrays = dataset.arrays(0)
    assert arrays["image"].dtype == np.float32 and arrays["image"].shape == tuple(manifest["cropped_shape"]) + (4,)
    assert arrays["label"].dtype == np.uint8 and set(np.unique(arrays["label"])) <= {0, 1, 2, 3}
    assert isinstance(arrays["image"], np.memmap)
    box = np.array(manifest["crop_box"])
    assert (box[:, 0] >= 0).all() and (box[:, 1] <= manifest["original_shape"]).all()
    assert manifest["present"] == [True] * 4 and manifest["label_convention"] == "brats2023"
    assert sum(manifest["region_voxels_lost_by_crop"].values()) == 0
    fg = arrays["foreground"]
    assert (arrays["label"][fg[:, 1], fg[:, 2], fg[:, 3]] == fg[:, 0]).all()
    restored = pickle.loads(pickle.dumps(dataset))
    assert restored._arrays == {} and restored.arrays(0)["image"].shape == arrays["image"].shape


def test_prepare_is_idempotent_and_redoes_changed_cases(tmp_path):
    data = tmp_path / "data"
    write_case(data / "BraTS2021_00000")
    write_case(data / "BraTS2021_00001", seed=1)
    cache = tmp_path / "cache"
    first = prepare_dataset(data, cache, workers=1, progress=False)
    assert set(first["prepared"].values()) == {"written"}
    image = cache / "cases" / "BraTS2021_00000" / "image.npy"
    mtime = image.stat().st_mtime_ns
    second = prepare_dataset(data, cache, workers=1, progress=False)
    assert set(second["prepared"].values()) == {"cached"} and image.stat().st_mtime_ns == mtime
    write_case(data / "BraTS2021_00001", seed=2)  # the source changed
    third = prepare_dataset(data, cache, workers=1, progress=False)
    assert third["prepared"] == {"BraTS2021_00000": "cached", "BraTS2021_00001": "written"}
    fourth = prepare_dataset(data, cache, normalization="percentile", workers=1, progress=False)
    assert set(fourth["prepared"].values()) == {"written"}


def test_recovery_after_a_kill_mid_write(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for i in range(3):
        write_case(data / f"BraTS2021_0000{i}", seed=i)
    reference = tmp_path / "reference"
    prepare_dataset(data, reference, workers=1, progress=False)

    cache = tmp_path / "cache"
    calls = {"n": 0}
    real_save = np.save

    def dying_save(path, array):  # the process dies while writing the second case
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        real_save(path, array)

    monkeypatch.setattr(cache_module.np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(data, cache, workers=1, progress=False)
    monkeypatch.setattr(cache_module.np, "save", real_save)
    # A hard kill skips the cleanup: leave a partial directory behind as it would.
    (cache / "cases" / ".partial-BraTS2021_00001-xyz").mkdir()
    (cache / "cases" / ".partial-BraTS2021_00001-xyz" / "image.npy").write_bytes(b"\x93NUMPY")
    assert sorted(p.name for p in (cache / "cases").iterdir() if not p.name.startswith(".")) == ["BraTS2021_00000"]
    with pytest.raises(JaxbratsError, match="index.json: missing"):
        CacheDataset(cache)

    report = prepare_dataset(data, cache, workers=1, progress=False)
    assert report["prepared"] == {
        "BraTS2021_00000": "cached",
        "BraTS2021_00001": "written",
        "BraTS2021_00002": "written",
    }
    assert not list((cache / "cases").glob(".partial-*"))
    got, want = CacheDataset(cache), CacheDataset(reference)
    for i in range(3):
        for key in ("image", "label", "foreground"):
            np.testing.assert_array_equal(got.arrays(i)[key], want.arrays(i)[key])


def test_entry_without_manifest_is_not_read_as_valid(phantom_cache, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(phantom_cache, cache)
    case = sorted((cache / "cases").iterdir())[0]
    (case / "manifest.json").unlink()
    with pytest.raises(JaxbratsError, match="manifest.json: missing"):
        CacheDataset(cache)


def test_bad_cases_block_the_index_unless_skipped(tmp_path):
    data = tmp_path / "data"
    write_case(data / "BraTS2021_00000")
    bad = write_case(data / "BraTS2021_00001", seed=1)
    (bad / "BraTS2021_00001_t2.nii.gz").write_bytes(b"broken")
    write_case(data / "BraTS2021_00002", seed=2, seg=False)
    report = prepare_dataset(data, tmp_path / "cache", workers=1, progress=False)
    assert len(report["errors"]) == 2 and not (tmp_path / "cache" / "index.json").exists()
    report = prepare_dataset(data, tmp_path / "cache", skip_bad=True, workers=1, progress=False)
    assert CacheDataset(tmp_path / "cache").case_ids == ["BraTS2021_00000"]
    prepare_dataset(data, tmp_path / "cache", workers=1, progress=False)  # fails again: the old index goes
    assert not (tmp_path / "cache" / "index.json").exists()


def test_case_with_a_missing_modality_is_cached_with_zeros(tmp_path):
    write_case(tmp_path / "data" / "BraTS2021_00000", skip=("t1",))
    prepare_dataset(tmp_path / "data", tmp_path / "cache", workers=1, progress=False)
    dataset = CacheDataset(tmp_path / "cache")
    assert dataset.manifests[0]["present"] == [True, True, False, True]
    assert not dataset.arrays(0)["image"][..., 2].any()


def _all_bad(data):
    """A dataset whose two cases are both bad: a truncated image, a missing seg."""
    write_case(data / "BraTS2021_00001", seed=1)
    (data / "BraTS2021_00001" / "BraTS2021_00001_t1.nii.gz").write_bytes(b"\x1f\x8b truncated")
    write_case(data / "BraTS2021_00002", seed=2, seg=False)
    return data


def test_skip_bad_with_every_case_bad_writes_no_index(tmp_path):
    data, cache = _all_bad(tmp_path / "data"), tmp_path / "cache"
    report = prepare_dataset(data, cache, skip_bad=True, workers=1, progress=False)
    assert report["prepared"] == {} and len(report["errors"]) == 2
    assert not (cache / "index.json").exists() and not list(cache.glob("cases/*"))
    # An older, valid index of the same cache does not survive a run that leaves no usable case.
    write_case(tmp_path / "good" / "BraTS2021_00000")
    prepare_dataset(tmp_path / "good", cache, workers=1, progress=False)
    assert CacheDataset(cache).case_ids == ["BraTS2021_00000"]
    prepare_dataset(data, cache, skip_bad=True, workers=1, progress=False)
    with pytest.raises(JaxbratsError, match="index.json: missing"):
        CacheDataset(cache)


def test_cli_skip_bad_with_every_case_bad_fails_in_one_line(tmp_path):
    from test_cli import _one_line_error, _run

    data, cache = _all_bad(tmp_path / "data"), tmp_path / "cache"
    result = _run("prepare", data, cache, "--workers", "1", "--skip-bad")
    _one_line_error(result, str(data), "every case is bad (2 of 2)", "no index written")
    assert "bad: case BraTS2021_00001:" in result.stdout and "bad: case BraTS2021_00002:" in result.stdout
    assert "skipped" not in result.stdout and not (cache / "index.json").exists()
    checked = _run("prepare", data, "--check-only", "--workers", "1", "--skip-bad")
    _one_line_error(checked, "every case is bad (2 of 2)")
