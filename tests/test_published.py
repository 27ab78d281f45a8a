"""The papers' published tables (`evaluation.published`): every file loads, spot values typed from the
papers, the printed means against the rows, the row order against the modalities, and the refusals."""

import json
from importlib import resources

import numpy as np
import pytest

from jaxbrats.errors import JaxbratsError
from jaxbrats.evaluation import published
from jaxbrats.labels import REGIONS
from jaxbrats.modalities import SUBSET_NAMES

NAMES = ["acdis-brats2020", "m3ae-brats2018", "mind_the_gap-brats2018", "rirn-brats2018", "rirn-brats2020"]

# (table set, method, subset, region): the Dice (%) as the paper prints it, typed by hand.
SPOT = {
    # M3AE, AAAI 2023, arXiv:2303.05302, Table 1 (BraTS 2018)
    ("m3ae-brats2018", "M3AE", "flair", "WT"): 88.7,
    ("m3ae-brats2018", "M3AE", "t1ce", "ET"): 73.7,
    ("m3ae-brats2018", "RFNet", "flair+t1ce+t1+t2", "TC"): 82.9,
    ("m3ae-brats2018", "U-HVED", "t2", "ET"): 18.7,
    ("m3ae-brats2018", "SMU-Net", "flair+t1ce", "WT"): 86.7,
    # RIRN, Neural Networks 2024, doi:10.1016/j.neunet.2024.106657, Tables 1 and 2 (BraTS 2018)
    ("rirn-brats2018", "RIRN", "t1", "TC"): 71.3,
    ("rirn-brats2018", "ShaSpec", "flair", "WT"): 88.7,
    ("rirn-brats2018", "D2-Net", "t1", "WT"): 19.4,
    ("rirn-brats2018", "ACN", "t1ce", "ET"): 78.1,  # Table 2
    ("rirn-brats2018", "SMU-Net", "flair+t1ce+t1+t2", "TC"): 87.3,  # Table 2
    # RIRN, Table 3 (BraTS 2020)
    ("rirn-brats2020", "RIRN", "t1ce+t1", "TC"): 87.81,
    ("rirn-brats2020", "TMFormer", "flair", "WT"): 87.45,
    ("rirn-brats2020", "HeMIS", "flair+t1ce+t1+t2", "ET"): 71.49,
    ("rirn-brats2020", "M3AE", "t2", "WT"): 86.09,
    # ACDIS, ECAI 2024, arXiv:2408.13733, Table 1 (BraTS 2020)
    ("acdis-brats2020", "ACDIS", "flair", "WT"): 88.74,
    ("acdis-brats2020", "GSS", "flair+t1ce+t2", "WT"): 93.25,
    ("acdis-brats2020", "ACDIS", "t1", "ET"): 36.88,
    ("acdis-brats2020", "U-HVED", "t1", "ET"): 7.27,
    # Mind the Gap, arXiv:2409.19366, Table III (PMKL, and "A": PMKL with the alignment) and Table I
    ("mind_the_gap-brats2018", "PMKL+MindTheGap", "t1ce+t1", "ET"): 77.88,
    ("mind_the_gap-brats2018", "PMKL", "flair+t1", "ET"): 21.92,
    ("mind_the_gap-brats2018", "KD-Net+MindTheGap", "t1ce", "ET"): 81.29,  # Table I
    ("mind_the_gap-brats2018", "Unimodal", "flair", "WT"): 81.91,  # Table I
    ("mind_the_gap-brats2018", "ProtoKD", "t2", "TC"): 68.29,  # Table I
}
# Printed means further from their rows' mean than rounding allows: the papers' own (checked against
# the text of each table; the rows are kept as printed). (table set, method): (region, |difference|).
OFF_MEANS = {
    ("rirn-brats2018", "ACN"): ("WT", 0.1067),  # rows' mean 86.01, printed 85.9
    ("rirn-brats2020", "RFNet"): ("WT", 0.0673),  # rows' mean 87.05, printed 86.98
    ("acdis-brats2020", "MMANet"): ("TC", 0.028),  # rows' mean 77.02, printed 76.99
}


