"""Layouts beyond the BraTS releases (MSD Task01, nnU-Net v2) and the BraTS 2013-2016 label convention.

Every dataset is written here from the layouts' own descriptions (tests/helpers.py); expected
labels and regions are computed from those descriptions, not from jaxbrats.labels.
"""

import json

import nibabel as nib
import numpy as np
import pytest
from helpers import (
    MSD_LABELS,
    MSD_MODALITY,
    NNUNET_CHANNELS,
    NNUNET_LABELS,
    brats2013_seg,
    phantom_arrays,
    save,
    write_case,
    write_msd,
    write_nnunetv2,
    write_plain_case,
)
from test_cli import _one_line_error, _run

from jaxbrats.data.cache import CacheDataset
from jaxbrats.data.discovery import discover
from jaxbrats.data.loading import load_case
from jaxbrats.data.preprocess import check_dataset, prepare_dataset
from jaxbrats.errors import CaseError, JaxbratsError
from jaxbrats.labels import regions_of


def _ras(array):
    return array[::-1, ::-1, :]  # the helpers' LPS affine -> RAS+


def _regions(seg, wt, tc, et):
    """WT, TC, ET masks of a source seg from the value sets a convention defines."""
    return np.stack([np.isin(seg, list(values)) for values in (wt, tc, et)], axis=-1)


# The datasets' regions from their label names: 1 edema, 2 non-enhancing tumour, 3 enhancing.
EDEMA_FIRST_REGIONS = ({1, 2, 3}, {2, 3}, {3})
BRATS2013_REGIONS = ({1, 2, 3, 4}, {1, 3, 4}, {4})


def _check_loaded(case, seed, channel_modalities, regions):
    images, _ = phantom_arrays(seed)
    assert sorted(case.images) == sorted(channel_modalities)
    for modality in channel_modalities:
        np.testing.assert_array_equal(case.images[modality], _ras(images[modality]))
    seg = np.asarray(nib.load(case.record.seg).dataobj)
    np.testing.assert_array_equal(regions_of(case.labels), _ras(_regions(seg, *regions)))


def test_msd_detected_4d_image_split_into_modalities(tmp_path):
    write_msd(tmp_path, cases=2, test_cases=1)
    layout, cases, bad = discover(tmp_path)
    assert layout == "msd" and not bad and [c.case_id for c in cases] == ["BRATS_001", "BRATS_002"]
    record = cases[0]
    assert set(record.images.values()) == {tmp_path / "imagesTr" / "BRATS_001.nii.gz"}
    assert record.channels == {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3} and record.num_channels == 4
    assert record.seg == tmp_path / "labelsTr" / "BRATS_001.nii.gz"
    assert record.convention == "msd:0=0,1=2,2=1,3=3"  # edema 1 -> 2, non-enhancing 2 -> 1, enhancing 3 -> 3
    assert record.files == [record.images["flair"], record.seg, tmp_path / "dataset.json"]
    for seed, record in enumerate(cases):
        _check_loaded(load_case(record), seed, ["flair", "t1ce", "t1", "t2"], EDEMA_FIRST_REGIONS)
    # imagesTs (no labels) is listed only when labels are not needed
    _, with_test, _ = discover(tmp_path, need_labels=False)
    assert [c.case_id for c in with_test] == ["BRATS_001", "BRATS_002", "BRATS_003"] and with_test[2].seg is None
    assert load_case(with_test[2], need_labels=False).labels is None


