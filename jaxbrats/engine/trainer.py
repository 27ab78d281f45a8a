"""The training engine: one jitted step per stage, sharded batches, Orbax checkpoints.

How a run goes (`train`):

1. The work directory is locked (one writer), and the resolved config, the
   train/val/test split and the cache's preprocessing settings are written to
   it (`jaxbrats.engine.workdir`); a resumed run reuses the split and may change only
   settings that leave the checkpoints valid (`workdir.RESUMABLE`), recorded in
   ``config_history.jsonl``.
2. For each of the method's stages, in order: if its newest readable
   checkpoint (`checkpoints.restore_newest_readable`) holds the final step,
   the stage is done; if it holds an earlier step, the models, optimiser
   states, step, rng and the Grain iterator state are restored and training
   continues bit for bit as an uninterrupted run; otherwise the stage starts
   from fresh models with the previous stage's variables carried over
   (`Method.carry`), or from `[stages.<name>] init_from`
   (`jaxbrats.engine.resume`).
3. The train state is a pytree: ``{"models": {name: nnx.State},
   "opt": {group: optax state}, "step": int32, "key": uint32[2]}``, split
   from the NNX graphs once (restore templates are abstract:
   `abstract_state`, no model is initialised to be overwritten).
   `make_train_step` closes over the graph definitions and optimisers; the
   updates of a step run in order and pass a *step context* (what an update
   computed for later ones, without gradient); `compile_step` compiles it ahead
   of time for the first batch (`jaxbrats.engine.step`), with the state
   donated, so a batch of another shape is refused rather than compiled again
   (the compile, or the load from the persistent compilation cache, is
   reported). The step's rng is ``fold_in(key, step)``,
   so a resumed run draws the same numbers. Nothing in the step talks to the host.
4. Batches are placed on the ("data", "model", "space") mesh of
   `jaxbrats.runtime.sharding`, split along "data"; the state is placed by the same
   module's rules (family members split along "model", x_sub along
   "space", the rest replicated), and the step keeps those shardings. With
   "space" > 1 each crop's depth is split and the U-Net's convolutions
   exchange halos (`networks.layers.halo_conv3d`).
5. Metrics stay on the device and are fetched every `log_every` steps (one
   transfer), checked for NaN/Inf, written to `metrics.jsonl` and TensorBoard
   (`tensorboard/`; `jaxbrats.engine.metrics_log`). A checkpoint is written
   only after the steps before it were checked, so a diverged run stops with
   the last good checkpoint.
6. With several processes (`jaxbrats train --distributed`), each loads its
   block of every batch (the one-process run's samples); process 0 alone writes the work directory's files
   (metrics, TensorBoard, config, splits, reports) and notes; every process
   takes part in each checkpoint, which holds each one's iterator state.
7. SIGTERM or SIGINT (`jaxbrats.runtime.signals`) stops the run after the step in
   flight, at a step all processes agree on: its checkpoint is saved, the metrics
   flushed, the lock released, and `TrainingStopped` raised (the command exits
   143 or 130); the same command resumes it.

Here: `Trainer` runs the stages in order (`run_stage`: where a stage starts, its step and
its data loader) and `StageLoop` the steps of one stage (compile, log, checkpoint, stop).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from jaxbrats.config import Config, to_dict
from jaxbrats.data.cache import CacheDataset
from jaxbrats.data.pipeline import PipelineConfig, make_loader
from jaxbrats.engine import workdir as workdir_files
from jaxbrats.engine.metrics_log import MetricsLog, PendingMetrics, TrainingDiverged
from jaxbrats.engine.optim import make_schedule
from jaxbrats.engine.resume import StageStarts
from jaxbrats.engine.step import compile_step, loss_keys, make_train_step
from jaxbrats.errors import JaxbratsError
from jaxbrats.methods import get_method
from jaxbrats.runtime import processes
from jaxbrats.runtime.checkpoints import checkpoint_manager, save
from jaxbrats.runtime.processes import lead
from jaxbrats.runtime.rundir import RunDir
from jaxbrats.runtime.sharding import check_families, make_mesh, place_batch, shard_state
from jaxbrats.runtime.signals import StopRequests, TrainingStopped

__all__ = ["StageLoop", "StepBudget", "Trainer", "TrainingDiverged", "TrainingStopped", "train"]


class StepBudget:
    """The steps this call may still run (`stop_after`; None: no limit), shared by its stages."""

    def __init__(self, steps: int | None):
        self.left = steps

    def spend(self) -> None:
        if self.left is not None:
            self.left -= 1

    @property
    def spent(self) -> bool:
        return self.left == 0


class Trainer:
    """Runs a method's stages for one work directory (see the module docstring)."""

    def __init__(self, config: Config, workdir, data_dir=None, only: tuple[str, ...] = (), validator=None):
        if config.train.validate_every and validator is None:
            raise JaxbratsError(
                "train.validate_every needs the evaluation: pass validator="
                "jaxbrats.evaluation.validation.StageValidation (as `jaxbrats train` does)"
            )
        self.config = config
        #: (trainer, stage, graphdefs) -> the stage's validation (`evaluation.validation.StageValidation`)
        self.validator = validator
        self.workdir = Path(workdir)
        self.method = get_method(config.method_name)(config)
        unknown = sorted(set(only) - set(self.method.stages))
        if unknown:
            raise JaxbratsError(
                f"--stage {unknown[0]}: not a stage of {config.method_name} "
                f"(its stages: {', '.join(self.method.stages)})"
            )
        self.only = tuple(only)  # run just these stages; earlier ones are loaded from their checkpoints
        workdir_files.refuse_imported(self.workdir, self.method.stages)
        self.cache = CacheDataset(data_dir or config.data.cache)
        self.mesh = make_mesh(config.train.mesh)
        self.starts = StageStarts(self.method, config, self.mesh, self.workdir)
        self.compiled_steps = {}  # stage -> the step function (its `.traces` counts Python traces)
        self.compilations = {}  # stage -> {"compiled": n, "loaded": n}: XLA compilations of its step in this call
        self.losses: list[tuple[str, int, float]] = []  # (stage, step, loss) for every step
        self.stop = StopRequests()
        self.stopped: tuple[str, int] | None = None  # (stage, step) saved on a stop signal

    def run(self, stop_after: int | None = None) -> dict:
        """Run (or resume) every stage; `stop_after` steps in this call, then checkpoint and return.

        Process 0 holds the work directory's lock for the whole run (`workdir.single_writer`);
        when it is refused, every process stops with its line (`processes.on_process_0`).
        SIGTERM and SIGINT are caught meanwhile (`StopRequests`; the caller's handlers are put
        back on return): the step in flight ends, is saved, and `TrainingStopped` is raised.
        """
        with contextlib.ExitStack() as held:
            processes.on_process_0(lambda: bool(held.enter_context(workdir_files.single_writer(self.workdir))))
            held.enter_context(self.stop)
            return self._run(stop_after)

    def _run(self, stop_after: int | None) -> dict:
        self.budget = StepBudget(stop_after)
        self.stopped = None
        self.splits = splits = workdir_files.prepare(self.workdir, self.config, self.cache)
        train_set = CacheDataset(self.cache.cache_dir, splits["train"])
        self.method.setup(train_set)
        saved = self.starts.saved_steps()
        self.log = MetricsLog(self.workdir, write=lead())  # process 0 writes metrics and TensorBoard
        self.log.truncate(saved)
        try:
            self._run_stages(train_set)
        finally:
            self.log.close()
        return {"workdir": str(self.workdir), "splits": {k: len(v) for k, v in splits.items()}}

    def _run_stages(self, train_set: CacheDataset) -> None:
        """The stages up to the last one asked for (`only`), in order; the others before it are loaded."""
        stages = self.method.stages
        last = max(stages.index(s) for s in self.only) if self.only else len(stages) - 1
        previous = None  # the models of the stage before
        for index, stage in enumerate(stages[: last + 1]):
            steps_per_epoch = max(len(train_set) // self.batch_size(stage), 1)
            total = self.method.stage_length(self.config, stage, steps_per_epoch)
            if self.only and stage not in self.only:
                previous = self.starts.finished_models(stage, total, previous)
                continue
            previous = self.run_stage(stage, index, total, train_set, previous)
            if self.stopped and (index < last or self.stopped[1] < total):  # a stop at the run's end is its end
                self._raise_stopped()
            if self.budget.spent:
                break

    def _raise_stopped(self) -> None:
        stage, step = self.stopped
        where = RunDir(self.workdir).checkpoints(stage)
        raise TrainingStopped(
            f"stopped by {self.stop.name} after step {step} of stage {stage}; saved checkpoint {step} in {where}; "
            f"resume with the same command",
            self.stop.signum,
        )

    def batch_size(self, stage: str) -> int:
        """Samples per step of a stage (global), checked against the data-parallel devices."""
        stage_config = self.config.stages.get(stage)
        batch = stage_config.batch_size if stage_config and stage_config.batch_size else self.config.data.batch_size
        if batch % self.mesh.shape["data"]:
            raise JaxbratsError(
                f"stage {stage}: batch size {batch} is not divisible by the {self.mesh.shape['data']} devices "
                f"of the mesh's data axis (train.mesh.data)"
            )
        return batch

    def validation(self, stage: str, graphdefs: dict):
        """The stage's validation (`train.validate_every`), or None: not asked for, or its models do not segment."""
        if not self.config.train.validate_every or not self.method.can_predict(stage):
            return None
        return self.validator(self, stage, graphdefs)

    def pipeline_config(self, stage: str, index: int) -> PipelineConfig:
        """This process's loader settings of a stage: ``[data]``'s, its share of the batch, what the method asks."""
        return PipelineConfig.from_config(
            self.config.data,
            batch_size=self.batch_size(stage) // jax.process_count(),
            seed=self.config.train.seed + index,
            **self.method.pipeline(stage),
        )

    def run_stage(self, stage: str, index: int, total: int, train_set: CacheDataset, previous) -> dict:
        """The models at the end of a stage's steps in this call, from where it starts (`resume.StageStarts`)."""
        families = self.method.families(stage)
        check_families(self.mesh, families)
        manager = checkpoint_manager(self.workdir, stage, self.config.train.keep_checkpoints)
        start = self.starts.start(stage, index, total, previous, manager)
        step = int(jax.device_get(start.state["step"]))
        self.log.truncate({stage: step})
        if step >= total:
            if lead():
                print(f"stage {stage}: complete ({step} steps), skipped")
                # Idempotent: redone in case a crash came between the last checkpoint and the reports.
                self.method.on_stage_end(stage, start.state["models"], self.workdir)
            return start.state["models"]
        state = shard_state(start.state, self.mesh, families)
        step_fn = make_train_step(self.method, stage, start.graphdefs, start.optimizers)
        self.compiled_steps[stage] = step_fn
        pipeline = self.pipeline_config(stage, index)
        iterator = iter(make_loader(train_set, pipeline))
        if start.iterator is not None:  # this process's own state (each reads its block of every batch)
            iterator.set_state(start.iterator.encode())
        loop = StageLoop(self, stage, total, manager, pipeline, self.validation(stage, start.graphdefs))
        state = loop.run(state, step_fn, iterator)
        if int(jax.device_get(state["step"])) == total and lead():  # reports: written once
            self.method.on_stage_end(stage, state["models"], self.workdir)
        return state["models"]


class StageLoop:
    """The steps of one stage in this call: the step compiled at the first batch, the metrics fetched,
    checked and logged every `train.log_every` steps, a checkpoint every `train.checkpoint_every`
    steps and at the stage's end, and a stop (saved) when the call's `StepBudget` is spent or a
    stop signal came (`Trainer.stop`, asked after every step); the stage's
    `validation` (or None) where it is due, after the metrics are checked, before the checkpoint."""

    def __init__(self, trainer: Trainer, stage: str, total: int, manager, pipeline: PipelineConfig, validation=None):
        self.trainer, self.stage, self.total, self.manager = trainer, stage, total, manager
        self.validation = validation
        method, self.settings = trainer.method, trainer.config.train
        schedules = {u.group: make_schedule(method.optimizer(stage, u.group), total) for u in method.updates(stage)}
        self.pending = PendingMetrics(trainer.log, stage, loss_keys(method, stage), schedules, trainer.losses)
        samples = pipeline.batch_size * jax.process_count() * pipeline.instantiations
        self.voxels = samples * int(np.prod(pipeline.crop_size))  # per step, for the throughput

    def run(self, state: dict, step_fn, iterator) -> dict:
        """The state after this call's steps of the stage, from the step `state` holds."""
        start = int(jax.device_get(state["step"]))
        self.bar = tqdm(
            total=self.total,
            initial=start,
            desc=self.stage,
            unit="step",
            disable=not (self.settings.progress and lead()),
            dynamic_ncols=True,
        )
        if start and lead():
            print(f"stage {self.stage}: resuming at step {start} of {self.total}")
        self.last_time, self.last_step = time.perf_counter(), start
        budget, stop, jitted = self.trainer.budget, self.trainer.stop, None
        stop.begin(start)  # before the compile: a stop signal during it ends the stage's first step
        try:
            for step in range(start + 1, self.total + 1):  # `step`: the step count once this one is done
                batch = place_batch(next(iterator), self.trainer.mesh)
                if jitted is None:
                    jitted = self._compile(step_fn, state, batch)
                    self.last_time = time.perf_counter()  # the rate excludes compilation
                state, metrics = jitted(state, batch)
                self.pending.add(step, metrics)
                budget.spend()
                stopping = stop.due(step)  # a Python flag, or JAX's agreed step: no transfer
                save_now = step == self.total or budget.spent or stopping or step % self.settings.checkpoint_every == 0
                validate_now = self.validation is not None and self.validation.due(step, self.total)
                if save_now or validate_now or step % self.settings.log_every == 0:
                    self._flush(step)
                if validate_now:
                    self._validate(state, step)
                if save_now:
                    self._save(state, iterator)
                if stopping:
                    self.trainer.stopped = (self.stage, step)
                if budget.spent or stopping:
                    break
        finally:
            self.bar.close()
            self.manager.wait_until_finished()
        return state

    def _compile(self, step_fn, state: dict, batch: dict):
        """The step compiled for this batch's shapes; the compile (or cache load) is reported and counted."""
        began = time.perf_counter()
        families = self.trainer.method.families(self.stage)
        compiled, counts = compile_step(step_fn, state, batch, self.trainer.mesh, families)
        how = "loaded from the compilation cache" if counts["loaded"] else "compiled"
        if lead():
            print(f"stage {self.stage}: train step {how} in {time.perf_counter() - began:.1f} s")
            if getattr(step_fn, "unlogged", ""):
                print(f"note: {step_fn.unlogged}; not logged in this stage")
        self.trainer.compilations[self.stage] = counts
        return compiled

    def _flush(self, step: int) -> None:
        """Write the metrics pending up to `step` and the throughput since the last flush; move the bar."""
        now = time.perf_counter()
        rate = (step - self.last_step) / (now - self.last_time)
        shown = self.pending.flush(self.manager, rate, self.voxels * rate)
        self.bar.set_postfix(**shown, vox_s=f"{self.voxels * rate:.3g}")
        self.bar.update(step - self.last_step)
        self.last_time, self.last_step = now, step

    def _validate(self, state: dict, step: int) -> None:
        """Validate the models of this step and log the row; its time stays out of the throughput."""
        row = self.validation(state["models"], step)
        self.trainer.log.write({"stage": self.stage, "step": step, **row})
        if lead():
            key = self.validation.score_key
            best = f" (best {row['val/best']:.4f})" if "val/best" in row else ""
            tqdm.write(f"stage {self.stage} step {step}: {key} {row.get(key, float('nan')):.4f}{best}")
        self.last_time = time.perf_counter()

    def _save(self, state: dict, iterator) -> None:
        extra = {
            "config": to_dict(self.trainer.config),
            "stage": self.stage,
            "total_steps": self.total,
            "processes": jax.process_count(),
        }
        save(self.manager, state, extra, iterator)


def train(
    config: Config,
    workdir,
    data_dir=None,
    stop_after: int | None = None,
    only: tuple[str, ...] = (),
    validator=None,
) -> Trainer:
    trainer = Trainer(config, workdir, data_dir, only, validator)
    trainer.run(stop_after)
    return trainer
