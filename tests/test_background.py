"""The brain is what differs from each modality's background: 0, or the constant that fills the border."""

import io

import nibabel as nib
import numpy as np
import pytest
from helpers import write_case
from scipy import ndimage

from jaxbrats.data.cache import CacheDataset
from jaxbrats.data.discovery import discover
from jaxbrats.data.loading import load_case
from jaxbrats.data.preprocess import brain_bbox, find_background, normalize, prepare_dataset
from jaxbrats.modalities import MODALITIES

CASE = "BraTS2021_00000"


def _loaded(data_dir):
    _, records, bad = discover(data_dir)
    assert not bad
    return {r.case_id: load_case(r) for r in records}


def _rewrite(case_dir, modality, change):
    """Replace one modality file by `change(data)` saved as float32 in the same geometry."""
    path = case_dir / f"{case_dir.name}_{modality}.nii.gz"
    image = nib.load(path)
    nib.save(nib.Nifti1Image(change(np.asarray(image.dataobj, np.float32)).astype(np.float32), image.affine), path)


def _only_case(cache):
    dataset = CacheDataset(cache)
    return np.asarray(dataset.arrays(0)["image"]), dataset.manifests[0]


def test_find_background_is_the_border_constant_or_zero():
    volume = np.full((12, 10, 8), -3.62, np.float32)
    volume[3:9, 3:7, 2:6] = 5.0
    assert find_background(volume) == pytest.approx(-3.62)
    volume[0, 1:9, :] = 7.0  # brain on 64 of 480 border voxels (13 %): not a background any more
    assert find_background(volume) == 0.0
    rng = np.random.default_rng(0)
    assert find_background(rng.normal(100, 5, (10, 10, 10))) == 0.0  # raw scan: noisy background
    ringing = np.zeros((12, 10, 8), np.float32)
    ringing[3:9, 3:7, 2:6] = 100.0
    ringing[2, 3:7, 2:6] = -40.0  # negative ringing next to the brain: the minimum, not the background
    assert find_background(ringing) == 0.0


def test_ordinary_zero_background_gives_the_historical_cache_byte_for_byte(phantom_dir, phantom_cache):
    """The phantom (skull-stripped, background exactly 0): brain = any modality != 0, as before the detection."""
    loaded = _loaded(phantom_dir)
    dataset = CacheDataset(phantom_cache)
    for i, case_id in enumerate(dataset.case_ids):
        case, manifest = loaded[case_id], dataset.manifests[i]
        brain = np.zeros(case.shape, bool)
        for image in case.images.values():
            brain |= image != 0
        box = brain_bbox(brain, 4)
        crop = tuple(slice(lo, hi) for lo, hi in box)
        want = np.zeros(brain[crop].shape + (4,), np.float32)
        for c, modality in enumerate(MODALITIES):
            want[..., c] = normalize(case.images[modality][crop], brain[crop], "zscore")[0]
        buffer = io.BytesIO()
        np.save(buffer, want)
        assert (phantom_cache / "cases" / case_id / "image.npy").read_bytes() == buffer.getvalue()
        assert manifest["crop_box"] == box.tolist()
        assert manifest["background"] == {m: 0.0 for m in MODALITIES}


