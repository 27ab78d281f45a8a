"""Validation during training (`train.validate_every`): val rows in metrics.jsonl, the best checkpoint,
`eval --checkpoint best|latest|STEP`, compile counts, and a run killed while validating.

One tiny baseline (6 phantom cases: 3 train, 1 val, 2 test) validated at steps 2 and 4 on two subsets;
the programs are shared with the rest of the suite through its compilation cache.
"""

import json
import shutil

import jax
import numpy as np
import pytest
from conftest import tiny_config

from jaxbrats import cli
from jaxbrats.engine.trainer import train
from jaxbrats.errors import ConfigError, JaxbratsError
from jaxbrats.evaluation.program import PROGRAM_NAME
from jaxbrats.evaluation.validation import StageValidation, validation_scores
from jaxbrats.inference.trained import load_trained
from jaxbrats.runtime import checkpoints, compilation
from jaxbrats.runtime.rundir import RunDir

VALIDATED = [
    "data.split_ratios=[0.5,0.17,0.33]",
    "train.validate_every=2",
    'train.validate_subsets=["flair","flair+t1ce+t1+t2"]',
]


def _rows(workdir):
    return [json.loads(line) for line in RunDir(workdir).metrics.read_text().splitlines()]


def _val_rows(workdir):
    return [r for r in _rows(workdir) if any(k.startswith("val/") for k in r)]


