"""Orbax checkpoints of a stage: one directory per stage, one sub-directory per step.

A checkpoint ``<workdir>/checkpoints/<stage>/<step>/`` (the step's folder in
`RunDir.checkpoints`) holds three items:

- ``state/``: the train state (a pytree: models, optimiser states, step, rng
  key), written collectively by every process (each its shards);
- ``extra/``: JSON (the config, the stage, its length, the process count),
  written by process 0;
- ``iterator/process_<i>-of-<n>.json``: the Grain iterator state of each of
  the run's n processes, one file each (Grain's Orbax handler). A resume reads
  its own process's file, so it needs the same number of processes.

Checkpoints of earlier versions kept the (single-process) iterator state in
``extra/`` as ``"iterator"``; they still resume.

Restoring needs a template of the state's layout; a checkpoint that cannot be
read (truncated, half-copied) is reported and the one before it is used
(`restore_newest_readable`). In a multi-process run every process restores the
same step: a checkpoint unreadable on one process is unreadable on all.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxbrats.errors import JaxbratsError, require
from jaxbrats.runtime.processes import lead
from jaxbrats.runtime.rundir import RunDir

ITERATOR = "iterator"  # the item holding one Grain iterator state per process


def _grain():
    """Grain, imported only where an iterator state is saved or restored: evaluating, predicting and
    benchmarking read checkpoints without it."""
    return require("grain", "saving or resuming the data iterator's state")


def checkpoint_manager(workdir: Path, stage: str, keep: int = 2, create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(RunDir(workdir).checkpoints(stage).absolute(), options=options)


def existing_manager(workdir: Path, stage: str) -> ocp.CheckpointManager | None:
    """The manager of a stage's checkpoints if its directory exists (nothing is created)."""
    exists = RunDir(workdir).checkpoints(stage).exists()
    return checkpoint_manager(workdir, stage, create=False) if exists else None