def raw(name):
    return json.loads(resources.files("jaxbrats.evaluation").joinpath(f"published/{name}.json").read_text())


def test_every_table_loads_in_jaxbrats_units():
    assert published.available() == NAMES
    for name in NAMES:
        table = published.load(name)
        assert table.name == name and table.title and table.split and table.citation
        own = table.values()["dice"]
        assert own.shape == (15, 3) and not np.isnan(own).any(), name  # the paper's method: all 15 rows
        for method, metrics in table.methods.items():
            assert set(metrics) == {"dice"}, (name, method)  # no paper prints per-subset HD95
            dice = metrics["dice"]
            assert dice.shape == (15, 3) and np.nanmax(dice) < 1 and np.nanmin(dice) > 0, (name, method)
            assert table.sources[method] in raw(name)["tables"]
    # Mind the Gap's Table I has the single-modality rows only.
    kd = published.load("mind_the_gap-brats2018").values("KD-Net")["dice"]
    assert np.isnan(kd[4:]).all() and not np.isnan(kd[:4]).any()


def test_spot_values_typed_from_the_papers():
    for (name, method, subset, region), printed in SPOT.items():
        value = published.load(name).values(method)["dice"][SUBSET_NAMES.index(subset), REGIONS.index(region)]
        assert value == pytest.approx(printed / 100, abs=1e-9), (name, method, subset, region)
    assert published.load("acdis-brats2020").means["mmFormer"]["dice"][1] == pytest.approx(0.7490)
    assert {name for name, *_ in SPOT} == set(NAMES)


def test_printed_means_agree_with_the_rows():
    for name in NAMES:
        doc, table = raw(name), published.load(name)
        tolerance = 10.0 ** -doc["metrics"]["dice"]["decimals"]  # rows and mean each rounded: half a unit each
        for method, rows in table.methods.items():
            printed = table.means[method]["dice"]
            if np.isnan(printed).any():
                assert doc["methods"][method]["dice"]["mean_check"] is None
                continue
            diff = np.abs(rows["dice"].mean(axis=0) - printed) * 100
            assert round(float(diff.max()), 4) == doc["methods"][method]["dice"]["mean_check"], (name, method)
            if (name, method) in OFF_MEANS:
                region, off = OFF_MEANS[name, method]
                assert diff.argmax() == REGIONS.index(region) and diff.max() == pytest.approx(off, abs=1e-3)
                assert np.sort(diff)[-2] <= tolerance + 1e-9, (name, method)
            else:
                assert diff.max() <= tolerance + 1e-9, (name, method, diff)


def test_row_order_follows_the_modalities():
    """Each paper's method segments ET well exactly where T1ce is present; and the M3AE rows that
    ACDIS and RIRN both quote for BraTS 2020 (tables laid out differently) agree once mapped."""
    has_t1ce = np.array(["t1ce" in s.split("+") for s in SUBSET_NAMES])
    for name in NAMES:
        et = published.load(name).values()["dice"][:, 2]
        assert et[has_t1ce].min() > et[~has_t1ce].max() + 0.1, name
    acdis = published.load("acdis-brats2020").values("M3AE")["dice"]
    np.testing.assert_array_equal(acdis, published.load("rirn-brats2020").values("M3AE")["dice"])


def test_unknown_names_and_malformed_files_are_refused_in_one_line():
    with pytest.raises(JaxbratsError, match="unknown published table 'nope'; available: acdis-brats2020, ") as e:
        published.load("nope")
    assert "\n" not in str(e.value) and all(name in str(e.value) for name in NAMES)
    with pytest.raises(JaxbratsError, match="has no method 'X'; it has: U-HVED, ACN"):
        published.load("m3ae-brats2018").values("X")
    doc = raw("rirn-brats2020")
    doc["methods"]["RFNet"]["dice"]["rows"].pop()
    with pytest.raises(JaxbratsError, match=r"rirn-brats2020\.json: method 'RFNet' dice: rows of shape \(14, 3\)"):
        published._load("rirn-brats2020", json.dumps(doc))
    with pytest.raises(JaxbratsError, match=r"m3ae-brats2018\.json: not valid JSON"):
        published._load("m3ae-brats2018", "{")