@pytest.fixture(scope="module")
def validated_run(phantom_cache, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("validated")
    compilation.watch()
    before = compilation.counts(PROGRAM_NAME)
    trainer = train(tiny_config(*VALIDATED), workdir, phantom_cache, validator=StageValidation)
    after = compilation.counts(PROGRAM_NAME)
    return workdir, trainer, sum(after[k] - before[k] for k in ("compiled", "loaded"))


def test_validation_logs_val_rows_and_keeps_the_best_checkpoint(validated_run):
    workdir, trainer, val_programs = validated_run
    rows = _val_rows(workdir)
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        assert {"val/dice_mean", "val/dice_WT", "val/dice_TC", "val/dice_ET", "val/flair/WT"} <= set(row)
        assert not any(k.startswith("val/t1ce/") for k in row)  # only the subsets asked for
        assert 0.0 <= row["val/dice_mean"] <= 1.0
        regions = [row[f"val/dice_{r}"] for r in ("WT", "TC", "ET")]
        assert row["val/dice_mean"] == pytest.approx(np.mean(regions))
    best_row = max(rows, key=lambda r: r["val/dice_mean"])  # the first of equal scores wins
    record = checkpoints.best_record(checkpoints.best_manager(workdir, "train", create=False))
    assert record["step"] == best_row["step"]
    assert record["score"] == pytest.approx(best_row["val/dice_mean"])
    assert rows[-1]["val/best"] == pytest.approx(record["score"])
    assert RunDir(workdir).best("train").is_dir()
    # Validation did not recompile the train step, and its own program compiled (or loaded) once.
    assert sum(trainer.compilations["train"].values()) == 1
    assert val_programs == 1


def test_eval_reads_the_best_latest_or_a_step(validated_run, phantom_cache, tmp_path, capsys):
    workdir, _, _ = validated_run
    best = checkpoints.best_record(checkpoints.best_manager(workdir, "train", create=False))["step"]
    out = tmp_path / "eval"
    argv = ["eval", "--workdir", workdir, "--data", phantom_cache, "--out", out, "--predictions", "none"]
    assert cli.main([*argv, "--checkpoint", "best", "--set", "eval.hd95=false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoint"] == {"stage": "train", "step": best, "checkpoint": "best"}
    assert f"step {best} (best checkpoint)" in capsys.readouterr().out
    # The best checkpoint holds the models of its step: equal to that step's own checkpoint.
    _, _, at_best, _ = load_trained(workdir, checkpoint="best")
    method, _, at_step, _ = load_trained(workdir, checkpoint=str(best))
    assert method.served_checkpoint == {"stage": "train", "step": best, "checkpoint": "step"}
    for a, b in zip(_leaves(at_best), _leaves(at_step), strict=True):
        np.testing.assert_array_equal(a, b)
    method, _, _, _ = load_trained(workdir)
    assert method.served_checkpoint["step"] == 4


def _leaves(models):
    return [np.asarray(x) for x in jax.tree.leaves(models)]


def test_checkpoint_choices_are_one_line_errors(validated_run, tmp_path):
    workdir, _, _ = validated_run
    with pytest.raises(JaxbratsError, match="--checkpoint must be latest, best or a step number, got 'newest'"):
        load_trained(workdir, checkpoint="newest")
    with pytest.raises(JaxbratsError, match=r"--checkpoint 3: stage train of .* has checkpoints at steps 2, 4"):
        load_trained(workdir, checkpoint=3)
    unvalidated = shutil.copytree(workdir, tmp_path / "run")
    shutil.rmtree(RunDir(unvalidated).best("train"))  # as a run trained without validation
    with pytest.raises(JaxbratsError, match="no best checkpoint; it is kept when the run validates"):
        load_trained(unvalidated, checkpoint="best")


def test_a_run_killed_while_validating_resumes_exactly(validated_run, phantom_cache, tmp_path, monkeypatch):
    """Killed during the validation of step 4 (after step 2's checkpoint and best): the resumed run
    redoes steps 3-4 and their validation, logs each validation once, and matches the uninterrupted run."""
    reference, _, _ = validated_run
    call = StageValidation.__call__

    def killed_at_step_4(self, models, step):
        if step == 4:
            raise KeyboardInterrupt  # what the disk holds after a kill -9 here: nothing of step 4
        return call(self, models, step)

    monkeypatch.setattr(StageValidation, "__call__", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(*VALIDATED), tmp_path, phantom_cache, validator=StageValidation)
    assert [r["step"] for r in _val_rows(tmp_path)] == [2]
    best_before = checkpoints.best_record(checkpoints.best_manager(tmp_path, "train", create=False))
    assert best_before["step"] == 2
    monkeypatch.setattr(StageValidation, "__call__", call)
    train(tiny_config(*VALIDATED), tmp_path, phantom_cache, validator=StageValidation)
    assert _val_rows(tmp_path) == _val_rows(reference)
    assert [r for r in _rows(tmp_path) if "loss" in r] == [r for r in _rows(reference) if "loss" in r]
    ours = checkpoints.best_record(checkpoints.best_manager(tmp_path, "train", create=False))
    theirs = checkpoints.best_record(checkpoints.best_manager(reference, "train", create=False))
    assert (ours["step"], ours["score"]) == (theirs["step"], theirs["score"])


def test_validation_settings_are_checked(phantom_cache, tmp_path):
    with pytest.raises(ConfigError, match=r"train.validate_subsets entries must be one of"):
        tiny_config('train.validate_subsets=["flair+t2+t1"]')
    with pytest.raises(ConfigError, match="train.best_score must be one of"):
        tiny_config('train.best_score="hd95"')
    with pytest.raises(ConfigError, match="train.validate_every: the run's val split is empty"):
        train(tiny_config("train.validate_every=2"), tmp_path, phantom_cache, validator=StageValidation)
    with pytest.raises(JaxbratsError, match="train.validate_every needs the evaluation"):
        train(tiny_config(*VALIDATED), tmp_path / "b", phantom_cache)


def test_validation_scores_average_rows_then_regions():
    nan = np.nan
    dice = np.array(
        [  # 2 cases x 2 subsets x 3 regions; case 1 has no row-0 modalities
            [[0.8, 0.6, 0.4], [0.9, 0.7, 0.5]],
            [[nan, nan, nan], [0.7, 0.5, 0.3]],
        ]
    )
    row = validation_scores(dice, [0, 14])
    assert row["val/flair/WT"] == pytest.approx(0.8)
    assert row["val/flair+t1ce+t1+t2/ET"] == pytest.approx(0.4)
    assert row["val/dice_WT"] == pytest.approx((0.8 + 0.8) / 2)
    assert row["val/dice_mean"] == pytest.approx(np.mean([0.8, 0.6, 0.4, 0.8, 0.6, 0.4]))
