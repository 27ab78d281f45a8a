import nibabel as nib
import numpy as np
import pytest
from helpers import phantom_arrays
from scipy import ndimage

from jaxbrats.data.discovery import discover
from jaxbrats.data.phantom import write_phantom
from jaxbrats.labels import EDEMA, ENHANCING, NECROSIS


def test_deterministic_per_seed():
    a, la = phantom_arrays(seed=5)
    b, lb = phantom_arrays(seed=5)
    c, _ = phantom_arrays(seed=6)
    np.testing.assert_array_equal(la, lb)
    for m in a:
        np.testing.assert_array_equal(a[m], b[m])
    assert not np.array_equal(a["flair"], c["flair"])


@pytest.mark.parametrize("seed", [1, 7])
def test_contrasts_follow_mri_physics(seed):
    images, labels = phantom_arrays(seed=seed, shape=(64, 64, 64))
    brain = images["t1"] > 0
    normal = ndimage.binary_erosion(brain & (labels == 0), iterations=2)

    def mean(modality, label):
        # Eroded masks: the class's own intensity, not the partial-volume border.
        core = ndimage.binary_erosion(labels == label)
        assert core.sum() >= 5, f"seed {seed}: too few voxels of label {label}"
        return images[modality][core].mean() / images[modality][normal].mean()

    # The enhancing rim stands out in T1ce only.
    assert mean("t1ce", ENHANCING) > 1.3 * max(mean("t1ce", EDEMA), mean("t1ce", NECROSIS), 1.0)
    for modality in ("flair", "t1", "t2"):
        assert mean(modality, ENHANCING) < 1.1 * max(mean(modality, EDEMA), 1.0)
    # Edema is bright in FLAIR and T2; necrosis is dark in T1 and T1ce.
    assert mean("flair", EDEMA) > 1.4 and mean("t2", EDEMA) > 1.4
    assert mean("t1", NECROSIS) < 0.6 and mean("t1ce", NECROSIS) < 0.6
    # Skull-stripped: exact zeros outside the brain, the same brain in every modality.
    for image in images.values():
        np.testing.assert_array_equal(image > 0, brain)


def test_csf_is_bright_in_t2_and_dark_in_flair():
    images, labels = phantom_arrays(seed=2, shape=(48, 48, 48))
    normal = (images["t2"] > 0) & (labels == 0)
    ratio = (
        images["t2"][normal] / images["t2"][normal].mean() - images["flair"][normal] / images["flair"][normal].mean()
    )
    csf_like = ratio > 1.0  # far brighter in T2 than in FLAIR
    assert csf_like.mean() > 0.02


@pytest.mark.parametrize(
    "layout, values, dtype", [("brats2020", {0, 1, 2, 4}, np.uint8), ("brats2023", {0, 1, 2, 3}, np.float32)]
)
def test_written_files_follow_the_release(tmp_path, layout, values, dtype):
    ids = write_phantom(tmp_path, 2, (24, 20, 16), layout=layout, seed=0, workers=1)
    found_layout, cases, bad = discover(tmp_path)
    assert found_layout == layout and [c.case_id for c in cases] == ids and not bad
    seg = nib.load(cases[0].seg)
    assert seg.get_data_dtype() == dtype and seg.shape == (24, 20, 16)
    assert nib.aff2axcodes(seg.affine) == ("L", "P", "S")
    assert set(np.unique(np.asanyarray(seg.dataobj)).astype(int).tolist()) <= values
    assert nib.load(cases[0].images["t1ce"]).get_data_dtype() == np.int16
    assert not list(tmp_path.glob(".partial-*"))
