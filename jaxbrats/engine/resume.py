"""Where a stage's train state comes from: its own checkpoint, the stage before it, another run, or fresh models.

If a stage's newest readable checkpoint (`checkpoints.restore_newest_readable`) holds its
final step, the stage is done; if it holds an earlier step, the models, optimiser states,
step, rng and this process's Grain iterator state are restored and training continues bit
for bit as an uninterrupted run; otherwise the stage starts from fresh models with the
previous stage's variables carried over (`Method.carry`), or from ``[stages.<name>]
init_from`` (another run's checkpoints), and the method may add models from outside
(`Method.start_from`, e.g. a frozen teacher). Restore templates are abstract
(`state.abstract_state`): no model is initialised only to be overwritten.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import orbax.checkpoint as ocp

from jaxbrats.config import Config
from jaxbrats.engine.optim import stage_optimizers
from jaxbrats.engine.state import abstract_models, abstract_state, init_state
from jaxbrats.errors import JaxbratsError
from jaxbrats.methods import Method
from jaxbrats.runtime.checkpoints import existing_manager, iterator_state, restore_newest_readable
from jaxbrats.runtime.processes import lead
from jaxbrats.runtime.sharding import state_shardings, with_shardings


class Start(NamedTuple):
    """How a stage starts in this call."""

    graphdefs: dict
    state: dict  # the train state (`state.init_state`), restored or new
    optimizers: dict  # group -> optax transformation
    iterator: str | None  # this process's Grain iterator state to resume from; None: a new stream


class StageStarts:
    """The starting state of each stage of `method` in the work directory `workdir`, placed on `mesh`."""

    def __init__(self, method: Method, config: Config, mesh, workdir: Path):
        self.method, self.config, self.mesh, self.workdir = method, config, mesh, Path(workdir)

    def optimizers(self, stage: str, total: int) -> dict:
        return stage_optimizers(self.method, stage, total)

    def template(self, stage: str, total: int):
        """(graph definitions, abstract train state carrying the mesh shardings a restore puts it in)."""
        graphdefs, abstract = abstract_state(self.method, stage, self.optimizers(stage, total))
        return graphdefs, with_shardings(abstract, state_shardings(abstract, self.mesh, self.method.families(stage)))

    def saved_steps(self) -> dict[str, int]:
        """The newest checkpointed step of each stage (0: none): where each would resume."""
        steps = {}
        for stage in self.method.stages:
            manager = existing_manager(self.workdir, stage)
            steps[stage] = (manager.latest_step() or 0) if manager else 0
        return steps

    def finished_models(self, stage: str, total: int, previous):
        """Models of a stage that is not run now: its checkpoint in this run, or `previous` when it has none."""
        manager = existing_manager(self.workdir, stage)
        if manager is None or manager.latest_step() is None:
            return previous
        state, _, step = restore_newest_readable(manager, self.template(stage, total)[1])
        if step < total:
            raise JaxbratsError(
                f"stage {stage} stopped at step {step} of {total} in {self.workdir}: "
                f"finish it first (train without --stage, or with --stage {stage})"
            )
        if lead():
            print(f"stage {stage}: not run now; its models come from its final checkpoint")
        return state["models"]

    def start(self, stage: str, index: int, total: int, previous, manager: ocp.CheckpointManager) -> Start:
        """A stage's start: resumed from its checkpoints in `manager`, or from the models carried over."""
        optimizers = self.optimizers(stage, total)
        if manager.all_steps():
            graphdefs, template = self.template(stage, total)
            resumed = restore_newest_readable(manager, template, set_aside=True, iterator=True)
            if resumed is not None:
                state, extra, step = resumed  # a complete stage needs no iterator: any process count reads it
                iterator = iterator_state(extra, manager, step) if step < total else None
                return Start(graphdefs, state, optimizers, iterator)
        carried = self._carried(stage, index, previous)
        graphdefs, state = init_state(self.method, stage, self.config.train.seed + index, optimizers, carried)
        return Start(graphdefs, state, optimizers, None)

    def _carried(self, stage: str, index: int, previous) -> dict | None:
        """The models a new stage starts from: `init_from`'s or the previous stage's, plus the method's own."""
        init_from = self.config.stages[stage].init_from if stage in self.config.stages else ""
        if init_from:
            previous = self._models_from(Path(init_from), stage, index)
        if previous is None and index > 0:
            before = self.method.stages[index - 1]
            raise JaxbratsError(
                f"stage {stage} starts from stage {before}, which has no checkpoint in {self.workdir}: "
                f"train {before} first or set stages.{stage}.init_from to a checkpoint directory"
            )
        outside = self.method.start_from(stage, lambda: abstract_models(self.method, stage)[1])
        if outside:
            previous = {**(previous or {}), **outside}
        return previous

    def _models_from(self, source: Path, stage: str, index: int) -> dict:
        """The models of another run's stage checkpoints in `source`: the stage it names, or the one before `stage`."""
        other = ocp.CheckpointManager(source.absolute(), options=ocp.CheckpointManagerOptions(create=False))
        if other.latest_step() is None:
            raise JaxbratsError(f"{source}: no checkpoint to start stage {stage} from")
        name = source.name if source.name in self.method.stages else self.method.stages[max(index - 1, 0)]
        template = self.template(name, 1)[1]  # the schedule length does not change the layout
        return restore_newest_readable(other, template)[0]["models"]
