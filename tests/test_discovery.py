import pytest
from helpers import TOKENS_2018, TOKENS_2023, write_case

from jaxbrats.data.discovery import discover
from jaxbrats.data.loading import load_case
from jaxbrats.errors import JaxbratsError


def test_brats2018_hgg_lgg(tmp_path):
    write_case(tmp_path / "HGG" / "Brats18_2013_2_1")
    write_case(tmp_path / "LGG" / "Brats18_2013_0_1")
    layout, cases, bad = discover(tmp_path)
    assert layout == "brats2018" and not bad
    assert [c.case_id for c in cases] == ["Brats18_2013_0_1", "Brats18_2013_2_1"]
    assert all(c.convention == "brats2018" and c.present == (True,) * 4 and c.seg for c in cases)


def test_brats2020_with_uncompressed_files_and_misnamed_seg(tmp_path):
    write_case(tmp_path / "BraTS20_Training_001", ext=".nii")
    case = write_case(tmp_path / "BraTS20_Training_355", seg=False)
    write_case(tmp_path / "tmp355", case_id="W39_1998.09.19", sep="_", tokens={}, seg=True)
    (tmp_path / "tmp355" / "W39_1998.09.19_seg.nii.gz").rename(case / "W39_1998.09.19_Segm.nii")
    (tmp_path / "tmp355").rmdir()
    layout, cases, bad = discover(tmp_path)
    assert layout == "brats2020" and not bad
    assert cases[0].images["flair"].name == "BraTS20_Training_001_flair.nii"
    assert cases[1].seg.name == "W39_1998.09.19_Segm.nii"


def test_brats2021(tmp_path):
    write_case(tmp_path / "BraTS2021_00000")
    layout, cases, _ = discover(tmp_path)
    assert layout == "brats2021" and cases[0].convention == "brats2018"


def test_brats2023_with_a_missing_modality(tmp_path):
    write_case(tmp_path / "BraTS-GLI-00000-000", sep="-", tokens=TOKENS_2023, convention="brats2023")
    write_case(tmp_path / "BraTS-GLI-00001-000", sep="-", tokens=TOKENS_2023, convention="brats2023", skip=("t1ce",))
    layout, cases, bad = discover(tmp_path)
    assert layout == "brats2023" and not bad
    assert cases[0].images["flair"].name.endswith("-t2f.nii.gz")
    assert cases[1].present == (True, False, True, True)


def test_plain_one_folder_per_case(tmp_path):
    write_case(tmp_path / "patient_a", case_id="x", sep="", tokens={m: m for m in TOKENS_2018})
    for f in (tmp_path / "patient_a").iterdir():
        f.rename(f.with_name(f.name[1:]))  # "xflair.nii.gz" -> "flair.nii.gz"
    layout, cases, _ = discover(tmp_path)
    assert layout == "plain" and cases[0].convention is None
    assert sorted(cases[0].images) == sorted(TOKENS_2018)
    loaded = load_case(cases[0])  # the seg's values (4 for ET) decide the convention
    assert loaded.convention == "brats2018" and loaded.labels.max() == 3


def test_duplicate_case_ids_are_reported(tmp_path):
    write_case(tmp_path / "HGG" / "Brats18_X")
    write_case(tmp_path / "LGG" / "Brats18_X")
    _, cases, bad = discover(tmp_path)
    assert len(cases) == 1 and len(bad) == 1 and "duplicate case id" in str(bad[0])


def test_duplicate_modality_files_are_reported(tmp_path):
    case = write_case(tmp_path / "BraTS2021_00001")
    (case / "BraTS2021_00001_t1ce.nii.gz").rename(case / "BraTS2021_00001_t1c.nii.gz")
    write_case(tmp_path / "BraTS2021_00001", skip=("flair", "t1", "t2"), seg=False)
    _, cases, bad = discover(tmp_path)
    assert not cases and "second t1ce file" in str(bad[0])


def test_empty_and_unrecognised_directories(tmp_path):
    with pytest.raises(JaxbratsError, match="empty directory"):
        discover(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hi")
    with pytest.raises(JaxbratsError, match="no BraTS cases found"):
        discover(tmp_path)
    with pytest.raises(JaxbratsError, match="not a directory"):
        discover(tmp_path / "missing")