def test_msd_with_three_channels_and_without_case_lists(tmp_path):
    modality = {"0": "flair", "1": "T2w", "2": "T1w"}
    write_msd(tmp_path, cases=1, modality=modality, lists=False)
    (tmp_path / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    layout, cases, bad = discover(tmp_path)
    assert layout == "msd" and not bad and len(cases) == 1
    assert cases[0].present == (True, False, True, True)  # flair, t1ce, t1, t2: no t1ce in this dataset
    assert cases[0].channels == {"flair": 0, "t2": 1, "t1": 2} and cases[0].num_channels == 3
    _check_loaded(load_case(cases[0]), 0, ["flair", "t2", "t1"], EDEMA_FIRST_REGIONS)


def test_msd_4d_image_is_checked_per_channel(tmp_path):
    write_msd(tmp_path, cases=1)
    image_path = tmp_path / "imagesTr" / "BRATS_001.nii.gz"
    image = nib.load(image_path)
    data = np.asarray(image.dataobj).copy()

    def expect(fragment):
        _, cases, _ = discover(tmp_path)
        with pytest.raises(CaseError) as info:
            load_case(cases[0])
        message = str(info.value)
        assert "BRATS_001" in message and fragment in message and "\n" not in message
        return message

    save(image_path, data[..., :3], image.affine)
    assert "BRATS_001.nii.gz" in expect("expected a 4D image of 4 channels (dataset.json), got shape (20, 22, 18, 3)")
    bad = data.copy()
    bad[2, 3, 4, 2] = np.nan
    save(image_path, bad, image.affine)
    expect("channel 2 (t1ce): image contains NaN or Inf")
    save(image_path, data, image.affine)
    save(tmp_path / "labelsTr" / "BRATS_001.nii.gz", np.zeros((20, 22, 17), np.uint8))
    assert "labelsTr" in expect("shape (20, 22, 17) differs from BRATS_001.nii.gz (20, 22, 18)")


def test_nnunet_v1_msd_json_with_one_file_per_channel(tmp_path):
    write_nnunetv2(tmp_path, cases=1, channel_names=MSD_MODALITY)  # v1 raw data: channel files, MSD's dataset.json
    (tmp_path / "dataset.json").write_text(
        json.dumps(
            {
                "modality": MSD_MODALITY,
                "labels": MSD_LABELS,
                "training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}],
                "test": [],
            }
        )
    )
    layout, cases, bad = discover(tmp_path)
    assert layout == "msd" and not bad and not cases[0].channels
    assert cases[0].images["t1ce"].name == "BRATS_001_0002.nii.gz"
    _check_loaded(load_case(cases[0]), 0, ["flair", "t1ce", "t1", "t2"], EDEMA_FIRST_REGIONS)


def test_nnunetv2_detected_channels_and_labels_mapped(tmp_path):
    write_nnunetv2(tmp_path, cases=2, test_cases=1)
    layout, cases, bad = discover(tmp_path)
    assert layout == "nnunetv2" and not bad and [c.case_id for c in cases] == ["BRATS_001", "BRATS_002"]
    assert {m: p.name for m, p in cases[0].images.items()} == {
        "flair": "BRATS_001_0000.nii.gz",
        "t1": "BRATS_001_0001.nii.gz",
        "t1ce": "BRATS_001_0002.nii.gz",
        "t2": "BRATS_001_0003.nii.gz",
    }
    assert cases[0].convention == "nnunetv2:0=0,1=2,2=1,3=3" and not cases[0].channels
    for seed, record in enumerate(cases):
        _check_loaded(load_case(record), seed, ["flair", "t1ce", "t1", "t2"], EDEMA_FIRST_REGIONS)
    assert len(discover(tmp_path, need_labels=False)[1]) == 3


def test_nnunetv2_three_channels_other_names_and_label_values(tmp_path):
    channels = {"0": "T2W", "1": "t1-gd", "2": "Flair"}
    labels = {"background": 0, "necrotic tumour core": 3, "peritumoral oedema": 1, "GD-enhancing tumor": 2}
    write_nnunetv2(
        tmp_path, cases=1, channel_names=channels, labels=labels, values={0: 0, 1: 3, 2: 1, 3: 2}, file_ending=".nii"
    )
    _, cases, bad = discover(tmp_path)
    assert not bad and cases[0].present == (True, True, False, True) and cases[0].seg.name == "BRATS_001.nii"
    _check_loaded(load_case(cases[0]), 0, ["t2", "t1ce", "flair"], ({1, 2, 3}, {2, 3}, {2}))


def test_nnunetv2_bad_files_are_named(tmp_path):
    write_nnunetv2(tmp_path, cases=3)
    images = tmp_path / "imagesTr"
    (images / "BRATS_001_0003.nii.gz").rename(images / "BRATS_001_0004.nii.gz")
    (images / "BRATS_002_0000.nii.gz").rename(images / "BRATS_002.nii.gz")
    (tmp_path / "labelsTr" / "BRATS_003.nii.gz").unlink()
    _, cases, bad = discover(tmp_path)
    messages = sorted(str(e) for e in bad)
    assert not cases and len(messages) == 3 and all("\n" not in m for m in messages)
    assert "BRATS_001_0004.nii.gz: channel 0004 is not in dataset.json channel_names [0, 1, 2, 3]" in messages[0]
    assert messages[1].startswith("case BRATS_002: ") and "BRATS_002.nii.gz: not named CASE_XXXX.nii.gz" in messages[1]
    assert "labelsTr/BRATS_003.nii.gz: label file not found" in messages[2]


@pytest.mark.parametrize("writer", [write_msd, write_nnunetv2])
def test_prepare_into_the_cache_and_write_predictions_back(tmp_path, writer):
    from jaxbrats.inference.nifti import write_prediction

    writer(tmp_path / "data", cases=2)
    report = prepare_dataset(tmp_path / "data", tmp_path / "cache", workers=1, progress=False)
    assert not report["errors"] and set(report["prepared"].values()) == {"written"}
    dataset = CacheDataset(tmp_path / "cache")
    assert dataset.index["layout"] == writer.__name__.removeprefix("write_")
    for i in range(2):
        manifest, arrays = dataset.manifests[i], dataset.arrays(i)
        assert manifest["present"] == [True] * 4 and manifest["label_convention"].endswith(":0=0,1=2,2=1,3=3")
        assert arrays["image"].shape[-1] == 4 and np.abs(arrays["image"]).max() > 0
        # the cached labels written back in the dataset's own values are the source seg
        source = tmp_path / "data" / "labelsTr" / f"{manifest['case_id']}.nii.gz"
        write_prediction(np.asarray(arrays["label"]), manifest, tmp_path / "pred.nii.gz")
        np.testing.assert_array_equal(nib.load(tmp_path / "pred.nii.gz").dataobj, nib.load(source).dataobj)
    again = prepare_dataset(tmp_path / "data", tmp_path / "cache", workers=1, progress=False)
    assert set(again["prepared"].values()) == {"cached"}


def _dataset_json_error(root, fragments):
    with pytest.raises(JaxbratsError) as info:
        discover(root)
    message = str(info.value)
    assert "\n" not in message and str(root / "dataset.json") in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    "writer, key, value, fragments",
    [
        (
            write_msd,
            "modality",
            {"0": "FLAIR", "1": "ADC", "2": "t1gd", "3": "DWI"},
            ["names ['ADC', 'DWI'] map to no modality"],
        ),
        (write_nnunetv2, "channel_names", {"0": "FLAIR", "1": "T1", "2": "seg"}, ["names ['seg'] map to no modality"]),
        (
            write_nnunetv2,
            "channel_names",
            {"0": "FLAIR", "1": "T1", "2": "T1w"},
            ["channels 1 and 2 ('T1w') both map to t1"],
        ),
        (
            write_msd,
            "labels",
            {"0": "background", "1": "edema", "2": "tumour", "3": "enhancing tumour"},
            ["label names ['tumour'] map to no tumour label"],
        ),
        (
            write_nnunetv2,
            "labels",
            {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3},
            ["label 'whole tumor' has a list of values [1, 2, 3]", "region-based"],
        ),
        (
            write_nnunetv2,
            "labels",
            {"background": 0, "edema": 1, "necrosis": 2},
            ["no label name maps to ['enhancing tumour']"],
        ),
        (
            write_nnunetv2,
            "labels",
            {"background": 0, "edema": 1, "necrosis": 2, "enhancing": 2},
            ["'necrosis' and 'enhancing' both have value 2"],
        ),
    ],
)
def test_unusable_dataset_json_is_one_line_naming_it(tmp_path, writer, key, value, fragments):
    writer(tmp_path, cases=1)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    meta[key] = value
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    _dataset_json_error(tmp_path, fragments)


