"""Orbax checkpoints of a stage: one directory per stage, one sub-directory per step.

A checkpoint holds the train state (a pytree: models, optimiser states, step,
rng key) and a JSON part (the Grain iterator state, the config, the stage).
Restoring needs a template of the state's layout; a checkpoint that cannot be
read (truncated, half-copied) is reported and the one before it is used
(`restore_newest_readable`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxbrats.errors import JaxbratsError


def checkpoint_manager(workdir: Path, stage: str, keep: int = 2, create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager((workdir / "checkpoints" / stage).absolute(), options=options)


def existing_manager(workdir: Path, stage: str) -> ocp.CheckpointManager | None:
    """The manager of a stage's checkpoints if its directory exists (nothing is created)."""
    path = Path(workdir) / "checkpoints" / stage
    return checkpoint_manager(Path(workdir), stage, create=False) if path.exists() else None


def on_first_device(abstract):
    """Abstract leaves that restore onto this process's first device (eval, predict, a frozen model)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)


def restore(manager: ocp.CheckpointManager, template: dict, step: int | None = None, partial: bool = False) -> tuple[dict, dict]:
    """(train state shaped like `template`, extra JSON: iterator state, config).

    `template` holds arrays or `jax.ShapeDtypeStruct`s (with the sharding to restore into,
    `sharding.with_shardings`). `partial`: `template` names a part of the saved state (e.g.
    only the models that predict) and only that part is read.
    """
    step = manager.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    if partial:
        check_whole_models(Path(manager.directory) / str(step) / "state", abstract)
        args = ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True)
    else:
        args = ocp.args.StandardRestore(abstract)
    restored = manager.restore(step, args=ocp.args.Composite(state=args, extra=ocp.args.JsonRestore()))
    return restored["state"], restored["extra"]


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
            raise ValueError(f"model {name!r} differs: {len(extra)} saved variable(s) not in this model "
                             f"({', '.join(extra[:2])}{', ...' if len(extra) > 2 else ''}), {len(missing)} missing")


def restore_newest_readable(manager: ocp.CheckpointManager, template: dict, set_aside: bool = False, partial: bool = False):
    """(state, extra, step) from the newest checkpoint that can be read; None when there is none.

    An unreadable checkpoint (truncated, half-copied) is reported in one line and the one
    before it is tried. With `set_aside`, the unreadable ones newer than the restored one are
    renamed ``unreadable-<step>`` so the run can write those steps again. When no checkpoint
    can be read, nothing is renamed and the run stops with one line naming them.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    problems = []
    for step in steps:
        try:
            state, extra = restore(manager, template, step, partial)
        except Exception as e:  # noqa: BLE001  orbax raises many kinds (JSON, tensorstore, OS, structure) for one cause
            problems.append((Path(manager.directory) / str(step), _first_line(e)))
            continue
        for path, why in problems:
            print(f"warning: checkpoint {path} cannot be read ({why}); using step {step}", file=sys.stderr)
        if set_aside and problems:
            _set_aside(manager, [s for s in steps if s > step])
        return state, extra, step
    if problems:
        raise JaxbratsError(f"no readable checkpoint in {manager.directory}: {'; '.join(f'{p.name} ({why})' for p, why in problems)}. "
                            f"Remove them to start the stage again, or use another --workdir")
    return None


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def _set_aside(manager: ocp.CheckpointManager, steps) -> None:
    directory = Path(manager.directory)
    for step in steps:
        target = directory / f"unreadable-{step}"
        n = 1
        while target.exists():
            n += 1
            target = directory / f"unreadable-{step}.{n}"
        (directory / str(step)).rename(target)
        print(f"note: set aside as {target}", file=sys.stderr)
    manager.reload()


def save(manager: ocp.CheckpointManager, state: dict, extra: dict) -> None:
    step = int(jax.device_get(state["step"]))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)), force=True)