def on_first_device(abstract):
    """Abstract leaves that restore onto this process's first device (eval, predict, a frozen model)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)


class _IteratorState:
    """What Grain's checkpoint handler restores into: the state bytes, kept for the real
    iterator (made later, so nothing starts loading before the resume is decided)."""

    state: bytes | None = None

    def set_state(self, state: bytes) -> None:
        self.state = state

    def start_prefetch(self) -> None:
        pass


def iterator_processes(step_dir: Path) -> int | None:
    """How many processes wrote the iterator states of a checkpoint (None: it has no iterator item)."""
    if not (step_dir / ITERATOR).is_dir():
        return None
    counts = {
        int(m.group(1))
        for p in (step_dir / ITERATOR).iterdir()
        if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", p.name))
    }
    if len(counts) != 1:
        raise ValueError(f"its {ITERATOR} item holds no consistent set of process states")
    return counts.pop()


def iterator_state(extra: dict, manager: ocp.CheckpointManager, step: int) -> str:
    """This process's iterator state from what `restore(..., iterator=True)` returned; when the
    checkpoint was written by another number of processes, a `JaxbratsError` in one line (a
    stage that is complete needs no iterator and resumes with any number)."""
    if "iterator" in extra:
        return extra["iterator"]
    written_by, here = extra["iterator_processes"], jax.process_count()
    raise JaxbratsError(
        f"checkpoint {Path(manager.directory) / str(step)} holds the data iterators of {written_by} process(es) "
        f"and this run has {here}: an exact resume needs the same number of processes "
        f"(--num-processes {written_by}), or train in another --workdir"
    )


def restore(
    manager: ocp.CheckpointManager,
    template: dict,
    step: int | None = None,
    partial: bool = False,
    iterator: bool = False,
) -> tuple[dict, dict]:
    """(train state shaped like `template`, extra JSON: config, stage; with `iterator`, also this
    process's Grain iterator state as ``extra["iterator"]``, a string for `set_state`).

    `template` holds arrays or `jax.ShapeDtypeStruct`s (with the sharding to restore into,
    `sharding.with_shardings`). `partial`: `template` names a part of the saved state (e.g.
    only the models that predict) and only that part is read. `iterator`: the checkpoint must
    hold iterator states (else it counts as unreadable); when they were written by another
    number of processes than this run's, ``extra["iterator_processes"]`` says how many
    instead (`iterator_state` turns that into the user's error).
    """
    step = manager.latest_step() if step is None else step
    step_dir = Path(manager.directory) / str(step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    if partial:
        check_whole_models(step_dir / "state", abstract)
        args = ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True
        )
    else:
        args = ocp.args.StandardRestore(abstract)
    items = {"state": args, "extra": ocp.args.JsonRestore()}
    holder = _IteratorState()
    written_by = iterator_processes(step_dir) if iterator else None
    if written_by == jax.process_count():
        items[ITERATOR] = _grain().checkpoint.CheckpointRestore(holder)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    extra = dict(restored["extra"] or {})
    if not iterator:
        return restored["state"], extra
    if written_by is None:  # an earlier version's checkpoint: one process, its state in extra
        if "iterator" not in extra:
            raise ValueError("no data iterator state in it")
        written_by = 1
    if written_by != jax.process_count():
        extra.pop("iterator", None)
        extra["iterator_processes"] = written_by
    elif holder.state is not None:
        extra["iterator"] = holder.state.decode()
    return restored["state"], extra


def _name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _paths(tree) -> set[str]:
    """Variable paths as "a/b/c", whatever key kinds the tree uses (a saved tree ends in "value")."""
    out = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [_name(e) for e in path]
        out.add("/".join(names[:-1] if names and names[-1] == "value" else names))
    return out


def check_whole_models(state_dir: Path, abstract: dict) -> None:
    """A partial restore reads whole models: each model in `abstract["models"]` must have exactly
    the saved model's variables (a U-Net of other depth shares many paths and shapes)."""
    saved = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata
    saved = saved.tree if hasattr(saved, "tree") else saved
    for name, model in abstract.get("models", {}).items():
        if name not in saved.get("models", {}):
            raise ValueError(f"no model {name!r} in the checkpoint")
        want, have = _paths(model), _paths(saved["models"][name])
        if want != have:
            extra, missing = sorted(have - want), sorted(want - have)
            raise ValueError(
                f"model {name!r} differs: {len(extra)} saved variable(s) not in this model "
                f"({', '.join(extra[:2])}{', ...' if len(extra) > 2 else ''}), {len(missing)} missing"
            )


def restore_newest_readable(
    manager: ocp.CheckpointManager,
    template: dict,
    set_aside: bool = False,
    partial: bool = False,
    iterator: bool = False,
):
    """(state, extra, step) from the newest checkpoint that can be read; None when there is none.

    An unreadable checkpoint (truncated, half-copied) is reported in one line and the one
    before it is tried. With `set_aside`, the unreadable ones newer than the restored one are
    renamed ``unreadable-<step>`` so the run can write those steps again. When no checkpoint
    can be read, nothing is renamed and the run stops with one line naming them. `iterator`:
    see `restore`. With several processes, all restore the same step (process 0 reports and
    renames).
    """
    steps = sorted(manager.all_steps(), reverse=True)
    problems = []
    for step in steps:
        try:
            state, extra = restore(manager, template, step, partial, iterator)
            why = None
        except Exception as e:  # noqa: BLE001  orbax raises many kinds (JSON, tensorstore, OS, structure) for one cause
            why = _first_line(e)
        why = _agree(why)
        if why is not None:
            problems.append((Path(manager.directory) / str(step), why))
            continue
        if lead():
            for path, why in problems:
                print(f"warning: checkpoint {path} cannot be read ({why}); using step {step}", file=sys.stderr)
        if set_aside and problems:
            _set_aside(manager, [s for s in steps if s > step])
        return state, extra, step
    if problems:
        raise JaxbratsError(
            f"no readable checkpoint in {manager.directory}: {'; '.join(f'{p.name} ({why})' for p, why in problems)}. "
            f"Remove them to start the stage again, or use another --workdir"
        )
    return None


def _agree(why: str | None) -> str | None:
    """This process's reason a checkpoint cannot be read, or another process's: None when every process read it."""
    if jax.process_count() == 1:
        return why
    from jax.experimental import multihost_utils

    failed = np.asarray(multihost_utils.process_allgather(np.int32(why is not None)))
    if why is None and failed.any():
        return f"unreadable on process {int(np.flatnonzero(failed)[0])}"
    return why


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def _set_aside(manager: ocp.CheckpointManager, steps) -> None:
    directory = Path(manager.directory)
    if lead():  # one process renames; the others wait for it
        for step in steps:
            target = directory / f"unreadable-{step}"
            n = 1
            while target.exists():
                n += 1
                target = directory / f"unreadable-{step}.{n}"
            (directory / str(step)).rename(target)
            print(f"note: set aside as {target}", file=sys.stderr)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jaxbrats: set aside unreadable checkpoints in {directory}")
    manager.reload()


def save(manager: ocp.CheckpointManager, state: dict, extra: dict, iterator=None) -> None:
    """Write a checkpoint of `state` at its step; every process calls it (Orbax coordinates them).
    `iterator`: the Grain iterator whose state this process saves (``iterator/process_<i>-of-<n>.json``)."""
    step = int(jax.device_get(state["step"]))
    items = {"state": ocp.args.StandardSave(state), "extra": ocp.args.JsonSave(extra)}
    if iterator is not None:
        items[ITERATOR] = _grain().checkpoint.CheckpointSave(iterator)
    manager.save(step, args=ocp.args.Composite(**items), force=True)


def best_manager(workdir: Path, stage: str, create: bool = True) -> ocp.CheckpointManager | None:
    """The manager of a stage's best checkpoint (``checkpoints/<stage>/best``, one step kept); None
    when it does not exist and `create` is false. Orbax writes a step to a temporary folder and
    renames it when complete, and drops the older one after: a kill leaves the previous best whole."""
    path = RunDir(workdir).best(stage)
    if not create and not path.is_dir():
        return None
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(path.absolute(), options=options)


def save_best(manager: ocp.CheckpointManager, models: dict, step: int, record: dict) -> None:
    """Keep `models` at `step` as the best, with `record` (its score, which score) as JSON; every process calls it."""
    state = {"models": models, "step": np.int32(step)}
    items = {"state": ocp.args.StandardSave(state), "extra": ocp.args.JsonSave({**record, "step": step})}
    manager.save(step, args=ocp.args.Composite(**items), force=True)
    manager.wait_until_finished()


def best_record(manager: ocp.CheckpointManager | None) -> dict | None:
    """The record (score, step...) of the best checkpoint `manager` holds, or None."""
    if manager is None or manager.latest_step() is None:
        return None
    step = manager.latest_step()
    return dict(manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"] or {})


def restore_model(directory, names: tuple[str, ...], abstract, key: str):
    """The first model of `names` found in the newest checkpoint of `directory` (another run's
    `checkpoints/<stage>`), shaped like `abstract`; a problem is one line naming the config `key`."""
    from jaxbrats.errors import ConfigError

    path = Path(directory).absolute()
    if not path.is_dir():
        raise ConfigError(f"{key}: {directory} is not a directory (a run's checkpoints/<stage>)")
    manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False))
    if manager.latest_step() is None:
        raise ConfigError(f"{key}: no checkpoint in {directory}")
    template = on_first_device(abstract)
    problems = []
    for name in names:
        try:
            return restore(manager, {"models": {name: template}}, partial=True)[0]["models"][name]
        except Exception as e:  # noqa: BLE001  each candidate's first line goes into the one error
            problems.append(f"{name}: {_first_line(e)[:160]}")
    raise ConfigError(
        f"{key}: {directory} holds no model {' or '.join(names)} shaped like this run's: {'; '.join(problems)}"
    )
