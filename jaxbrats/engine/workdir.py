"""What a training work directory holds besides checkpoints, and what a resume may change.

Where each file lies is `jaxbrats.runtime.rundir.RunDir`'s; what goes in it is decided here.
``config.json`` is the resolved config of the latest `train` call,
``config_history.jsonl`` one row per call (when, which keys changed from the
call before, old and new values), ``splits.json`` the case ids of each split
(fixed at the first call) and ``data.json`` the cache's preprocessing
settings (`predict` needs them). ``.train.lock`` is the one-writer lock
(`single_writer`): while a run writes, it names that run (host, pid, start
time); it is empty when nobody holds it. ``import.json`` marks weights
imported from another framework (`jaxbrats import-m3ae`): such a folder is
evaluated and predicted with, never trained in (`refuse_imported`).

A resume may change only the settings that leave what the checkpoints hold
and what the split is untouched (`RESUMABLE`: batch size, run lengths,
learning-rate schedule, logging, the compute dtype, evaluation...); a change
of anything else (the architecture, the method and its options, the
optimiser's kind, the data pipeline, the seed) is refused with one line
naming the keys, before anything is written.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
from pathlib import Path

from jaxbrats.config import Config, ConfigError, OptimizerConfig, StageConfig, save_config, to_dict
from jaxbrats.data.cache import CacheDataset
from jaxbrats.data.splits import check_split_counts, check_split_total, ratio_split, read_split_files
from jaxbrats.errors import JaxbratsError
from jaxbrats.files import write_text_atomic
from jaxbrats.methods import config_from_data, get_method
from jaxbrats.runtime import locks, processes
from jaxbrats.runtime.rundir import RunDir

#: Config keys (fnmatch patterns) a resumed run may change. Everything else is refused.
RESUMABLE = (
    "data.cache",
    "data.batch_size",
    "data.workers",
    "data.prefetch",
    "data.split_counts",  # checked when a run first fixes its split
    "stages.*.epochs",
    "stages.*.steps",
    "stages.*.batch_size",
    "stages.*.init_from",
    "stages.*.optimizers.*.lr",
    "stages.*.optimizers.*.schedule",
    "stages.*.optimizers.*.poly_power",
    "stages.*.optimizers.*.warmup_steps",
    "stages.*.optimizers.*.momentum",
    "model.dtype",
    "model.remat",
    "model.conv_impl",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.progress",
    "train.mesh.*",
    "train.grad_norms",
    "train.validate_every",
    "train.validate_subsets",
    "eval.*",
)


def single_writer(workdir: Path):
    """Hold the work directory's lock while a run writes to it (`jaxbrats.runtime.locks.hold`).

    Two runs in one work directory would interleave checkpoints, metrics and
    the saved config without an error, so a second `train` stops at once, in
    one line naming the run that holds it; the lock of a killed run is taken
    over. Only process 0 of a multi-host run takes it (`Trainer.run`, `processes.on_process_0`).
    """
    return locks.hold(RunDir(workdir).lock, "jaxbrats train", hint="wait for it to finish or use another --workdir")


def resolve_splits(config: Config, cache_ids: list[str], cache_dir="") -> dict[str, list[str]]:
    """A new run's split: the list files (the paper's, checked against `data.split_counts`) or the ratios."""
    d = config.data
    if d.split == "files" and not (d.train_split and d.test_split):
        raise ConfigError(
            "data.split = 'files' (this config's paper publishes its split): set data.train_split, "
            "data.val_split and data.test_split to the authors' list files (docs/usage.md#splits), or "
            "--set data.split='\"ratio\"' for a seeded ratio split (data.split_ratios, data.split_seed) "
            "that is not the paper's"
        )
    cache = f"the cache {cache_dir}" if cache_dir else "the cache"
    if d.train_split:
        files = {"train": d.train_split, "val": d.val_split, "test": d.test_split}
        keys = {name: f"data.{name}_split" for name in files}
        splits = read_split_files(files, cache_ids, keys=keys, cache=cache)
        check_split_counts(splits, d.split_counts, keys=keys, files=files)
        return splits
    check_split_total(len(cache_ids), d.split_counts, cache=cache)
    return ratio_split(cache_ids, d.split_ratios, seed=d.split_seed)


def refuse_imported(workdir: Path, stages) -> None:
    """Imported weights are not a run to resume: training there would start its stages from scratch."""
    run = RunDir(workdir)
    if run.import_record.exists():
        raise JaxbratsError(
            f"{workdir}: holds imported weights ({run.import_record.name}), not a run to train in; train in a new "
            f"--workdir with --set stages.{stages[-1]}.init_from='\"{run.checkpoints(stages[-1])}\"' "
            f"--stage {stages[-1]}"
        )


def load_splits(workdir: Path, cache: CacheDataset) -> dict[str, list[str]]:
    path = RunDir(workdir).splits
    try:
        splits = json.loads(path.read_text())
    except FileNotFoundError:
        raise JaxbratsError(
            f"{path}: missing, the run has no splits (imported weights?); evaluate --split all "
            f"on a cache of the cases to score"
        ) from None
    missing = sorted({i for ids in splits.values() for i in ids} - set(cache.case_ids))
    if missing:
        raise JaxbratsError(f"{path}: case {missing[0]!r} of the run's split is not in the cache {cache.cache_dir}")
    return splits


def effective(config: Config) -> dict:
    """The config as plain data with every default spelled out (the method's options, each stage and group)."""
    method = get_method(config.method_name)(config)
    stages = {}
    for stage in method.stages:
        stage_config = config.stages.get(stage, StageConfig())
        groups = {g: stage_config.optimizers.get(g, OptimizerConfig()) for g in method.groups(stage)}
        stages[stage] = to_dict(StageConfig(**{**vars(stage_config), "optimizers": groups}))
    data = to_dict(config)
    data["method"] = {"name": config.method_name, **to_dict(method.parse_options(config))}
    data["stages"] = stages
    return data


def changed_keys(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) or isinstance(new, dict):
        old, new = old if isinstance(old, dict) else {}, new if isinstance(new, dict) else {}
        return [
            k
            for key in sorted(set(old) | set(new))
            for k in changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        ]
    return [] if old == new else [prefix.rstrip(".")]


def _lookup(data: dict, key: str):
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def has_checkpoints(workdir: Path) -> bool:
    return any(p.name.isdigit() for p in RunDir(workdir).checkpoint_root.glob("*/*"))


def record_config(workdir: Path, config: Config) -> list[str]:
    """Check a resume's config against the saved one, then save it and add a history row; the changed keys."""
    run = RunDir(workdir)
    saved = run.config
    new = effective(config)
    changed = []
    if saved.exists():
        try:
            old = effective(config_from_data(json.loads(saved.read_text()), str(saved)))
        except (json.JSONDecodeError, ConfigError) as e:
            raise JaxbratsError(f"{saved}: the saved config cannot be read ({e}); use another --workdir") from None
        changed = changed_keys(old, new)
        fixed = [k for k in changed if not any(fnmatch.fnmatchcase(k, p) for p in RESUMABLE)]
        if fixed and has_checkpoints(workdir):
            raise JaxbratsError(
                f"{workdir}: its checkpoints were trained with other values of {', '.join(fixed)} "
                f"(saved: {', '.join(f'{k}={_lookup(old, k)!r}' for k in fixed)}); a resume may change only "
                f"run lengths, batch size, learning-rate schedule, logging and eval settings. "
                f"Use another --workdir (stages.<stage>.init_from starts from a checkpoint's models)"
            )
        if changed:
            print(f"note: resuming with changed {', '.join(changed)} (recorded in {run.config_history.name})")
    row = {
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "changed": {k: [_lookup(old, k), _lookup(new, k)] for k in changed} if changed else {},
    }
    try:
        with run.config_history.open("a") as f:  # one short row appended: a reader sees whole rows
            f.write(json.dumps(row) + "\n")
    except OSError as e:  # a full disk: name the file
        raise OSError(e.errno, e.strerror, str(run.config_history)) from None
    save_config(config, saved)
    return changed


def prepare(workdir: Path, config: Config, cache: CacheDataset) -> dict[str, list[str]]:
    """Create or check a work directory; returns the run's splits (fixed at its first call).

    In a multi-process run process 0 alone writes and checks the work directory; every
    process gets its splits, or its error (a resume refused, a bad split), from it, so all
    train on the same split or all stop with the same line.
    """
    splits = processes.on_process_0(lambda: _prepare(workdir, config, cache))
    missing = sorted({i for ids in splits.values() for i in ids} - set(cache.case_ids))
    if missing:  # another host's cache
        raise JaxbratsError(f"case {missing[0]!r} of the run's split is not in this host's cache {cache.cache_dir}")
    return splits


def _prepare(workdir: Path, config: Config, cache: CacheDataset) -> dict[str, list[str]]:
    workdir.mkdir(parents=True, exist_ok=True)
    split_path = RunDir(workdir).splits
    fixed = split_path.exists()
    splits = load_splits(workdir, cache) if fixed else resolve_splits(config, cache.case_ids, cache.cache_dir)
    if not splits["train"]:
        raise JaxbratsError(f"{split_path}: no training cases")
    record_config(workdir, config)
    if not fixed:
        write_splits(workdir, splits)
    write_data_record(workdir, str(cache.cache_dir), cache.index["settings"])
    return splits


def split_cases(workdir: Path, cache: CacheDataset, split: str) -> list[str]:
    """The case ids of a run's split ("train", "val", "test"), or every case of the cache ("all")."""
    if split == "all":
        return cache.case_ids
    splits = load_splits(workdir, cache)
    if not splits.get(split):
        raise JaxbratsError(f"{RunDir(workdir).splits}: no cases in split {split!r}")
    return splits[split]


def write_splits(workdir: Path, splits) -> None:
    """splits.json: the case ids of each split ({"train"|"val"|"test": ids})."""
    text = json.dumps({name: list(ids) for name, ids in splits.items()}, indent=1) + "\n"
    write_text_atomic(RunDir(workdir).splits, text)


def write_data_record(workdir: Path, cache: str, preprocessing: dict) -> None:
    """data.json: the cache a run trained on and its preprocessing, which predicting a new case needs."""
    text = json.dumps({"cache": cache, "preprocessing": preprocessing}, indent=1) + "\n"
    write_text_atomic(RunDir(workdir).data_record, text)


def write_import_record(workdir: Path, summary: dict) -> None:
    """import.json: what was imported from another framework, from where (`refuse_imported` reads its presence)."""
    write_text_atomic(RunDir(workdir).import_record, json.dumps(summary, indent=1) + "\n")


def read_preprocessing(workdir: Path) -> dict:
    """The preprocessing settings of a run's data.json (one line when it has none)."""
    path = RunDir(workdir).data_record
    try:
        return json.loads(path.read_text())["preprocessing"]
    except FileNotFoundError:
        raise JaxbratsError(f"{path}: missing; the run's preprocessing settings are unknown") from None
