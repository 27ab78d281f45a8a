"""The 15-subset evaluation program, its reports, and predictions in the source geometry."""

import json

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from jaxbrats.data.cache import CacheDataset
from jaxbrats.engine import load_splits, load_trained
from jaxbrats.evaluation import _pad, bucket_shape, evaluate, make_case_program, postprocess_et, subset_evaluator
from jaxbrats.labels import ENHANCING, NECROSIS
from jaxbrats.metrics import dice_from_counts
from jaxbrats.modalities import SUBSET_MASKS, SUBSET_NAMES
from jaxbrats.predict import predict_case


def _case_inputs(cache, cfg, i=0):
    dataset = CacheDataset(cache)
    arrays, shape = dataset.arrays(i), tuple(dataset.manifests[i]["cropped_shape"])
    bucket = bucket_shape([shape], cfg)
    return (_pad(np.asarray(arrays["image"]), bucket), _pad(np.asarray(arrays["label"]), bucket), _pad(np.ones(shape, bool), bucket))


def test_the_15_subset_program_equals_a_python_loop(trained_run, phantom_cache):
    method, graphdefs, models, config = load_trained(trained_run)
    image, labels, valid = _case_inputs(phantom_cache, config.eval)
    counts, predicted = make_case_program(method, graphdefs, config.eval)(models, image, labels, valid)
    one = jax.jit(subset_evaluator(method, graphdefs, config.eval))
    for s, mask in enumerate(SUBSET_MASKS):
        c, p = one(models, image, labels, valid, jnp.asarray(mask))
        np.testing.assert_array_equal(counts[s], c, err_msg=SUBSET_NAMES[s])
        np.testing.assert_array_equal(predicted[s], p, err_msg=SUBSET_NAMES[s])
    assert len({np.asarray(p).tobytes() for p in predicted}) > 1  # the subsets do differ


def test_evaluate_writes_the_summary_compiled_once(trained_run, phantom_cache, tmp_path):
    method, graphdefs, models, config = load_trained(trained_run)
    ids = load_splits(trained_run, CacheDataset(phantom_cache))["test"]
    summary = evaluate(method, graphdefs, models, CacheDataset(phantom_cache, ids), config.eval, tmp_path, progress=False)
    assert set(summary) == {"regions", "subsets", "mean", "cases"}
    assert summary["regions"] == ["WT", "TC", "ET"] and summary["cases"] == len(ids) == 2
    assert [row["name"] for row in summary["subsets"]] == list(SUBSET_NAMES)
    assert summary["subsets"][0]["modalities"] == ["flair"] and summary["subsets"][-1]["modalities"] == ["flair", "t1ce", "t1", "t2"]
    for row in summary["subsets"]:
        assert set(row) == {"name", "modalities", "dice", "hd95"}
        assert all(0.0 <= row["dice"][r] <= 1.0 for r in ("WT", "TC", "ET"))
    case_dice = [json.loads((tmp_path / "cases" / f"{i}.json").read_text())["subsets"][3]["dice"]["WT"] for i in ids]
    assert summary["subsets"][3]["dice"]["WT"] == pytest.approx(np.mean(case_dice))
    assert json.loads((tmp_path / "eval_settings.json").read_text())["compilations"] == 1
    assert (tmp_path / "summary.md").read_text().count("\n| ") == 16
    assert len((tmp_path / "summary.csv").read_text().splitlines()) == 17
    assert (tmp_path / "dice_heatmap.png").stat().st_size > 0
    for i in ids:  # full-modality predictions in the source geometry
        written = nib.load(tmp_path / "predictions" / f"{i}.nii.gz")
        source = nib.load(_source_image(phantom_cache, i))
        assert written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine)


def _source_image(cache, case_id):
    manifest = json.loads((cache / "cases" / case_id / "manifest.json").read_text())
    return manifest["sources"]["flair"]


def test_et_postprocessing_relabels_small_et():
    labels = jnp.zeros((8, 8, 8), jnp.uint8).at[0, 0, :3].set(ENHANCING)
    out = postprocess_et(labels, 4)
    assert int((out == ENHANCING).sum()) == 0 and int((out == NECROSIS).sum()) == 3
    assert int((postprocess_et(labels, 3) == ENHANCING).sum()) == 3


def test_dice_from_counts_over_subsets():
    counts = np.zeros((15, 3, 3))
    counts[:, :, 0] = [1, 1, 1]
    np.testing.assert_allclose(dice_from_counts(counts)[:, 0], 1.0)


def test_predict_uses_the_present_modalities_and_the_source_geometry(trained_run, tmp_path):
    from jaxbrats.data.phantom import write_phantom

    raw = tmp_path / "raw"
    write_phantom(raw, 1, (20, 24, 18), layout="brats2020", seed=9, workers=1)
    case = next(raw.iterdir())
    for f in case.iterdir():
        if f.name.endswith(("_t1.nii.gz", "_t2.nii.gz", "_seg.nii.gz")):
            f.unlink()
    before = sorted(p.name for p in case.iterdir())
    info = predict_case(trained_run, case, tmp_path / "out" / "seg.nii.gz")
    assert info["present"] == ["flair", "t1ce"] and info["missing"] == ["t1", "t2"]
    assert sorted(p.name for p in case.iterdir()) == before
    written = nib.load(tmp_path / "out" / "seg.nii.gz")
    source = nib.load(next(case.glob("*_flair.nii.gz")))
    assert written.shape == source.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, source.affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 4}  # the 2018-2021 convention
    assert info["convention"] == "brats2018"
