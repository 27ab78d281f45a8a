"""`jaxbrats predict` segments a case exactly as the evaluation does: same padding, fill, window grid.

The evaluation pads every case to one bucket (its largest case); its window
grid follows each case's own extent, so predict (its own program, the case
padded by `evaluation.pad_shape`) equals the evaluation of the case alone
and inside any larger bucket, for the baseline and for M3AE (whose fill
reads x_sub into the padding), with an axis shorter than the window.
"""

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from helpers import NNUNET_CHANNELS, NNUNET_LABELS, write_case

from jaxbrats import cli
from jaxbrats.data.cache import CacheDataset
from jaxbrats.data.preprocess import prepare_dataset
from jaxbrats.evaluation.program import bucket_shape, evaluate
from jaxbrats.inference.predict import predict_case
from jaxbrats.inference.segment import pad_shape
from jaxbrats.inference.trained import load_trained
from jaxbrats.inference.windows import SlidingWindowConfig, sliding_window, window_starts
from jaxbrats.runtime import compilation

#: case id -> (shape, modalities left out). A is shorter than the 16^3 window along W; B makes the
#: bucket larger than A's own; C has no T2 file (segmented with flair, t1ce, t1).
CASES = {
    "BraTS20_Training_001": ((16, 20, 12), ()),
    "BraTS20_Training_002": ((30, 22, 20), ()),
    "BraTS20_Training_003": ((18, 16, 20), ("t2",)),
}
SHORT = "BraTS20_Training_001"


def _dataset(root: Path, workdir: Path) -> tuple[Path, Path]:
    raw, cache = root / "raw", root / "cache"
    for seed, (case_id, (shape, skip)) in enumerate(CASES.items()):
        write_case(raw / case_id, shape=shape, seed=seed + 11, skip=skip)
    settings = json.loads((workdir / "data.json").read_text())["preprocessing"]  # the run's, as predict uses
    report = prepare_dataset(raw, cache, settings["normalization"], settings["margin"], workers=1, progress=False)
    assert not report["errors"]
    return raw, cache


