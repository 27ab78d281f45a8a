"""Each class of bad input is a real malformed file, and gives an error naming it."""

import gzip

import nibabel as nib
import numpy as np
import pytest
from helpers import SHAPE, TOKENS_2023, phantom_arrays, save, write_case

from jaxbrats.data.discovery import discover
from jaxbrats.data.loading import from_canonical, load_case, to_canonical
from jaxbrats.data.phantom import brats_affine
from jaxbrats.errors import CaseError


def _only_case(root):
    _, cases, bad = discover(root)
    assert not bad
    return cases[0]


@pytest.fixture
def case_dir(tmp_path):
    return write_case(tmp_path / "BraTS2021_00000")


def test_good_case_loads_in_ras_with_internal_labels(case_dir):
    case = load_case(_only_case(case_dir.parent))
    images, labels = phantom_arrays()
    assert case.axcodes == ("L", "P", "S") and case.convention == "brats2018"
    np.testing.assert_array_equal(case.labels, labels[::-1, ::-1, :])
    np.testing.assert_array_equal(case.images["t1ce"], images["t1ce"][::-1, ::-1, :])
    np.testing.assert_array_equal(from_canonical(case.labels, case.affine), labels)


def test_same_scan_stored_in_two_orientations_reads_the_same(tmp_path):
    lps = write_case(tmp_path / "a" / "BraTS2021_00000")
    ras = tmp_path / "b" / "BraTS2021_00000"
    for f in lps.iterdir():
        img = nib.load(f)
        canonical = nib.as_closest_canonical(img)
        save(ras / f.name, np.asanyarray(canonical.dataobj), canonical.affine)
    a, b = load_case(_only_case(lps.parent)), load_case(_only_case(ras.parent))
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.images["flair"], b.images["flair"])
    assert to_canonical(np.zeros(SHAPE), brats_affine(SHAPE)).shape == SHAPE


def _expect(case_dir, fragment, filename=None, need_labels=True):
    with pytest.raises(CaseError) as info:
        load_case(_only_case(case_dir.parent), need_labels=need_labels)
    message = str(info.value)
    assert fragment in message and case_dir.name in message
    if filename:
        assert filename in message
    assert "\n" not in message


def test_truncated_gzip(case_dir):
    f = case_dir / "BraTS2021_00000_t2.nii.gz"
    f.write_bytes(f.read_bytes()[:600])
    _expect(case_dir, "truncated or corrupt gzip", f.name)


def test_corrupt_gzip_stream(case_dir):
    f = case_dir / "BraTS2021_00000_t1.nii.gz"
    data = bytearray(f.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
    f.write_bytes(bytes(data))
    _expect(case_dir, "corrupt", f.name)


def test_not_a_nifti(case_dir):
    f = case_dir / "BraTS2021_00000_flair.nii.gz"
    f.write_bytes(gzip.compress(b"this is not an image\n" * 40))
    _expect(case_dir, "not a readable NIfTI", f.name)


def test_missing_seg_when_labels_are_needed(tmp_path):
    case_dir = write_case(tmp_path / "BraTS2021_00000", seg=False)
    _expect(case_dir, "segmentation file missing")
    assert load_case(_only_case(tmp_path), need_labels=False).labels is None


def test_shape_mismatch(case_dir):
    save(case_dir / "BraTS2021_00000_t2.nii.gz", np.ones((20, 22, 17), np.int16))
    _expect(case_dir, "shape (20, 22, 17) differs", "t2")


def test_affine_mismatch(case_dir):
    images, _ = phantom_arrays()
    affine = brats_affine(SHAPE)
    affine[0, 3] += 2.0
    save(case_dir / "BraTS2021_00000_t1ce.nii.gz", images["t1ce"], affine, np.int16)
    _expect(case_dir, "affine differs", "t1ce")


def test_different_sform_code_with_equal_affines_is_fine(case_dir):
    f = case_dir / "BraTS2021_00000_seg.nii.gz"
    img = nib.load(f)
    img = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=0)
    nib.save(img, f)
    assert load_case(_only_case(case_dir.parent)).labels is not None


@pytest.mark.parametrize("value, layout", [(5, "brats2021"), (3, "brats2021"), (4, "brats2023")])
def test_labels_outside_the_convention(tmp_path, value, layout):
    if layout == "brats2023":
        case_dir = write_case(tmp_path / "BraTS-GLI-00000-000", sep="-", tokens=TOKENS_2023, convention="brats2023")
        seg = case_dir / "BraTS-GLI-00000-000-seg.nii.gz"
    else:
        case_dir = write_case(tmp_path / "BraTS2021_00000")
        seg = case_dir / "BraTS2021_00000_seg.nii.gz"
    labels = np.asanyarray(nib.load(seg).dataobj).copy()
    labels[0, 0, 0] = value
    save(seg, labels)
    found = sorted(set(np.unique(labels).tolist()))
    _expect(case_dir, f"labels [{value}] outside the", seg.name)
    _expect(case_dir, f"(labels found {found}; `jaxbrats prepare --convention` states another")


def test_float_seg_is_rounded_and_non_integer_seg_rejected(case_dir):
    seg = case_dir / "BraTS2021_00000_seg.nii.gz"
    labels = np.asanyarray(nib.load(seg).dataobj).astype(np.float32)
    save(seg, labels + 1e-5)
    assert set(np.unique(load_case(_only_case(case_dir.parent)).labels)) <= {0, 1, 2, 3}
    save(seg, labels + 0.4)
    _expect(case_dir, "not integers", seg.name)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_an_image(case_dir, bad):
    images, _ = phantom_arrays()
    image = images["flair"].astype(np.float32)
    image[3, 4, 5] = bad
    save(case_dir / "BraTS2021_00000_flair.nii.gz", image)
    _expect(case_dir, "NaN or Inf", "flair")


def test_nan_in_a_float_seg(case_dir):
    seg = case_dir / "BraTS2021_00000_seg.nii.gz"
    labels = np.asanyarray(nib.load(seg).dataobj).astype(np.float32)
    labels[1, 1, 1] = np.nan
    save(seg, labels)
    _expect(case_dir, "labels contain NaN", seg.name)


def test_all_zero_image(case_dir):
    save(case_dir / "BraTS2021_00000_t1.nii.gz", np.zeros(SHAPE, np.int16))
    _expect(case_dir, "all zero", "t1")