@pytest.mark.parametrize("normalization", ["zscore", "percentile"])
def test_constant_nonzero_background_is_not_brain(tmp_path, normalization):
    """z-scored FLAIR and T1ce whose background is a constant (-mean/std): same crop and cache as the source."""
    source = write_case(tmp_path / "source" / CASE)
    derived = write_case(tmp_path / "derived" / CASE)
    backgrounds = {}
    for modality in ("flair", "t1ce"):
        data = np.asarray(nib.load(source / f"{CASE}_{modality}.nii.gz").dataobj, np.float32)
        mean, std = data[data != 0].mean(), data[data != 0].std()
        backgrounds[modality] = float(np.float32((np.float32(0) - mean) / std))
        _rewrite(derived, modality, lambda x, mean=mean, std=std: (x - mean) / std)
    case = _loaded(tmp_path / "derived")[CASE]
    assert all(case.images[m][0, 0, 0] == pytest.approx(backgrounds[m]) for m in backgrounds)
    everything = np.zeros(case.shape, bool)
    for image in case.images.values():
        everything |= image != 0
    assert everything.all()  # the rule `x != 0` took every voxel for brain: no crop

    prepare_dataset(
        tmp_path / "source", tmp_path / "cache_source", normalization=normalization, margin=1, workers=1, progress=False
    )
    prepare_dataset(
        tmp_path / "derived",
        tmp_path / "cache_derived",
        normalization=normalization,
        margin=1,
        workers=1,
        progress=False,
    )
    want, want_manifest = _only_case(tmp_path / "cache_source")
    got, manifest = _only_case(tmp_path / "cache_derived")
    assert manifest["background"] == pytest.approx({**backgrounds, "t1": 0.0, "t2": 0.0}, rel=1e-6)
    assert manifest["crop_box"] == want_manifest["crop_box"]
    assert np.prod(manifest["cropped_shape"]) < np.prod(case.shape)  # cropped to the brain
    np.testing.assert_allclose(got, want, atol=2e-5)

    # The statistics are over brain voxels only: the source's brain, seen in the derived image.
    brain = np.zeros(case.shape, bool)
    for image in _loaded(tmp_path / "source")[CASE].images.values():
        brain |= image != 0
    crop = tuple(slice(lo, hi) for lo, hi in manifest["crop_box"])
    stats = manifest["normalization"]["stats"]
    for c, modality in enumerate(MODALITIES):
        voxels = case.images[modality][brain]
        if normalization == "zscore":
            assert stats[modality]["mean"] == pytest.approx(voxels.mean(), rel=1e-5, abs=1e-5)
            assert stats[modality]["std"] == pytest.approx(voxels.std(), rel=1e-5)
            assert abs(got[..., c][brain[crop]].mean()) < 1e-4 and got[..., c][brain[crop]].std() == pytest.approx(
                1, rel=1e-4
            )
        else:
            lo, hi = np.percentile(voxels, [1, 99])
            assert (stats[modality]["p1"], stats[modality]["p99"]) == pytest.approx((lo, hi), rel=1e-5, abs=1e-5)
        assert not got[..., c][~brain[crop]].any()  # background set to 0 after normalisation


def test_negative_ringing_at_the_brain_edge_keeps_a_zero_background(tmp_path):
    """Skull-stripped images with a shell of negative values just outside the brain: the background stays 0."""
    case_dir = write_case(tmp_path / "data" / CASE)
    source = _loaded(tmp_path / "data")[CASE]
    brain = np.zeros(source.shape, bool)
    for image in source.images.values():
        brain |= image != 0
    for modality in ("flair", "t2"):

        def ring(x):
            inside = x != 0
            shell = ndimage.binary_dilation(inside) & ~inside
            return np.where(shell, -0.08 * x.max(), x)  # undershoot of the brain edge

        _rewrite(case_dir, modality, ring)
    case = _loaded(tmp_path / "data")[CASE]
    ringing = np.zeros(case.shape, bool)
    for modality in ("flair", "t2"):
        ringing |= case.images[modality] < 0
    assert ringing.any() and not (ringing & brain).any()

    prepare_dataset(tmp_path / "data", tmp_path / "cache", workers=1, progress=False)
    got, manifest = _only_case(tmp_path / "cache")
    assert manifest["background"] == {m: 0.0 for m in MODALITIES}  # not the ringing's minimum
    expected = brain | ringing  # the ringing shell is counted with the brain, like any value != background
    assert manifest["crop_box"] == brain_bbox(expected, 4).tolist()
    crop = tuple(slice(lo, hi) for lo, hi in manifest["crop_box"])
    for c, modality in enumerate(MODALITIES):
        voxels = case.images[modality][expected]
        stats = manifest["normalization"]["stats"][modality]
        assert stats["mean"] == pytest.approx(voxels.mean(), rel=1e-5) and stats["std"] == pytest.approx(
            voxels.std(), rel=1e-5
        )
        assert not got[..., c][~expected[crop]].any()


def test_constant_image_is_a_bad_case(tmp_path):
    case_dir = write_case(tmp_path / "data" / CASE)
    _rewrite(case_dir, "t1ce", lambda x: np.full_like(x, -3.62))
    report = prepare_dataset(tmp_path / "data", tmp_path / "cache", workers=1, progress=False)
    assert (
        len(report["errors"]) == 1
        and f"{CASE}_t1ce.nii.gz: image is constant (-3.62 everywhere)" in report["errors"][0]
    )
    assert not (tmp_path / "cache" / "index.json").exists()