def test_dataset_json_of_neither_kind_or_not_json(tmp_path):
    write_msd(tmp_path, cases=1)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": MSD_LABELS}))
    _dataset_json_error(tmp_path, ["neither 'modality'", "nor 'channel_names'"])
    (tmp_path / "dataset.json").write_text("{'modality': ")
    _dataset_json_error(tmp_path, ["not valid JSON"])
    (tmp_path / "dataset.json").write_text(
        json.dumps({"channel_names": NNUNET_CHANNELS, "labels": NNUNET_LABELS, "file_ending": ".png"})
    )
    _dataset_json_error(tmp_path, ["file_ending '.png': only NIfTI"])


# --- the BraTS 2013-2016 convention -------------------------------------------------------------------------


def test_brats2013_detected_in_the_plain_layout_and_written_back(tmp_path):
    from jaxbrats.inference.nifti import write_prediction

    _, labels = phantom_arrays(0)
    seg = brats2013_seg(labels)
    assert {3, 4} <= set(np.unique(seg))
    write_plain_case(tmp_path / "data" / "patient_a", seg)
    _, cases, _ = discover(tmp_path / "data")
    case = load_case(cases[0])
    assert case.convention == "brats2013"
    np.testing.assert_array_equal(regions_of(case.labels), _ras(_regions(seg, *BRATS2013_REGIONS)))
    np.testing.assert_array_equal(case.labels, _ras(labels))  # 3 (non-enhancing) is core: internal 1
    report = prepare_dataset(tmp_path / "data", tmp_path / "cache", workers=1, progress=False)
    assert not report["errors"]
    dataset = CacheDataset(tmp_path / "cache")
    assert dataset.manifests[0]["label_convention"] == "brats2013"
    write_prediction(np.asarray(dataset.arrays(0)["label"]), dataset.manifests[0], tmp_path / "pred.nii.gz")
    written = np.asarray(nib.load(tmp_path / "pred.nii.gz").dataobj)
    assert set(np.unique(written)) == {0, 1, 2, 4}  # a valid 2013 file; non-enhancing is written as necrosis (1)
    np.testing.assert_array_equal(_regions(written, *BRATS2013_REGIONS), _regions(seg, *BRATS2013_REGIONS))