def _nifti(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _predict_equals_evaluate(workdir: Path, tmp_path: Path, cases) -> dict:
    """Predict each case of `cases`; compare with an evaluation of all cases and of the short case alone."""
    raw, cache = _dataset(tmp_path, workdir)
    method, graphdefs, models, config = load_trained(workdir)
    dataset = CacheDataset(cache)
    shapes = {m["case_id"]: tuple(m["cropped_shape"]) for m in dataset.manifests}
    assert shapes[SHORT][2] < config.eval.window[2]  # an axis shorter than the window
    assert bucket_shape(list(shapes.values()), config.eval) != pad_shape(shapes[SHORT], config.eval)  # another bucket
    evaluate(method, graphdefs, models, dataset, config.eval, tmp_path / "eval_all", progress=False)
    evaluate(
        method, graphdefs, models, CacheDataset(cache, [SHORT]), config.eval, tmp_path / "eval_one", progress=False
    )
    tumour = {}
    for case_id in cases:
        info = predict_case(workdir, raw / case_id, tmp_path / "pred" / f"{case_id}.nii.gz", convention="brats2018")
        assert info["missing"] == list(CASES[case_id][1])
        predicted = _nifti(tmp_path / "pred" / f"{case_id}.nii.gz")
        evaluated = _nifti(tmp_path / "eval_all" / "predictions" / f"{case_id}.nii.gz")
        np.testing.assert_array_equal(predicted, evaluated, err_msg=case_id)
        if case_id == SHORT:
            np.testing.assert_array_equal(
                predicted, _nifti(tmp_path / "eval_one" / "predictions" / f"{case_id}.nii.gz")
            )
        tumour[case_id] = int((predicted > 0).sum())
    return tumour


def test_predict_equals_the_evaluation_baseline(trained_run, tmp_path, capsys):
    tumour = _predict_equals_evaluate(trained_run, tmp_path, list(CASES))
    assert any(tumour.values()), tumour  # not vacuous: some tumour predicted
    _predict_a_folder(trained_run, tmp_path, capsys)


def _predict_a_folder(workdir: Path, tmp_path: Path, capsys):
    """`predict --input`: every case as `predict --case` wrote it, one compilation for all shapes, a
    broken case named in one line without stopping the others, the summary, exit status 1."""
    broken = write_case(tmp_path / "raw" / "BraTS20_Training_004", shape=(16, 16, 16), seed=3)
    flair = next(broken.glob("*flair*"))
    flair.write_bytes(flair.read_bytes()[:200])  # a truncated gzip stream
    compilation.watch()
    before = compilation.counts("segment_case")
    code = cli.main(
        [
            "predict",
            "--workdir",
            workdir,
            "--input",
            tmp_path / "raw",
            "--out",
            tmp_path / "folder",
            "--convention",
            "brats2018",
        ]
    )
    out = capsys.readouterr()
    after = compilation.counts("segment_case")
    assert code == 1 and out.err.strip().splitlines()[-1].startswith("jaxbrats: error: 1 of 4 case(s) failed")
    assert f"failed: case BraTS20_Training_004: {flair}" in out.err
    assert re.search(r"predict: 100%\|[^|\n]*\| 4/4 \[", out.err), out.err  # the progress bar, counting cases
    assert "missing nothing: 2 case(s)" in out.out and "missing t2: 1 case(s) (BraTS20_Training_003)" in out.out
    assert after["compiled"] + after["loaded"] - before["compiled"] - before["loaded"] == 1  # three shapes, one program
    for case_id in CASES:
        np.testing.assert_array_equal(
            _nifti(tmp_path / "folder" / f"{case_id}.nii.gz"),
            _nifti(tmp_path / "pred" / f"{case_id}.nii.gz"),
            err_msg=case_id,
        )
    summary = json.loads((tmp_path / "folder" / "predict_summary.json").read_text())
    assert [c["case"] for c in summary["failed"]] == ["BraTS20_Training_004"] and len(summary["predicted"]) == 3
    _predict_an_nnunet_folder(workdir, tmp_path, capsys)


def _predict_an_nnunet_folder(workdir: Path, tmp_path: Path, capsys):
    """`predict --input` on another layout `prepare` reads: the same images as nnU-Net v2 raw data
    (``imagesTr/<case>_0000.nii.gz`` ... one file per channel, dataset.json; no labelsTr; the case
    without T2 in imagesTs) writes what `predict --case` wrote for each case folder."""
    root = tmp_path / "nnunet"
    tokens = {"0000": "flair", "0001": "t1", "0002": "t1ce", "0003": "t2"}  # NNUNET_CHANNELS: FLAIR, T1, T1c, T2
    for case_id, (_, skip) in CASES.items():
        folder = root / ("imagesTs" if skip else "imagesTr")
        folder.mkdir(parents=True, exist_ok=True)
        for channel, token in tokens.items():
            if token not in skip:
                shutil.copy(
                    tmp_path / "raw" / case_id / f"{case_id}_{token}.nii.gz", folder / f"{case_id}_{channel}.nii.gz"
                )
    dataset = {"channel_names": NNUNET_CHANNELS, "labels": NNUNET_LABELS, "numTraining": 2, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(dataset))
    args = [
        "predict",
        "--workdir",
        workdir,
        "--input",
        root,
        "--out",
        tmp_path / "nnunet_out",
        "--convention",
        "brats2018",
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr()
    assert "missing nothing: 2 case(s)" in out.out and "missing t2: 1 case(s) (BraTS20_Training_003)" in out.out
    assert re.search(r"predict: 100%\|[^|\n]*\| 3/3 \[", out.err), out.err
    for case_id in CASES:
        np.testing.assert_array_equal(
            _nifti(tmp_path / "nnunet_out" / f"{case_id}.nii.gz"),
            _nifti(tmp_path / "pred" / f"{case_id}.nii.gz"),
            err_msg=case_id,
        )


def test_predict_equals_the_evaluation_m3ae(m3ae_run, tmp_path):
    workdir, _ = m3ae_run  # tests/test_m3ae.py's run: one per worker, its programs in the suite's cache
    method, _, models, _ = load_trained(workdir)
    assert "x_sub" in models and method.options.fill == "x_sub"  # the fill reads x_sub into the padding
    _predict_equals_evaluate(workdir, tmp_path, [SHORT, "BraTS20_Training_003"])


def _window_model(x):
    """Not voxel-wise: each output depends on its window's mean, so the window grid shows."""
    return jnp.tanh(x[..., :2] + jnp.mean(x, axis=(1, 2, 3), keepdims=True)[..., :2])


def _numpy_reference(volume: np.ndarray, cfg: SlidingWindowConfig) -> np.ndarray:
    """The static grid of `window_starts`, blended by hand."""
    from jaxbrats.inference.windows import blend_weights

    w = blend_weights(cfg.window, cfg.blend, cfg.sigma_scale)[..., None]
    total, norm = np.zeros(volume.shape[:3] + (2,)), np.zeros(volume.shape[:3] + (1,))
    for s in window_starts(volume.shape[:3], cfg.window, cfg.overlap):
        box = tuple(slice(a, a + n) for a, n in zip(s, cfg.window))
        total[box] += w * np.asarray(_window_model(jnp.asarray(volume[box][None])))[0]
        norm[box] += w
    return total / norm


@pytest.mark.parametrize("batch", [1, 3])
def test_the_window_grid_follows_the_extent_not_the_padding(batch):
    cfg = SlidingWindowConfig(window=(8, 8, 8), overlap=0.5, batch=batch)
    case = np.asarray(jax.random.normal(jax.random.key(0), (13, 8, 19, 4)))
    reference = _numpy_reference(case, cfg)
    run = jax.jit(lambda v, e: sliding_window(_window_model, v, cfg, 2, extent=e))
    for bucket in [(13, 8, 19), (16, 16, 24), (24, 8, 32)]:
        padded = np.pad(case, [(0, b - s) for b, s in zip(bucket, case.shape[:3])] + [(0, 0)])
        out = np.asarray(run(padded, np.asarray(case.shape[:3], np.int32)))
        np.testing.assert_allclose(out[:13, :8, :19], reference, atol=1e-5, err_msg=str(bucket))
        assert not out[13:].any() and not out[:, :, 19:].any()  # nothing outside the case's box
    # the static path (no extent) is the same grid
    np.testing.assert_allclose(jax.jit(lambda v: sliding_window(_window_model, v, cfg, 2))(case), reference, atol=1e-5)
