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

Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it to
``<step>`` once whole, so a write that fails or is killed never leaves a
step folder a resume would take; Orbax lists only the renamed ones. A write
that fails for the storage (a full disk, a quota, permissions: Orbax raises
tensorstore's ``RESOURCE_EXHAUSTED`` ValueError or an OSError, and its
background threads log a traceback each) is one line, `CheckpointWriteError`,
naming the step's folder and the cause; the unfinished folder is removed,
and one a killed run left is removed when the stage's manager is made for
training (`checkpoint_manager`, `best_manager`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import shutil
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxbrats.errors import JaxbratsError, require
from jaxbrats.files import storage_cause
from jaxbrats.runtime.processes import lead
from jaxbrats.runtime.rundir import RunDir

ITERATOR = "iterator"  # the item holding one Grain iterator state per process
#: An unfinished step folder: Orbax writes step S under "S.orbax-checkpoint-tmp" (newer versions add
#: "-<time>") and renames it to "S" once whole.
UNFINISHED = re.compile(r"(\d+)\.orbax-checkpoint-tmp(-\d+)?")


class CheckpointWriteError(JaxbratsError):
    """A checkpoint could not be written (a full disk, a quota, permissions): its folder and the cause in one line."""


def _grain():
    """Grain, imported only where an iterator state is saved or restored: evaluating, predicting and
    benchmarking read checkpoints without it."""
    return require("grain", "saving or resuming the data iterator's state")


def checkpoint_manager(workdir: Path, stage: str, keep: int = 2, create: bool = True) -> ocp.CheckpointManager:
    """The manager of a stage's checkpoints; with `create` (training), the unfinished step folders a
    killed or failed write left are removed first (`remove_unfinished`)."""
    directory = RunDir(workdir).checkpoints(stage).absolute()
    if create:
        remove_unfinished(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory, options=options)


def remove_unfinished(directory: Path, step: int | None = None) -> None:
    """Remove the unfinished step folders (``<step>.orbax-checkpoint-tmp``) in `directory` that a killed
    write left, each with a note, or only `step`'s, that just failed (quietly: its error says so).
    Orbax never lists them, but they hold disk space, and Orbax warns when it meets one. Process 0
    removes them; a run holds the work directory's lock, so no other writer is using them."""
    if not lead() or not directory.is_dir():
        return
    for path in sorted(directory.iterdir()):
        found = UNFINISHED.fullmatch(path.name)
        if not found or not path.is_dir() or (step is not None and int(found.group(1)) != step):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if step is None:
            print(f"note: removed the unfinished checkpoint {path}, which a write cut short left", file=sys.stderr)


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
    # The item's own handler: a Checkpointer would look for the step's _CHECKPOINT_METADATA inside
    # the item folder (it lies one level up) and log an absl warning on every partial restore.
    handler = ocp.PyTreeCheckpointHandler()
    try:
        saved = handler.metadata(state_dir)
    finally:
        handler.close()
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
    with writing(manager, step, "the checkpoint"):
        manager.save(step, args=ocp.args.Composite(**items), force=True)


class _OrbaxWriteFailures(logging.Filter):
    """Drops what Orbax logs, a traceback each, when a write fails: one record per background thread
    (absl's logger), and asyncio's "Task exception was never retrieved" for each array write left
    unawaited, when it is collected. The failure itself reaches `writing`, which reports it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if "_SignalingThread.run() raised an exception" in message:
            return False
        return not ("exception was never retrieved" in message and "orbax" in message)


class _ClosedLoopReports:
    """A `sys.unraisablehook` that drops the "Event loop is closed" RuntimeErrors of a failed write:
    tensorstore's threads finish the array writes Orbax no longer awaits and report to the asyncio
    loop Orbax closed, once each (a hundred tracebacks for a large state); the rest go to `previous`."""

    def __init__(self):
        self.previous = sys.unraisablehook

    def __call__(self, unraisable) -> None:
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            self.previous(unraisable)


_QUIET = _OrbaxWriteFailures()
_QUIET_LOGGERS = ("absl", "asyncio")
_CLOSED_LOOP = _ClosedLoopReports()


def _quiet(on: bool) -> None:
    """Hide (or show again) what Orbax and tensorstore report of a failed write besides its error."""
    for name in _QUIET_LOGGERS:
        (logging.getLogger(name).addFilter if on else logging.getLogger(name).removeFilter)(_QUIET)
    if on and sys.unraisablehook is not _CLOSED_LOOP:
        _CLOSED_LOOP.previous, sys.unraisablehook = sys.unraisablehook, _CLOSED_LOOP
    elif not on and sys.unraisablehook is _CLOSED_LOOP:
        sys.unraisablehook = _CLOSED_LOOP.previous


#: How tensorstore's errors begin: an absl status code ("RESOURCE_EXHAUSTED: ...").
_STATUS = re.compile(r"([A-Z]+(?:_[A-Z]+)+|INTERNAL|UNKNOWN|ABORTED|UNAVAILABLE): ")


def storage_error(error: BaseException) -> BaseException | None:
    """The storage failure in `error` or the errors it came from (an OSError, or tensorstore's status
    error, which Orbax passes on as a ValueError or RuntimeError), or None: another kind of bug."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) or (isinstance(error, (ValueError, RuntimeError)) and _STATUS.match(str(error))):
            return error
        error = error.__cause__ or error.__context__
    return None


def _shown(path: Path) -> str:
    """`path` as the user likely named it: relative to the working directory when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _write_failure(directory: Path, step: int, what: str, error: BaseException, kept: int | None) -> str:
    """The one line of a failed write: the step's folder, the cause in words, the error's first line
    (its paths made relative to the stage's folder), the step still whole and what to do."""
    status = _STATUS.match(str(error))
    cause = storage_cause(error) or (status.group(1).lower().replace("_", " ") if status else "a storage error")
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    detail = detail.replace(f"{directory}/", "")[:300]
    if not status:
        detail = f"{type(error).__name__}: {detail}"
    full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT)  # tensorstore: RESOURCE_EXHAUSTED
    room = full or bool(status and status.group(1) == "RESOURCE_EXHAUSTED")
    whole = f"step {kept} is whole" if kept is not None else "no earlier one was written"
    return (
        f"{_shown(directory / str(step))}: cannot write {what}: {cause} ({detail}); {whole}: "
        f"{'make room' if room else 'fix that'} and train again to resume"
    )


@contextlib.contextmanager
def writing(manager: ocp.CheckpointManager, step: int, what: str):
    """Around Orbax writing `step` into `manager`: a storage failure becomes one `CheckpointWriteError`
    naming the step's folder, the cause and the step that is still whole, the unfinished folder is
    removed (one process only: with several, the next start removes it), and Orbax's and
    tensorstore's tracebacks of the failure are not shown (`_quiet`, left on after a failure: they
    come as the unawaited writes finish). Other errors pass unchanged."""
    _quiet(True)
    failed = False
    try:
        yield
    except Exception as e:
        storage = storage_error(e)
        if storage is None:
            raise
        failed = True
        # Orbax's coroutines that the failure left unawaited warn when collected, at the latest at exit.
        warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
        directory = Path(manager.directory)
        if jax.process_count() == 1:
            remove_unfinished(directory, step)
        raise CheckpointWriteError(_write_failure(directory, step, what, storage, manager.latest_step())) from e
    finally:
        if not failed:
            _quiet(False)


def best_manager(workdir: Path, stage: str, create: bool = True) -> ocp.CheckpointManager | None:
    """The manager of a stage's best checkpoint (``checkpoints/<stage>/best``, one step kept); None
    when it does not exist and `create` is false. Orbax writes a step to a temporary folder and
    renames it when complete, and drops the older one after: a kill leaves the previous best whole."""
    path = RunDir(workdir).best(stage)
    if not create and not path.is_dir():
        return None
    if create:
        remove_unfinished(path.absolute())
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(path.absolute(), options=options)


def save_best(manager: ocp.CheckpointManager, models: dict, step: int, record: dict) -> None:
    """Keep `models` at `step` as the best, with `record` (its score, which score) as JSON; every process calls it."""
    state = {"models": models, "step": np.int32(step)}
    items = {"state": ocp.args.StandardSave(state), "extra": ocp.args.JsonSave({**record, "step": step})}
    with writing(manager, step, "the best checkpoint"):
        manager.save(step, args=ocp.args.Composite(**items), force=True)
        manager.wait_until_finished()


def best_record(manager: ocp.CheckpointManager | None) -> dict | None:
    """The record (score, step...) of the best checkpoint `manager` holds, or None."""
    if manager is None or manager.latest_step() is None:
        return None
    step = manager.latest_step()
    try:
        return dict(manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"] or {})
    except Exception as e:  # noqa: BLE001  orbax raises many kinds (JSON, tensorstore, OS) for one cause
        folder = _shown(Path(manager.directory) / str(step))
        raise JaxbratsError(
            f"{folder}: cannot read the best checkpoint's record ({_first_line(e)}); remove the folder to keep "
            f"the best anew"
        ) from e


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