def test_convention_stated_for_the_dataset_overrides_the_layout(tmp_path):
    _, labels = phantom_arrays(0)
    data = tmp_path / "data"
    case_dir = write_case(data / "BraTS2021_00000")  # a 2021-named case ...
    seg_path = case_dir / "BraTS2021_00000_seg.nii.gz"
    save(seg_path, brats2013_seg(labels), dtype=np.uint8)  # ... with 2013 labels
    report = check_dataset(data, workers=1, progress=False)
    (error,) = report["errors"]
    assert "case BraTS2021_00000" in error and seg_path.name in error
    assert "labels [3] outside the brats2018 convention [0, 1, 2, 4] (labels found [0, 1, 2, 3, 4]" in error
    assert "--convention" in error and "brats2013" in error
    first = prepare_dataset(data, tmp_path / "cache", workers=1, progress=False, convention="brats2013")
    assert not first["errors"] and first["prepared"] == {"BraTS2021_00000": "written"}
    dataset = CacheDataset(tmp_path / "cache")
    assert dataset.manifests[0]["label_convention"] == "brats2013"
    assert set(np.unique(dataset.arrays(0)["label"])) == {0, 1, 2, 3}
    again = prepare_dataset(data, tmp_path / "cache", workers=1, progress=False, convention="brats2013")
    assert again["prepared"] == {"BraTS2021_00000": "cached"}
    # a stated convention the labels do not fit: the case, the file, the labels found and the convention
    report = check_dataset(data, workers=1, progress=False, convention="brats2023")
    (error,) = report["errors"]
    assert error.startswith("case BraTS2021_00000: ") and str(seg_path) in error
    assert "labels [4] outside the brats2023 convention [0, 1, 2, 3] (labels found [0, 1, 2, 3, 4]" in error
    with pytest.raises(JaxbratsError, match="unknown label convention 'brats2015'"):
        prepare_dataset(data, tmp_path / "cache", workers=1, progress=False, convention="brats2015")


def test_labels_fitting_no_convention(tmp_path):
    _, labels = phantom_arrays(0)
    seg = brats2013_seg(labels)
    seg[0, 0, 0] = 5
    write_plain_case(tmp_path / "patient_a", seg)
    _, cases, _ = discover(tmp_path)
    with pytest.raises(CaseError) as info:
        load_case(cases[0])
    message = str(info.value)
    assert message.startswith("case patient_a: ") and "seg.nii.gz" in message and "\n" not in message
    assert (
        "labels [0, 1, 2, 3, 4, 5] fit no label convention "
        "(tried brats2023 [0, 1, 2, 3]; brats2018 [0, 1, 2, 4]; brats2013 [0, 1, 2, 3, 4])"
    ) in message


def test_cli_prepare_convention(tmp_path):
    data = tmp_path / "data"
    write_plain_case(data / "patient_a")  # 2018 values (4 = enhancing)
    result = _run("prepare", data, "--check-only", "--convention", "brats2023", "--workers", "1")
    _one_line_error(result, "1 bad case(s)")
    assert "bad: case patient_a:" in result.stdout and "labels [4] outside the brats2023 convention" in result.stdout
    ok = _run("prepare", data, tmp_path / "cache", "--convention", "brats2018", "--workers", "1")
    assert ok.returncode == 0, ok.stderr
    manifest = json.loads((tmp_path / "cache" / "cases" / "patient_a" / "manifest.json").read_text())
    assert manifest["label_convention"] == "brats2018" and manifest["settings"]["convention"] == "brats2018"
