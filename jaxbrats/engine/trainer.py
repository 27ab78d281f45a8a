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
   (`Method.carry`), or from `[stages.<name>] init_from`.
3. The train state is a pytree: ``{"models": {name: nnx.State},
   "opt": {group: optax state}, "step": int32, "key": uint32[2]}``, split
   from the NNX graphs once (restore templates are abstract:
   `abstract_state`, no model is initialised to be overwritten).
   `make_train_step` closes over the graph definitions and optimisers; the
   updates of a step run in order and pass a *step context* (what an update
   computed for later ones, without gradient); it is compiled ahead of time for the first
   batch, with the state donated, so a batch of another shape is refused
   rather than compiled again (the compile, or the load from the persistent
   compilation cache, is reported). The step's rng is ``fold_in(key, step)``,
   so a resumed run draws the same numbers. Nothing in the step talks to the host.
4. Batches are placed on the ("data", "model", "space") mesh of
   `jaxbrats.runtime.sharding`, split along "data"; the state is placed by the same
   module's rules (family members split along "model", x_sub along
   "space", the rest replicated), and the step keeps those shardings. With
   "space" > 1 each crop's depth is split and the U-Net's convolutions
   exchange halos (`networks.layers.halo_conv3d`).
5. Metrics stay on the device and are fetched every `log_every` steps (one
   transfer), checked for NaN/Inf, written to `metrics.jsonl` and TensorBoard
   (`tensorboard/`). A checkpoint is written only after the steps before it
   were checked, so a diverged run stops with the last good checkpoint.
6. With several processes (`jaxbrats train --distributed`), each reads its
   own share of the cases; process 0 alone writes the work directory's files
   (metrics, TensorBoard, config, splits, reports) and notes; every process
   takes part in each checkpoint, which holds each one's iterator state.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from jaxbrats.config import Config, to_dict
from jaxbrats.data.cache import CacheDataset
from jaxbrats.data.pipeline import PipelineConfig, make_loader
from jaxbrats.engine import workdir as workdir_files
from jaxbrats.engine.metrics_log import MetricsLog
from jaxbrats.engine.optim import make_schedule, stage_optimizers
from jaxbrats.engine.state import abstract_models, abstract_state, init_state
from jaxbrats.engine.step import loss_keys, make_train_step
from jaxbrats.errors import JaxbratsError
from jaxbrats.methods import get_method
from jaxbrats.runtime import compilation, processes
from jaxbrats.runtime.checkpoints import (
    checkpoint_manager,
    existing_manager,
    iterator_state,
    restore_newest_readable,
    save,
)
from jaxbrats.runtime.processes import lead
from jaxbrats.runtime.sharding import (
    check_families,
    make_mesh,
    place_batch,
    replicated,
    shard_state,
    state_shardings,
    with_shardings,
)


class TrainingDiverged(JaxbratsError):
    pass


class Trainer:
    """Runs a method's stages for one work directory (see the module docstring)."""

    def __init__(self, config: Config, workdir, data_dir=None, only: tuple[str, ...] = ()):
        self.config = config
        self.workdir = Path(workdir)
        self.method = get_method(config.method_name)(config)
        unknown = sorted(set(only) - set(self.method.stages))
        if unknown:
            raise JaxbratsError(
                f"--stage {unknown[0]}: not a stage of {config.method_name} (its stages: {', '.join(self.method.stages)})"
            )
        self.only = tuple(only)  # run just these stages; earlier ones are loaded from their checkpoints
        workdir_files.refuse_imported(self.workdir, self.method.stages)
        self.cache = CacheDataset(data_dir or config.data.cache)
        self.mesh = make_mesh(config.train.mesh)
        self.compiled_steps = {}  # stage -> the step function (its `.traces` counts Python traces)
        self.compilations = {}  # stage -> {"compiled": n, "loaded": n}: XLA compilations of its step in this call
        self.losses: list[tuple[str, int, float]] = []  # (stage, step, loss) for every step

    def run(self, stop_after: int | None = None) -> dict:
        """Run (or resume) every stage; `stop_after` steps in this call, then checkpoint and return.

        Process 0 holds the work directory's lock for the whole run (`workdir.single_writer`);
        when it is refused, every process stops with its line (`processes.on_process_0`).
        """
        with contextlib.ExitStack() as held:
            processes.on_process_0(lambda: bool(held.enter_context(workdir_files.single_writer(self.workdir))))
            return self._run(stop_after)

    def _run(self, stop_after: int | None) -> dict:
        self.budget = stop_after
        splits = workdir_files.prepare(self.workdir, self.config, self.cache)
        train_set = CacheDataset(self.cache.cache_dir, splits["train"])
        self.method.setup(train_set)
        resume = {}
        for stage in self.method.stages:
            manager = existing_manager(self.workdir, stage)
            resume[stage] = (manager.latest_step() or 0) if manager else 0
        self.log = MetricsLog(self.workdir, write=lead())  # process 0 writes metrics and TensorBoard
        self.log.truncate(resume)
        try:
            previous = None
            last = max(self.method.stages.index(s) for s in self.only) if self.only else len(self.method.stages) - 1
            for index, stage in enumerate(self.method.stages[: last + 1]):
                steps_per_epoch = max(len(train_set) // self.batch_size(stage), 1)
                total = self.method.stage_length(self.config, stage, steps_per_epoch)
                if self.only and stage not in self.only:
                    previous = self.load_stage(stage, total, previous)
                    continue
                previous = self.run_stage(stage, index, total, train_set, previous)
                if self.budget == 0:
                    break
        finally:
            self.log.close()
        return {"workdir": str(self.workdir), "splits": {k: len(v) for k, v in splits.items()}}

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

    def load_stage(self, stage: str, total: int, previous):
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

    def optimizers(self, stage: str, total: int) -> dict:
        return stage_optimizers(self.method, stage, total)

    def template(self, stage: str, total: int):
        """(graph definitions, abstract train state carrying the mesh shardings a restore puts it in)."""
        graphdefs, abstract = abstract_state(self.method, stage, self.optimizers(stage, total))
        return graphdefs, with_shardings(abstract, state_shardings(abstract, self.mesh, self.method.families(stage)))

    def stage_start(self, stage, index, total, previous, manager):
        """(graphdefs, state, optimizers, iterator state or None) of a stage: resumed, carried or fresh."""
        optimizers = self.optimizers(stage, total)
        if manager.all_steps():  # an abstract template: no model is initialised only to be overwritten
            graphdefs, template = self.template(stage, total)
            resumed = restore_newest_readable(manager, template, set_aside=True, iterator=True)
            if resumed is not None:
                state, extra, step = resumed  # a complete stage needs no iterator: any process count reads it
                return graphdefs, state, optimizers, iterator_state(extra, manager, step) if step < total else None
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
        graphdefs, state = init_state(self.method, stage, self.config.train.seed + index, optimizers, previous)
        return graphdefs, state, optimizers, None

    def _models_from(self, source: Path, stage: str, index: int) -> dict:
        """The models of another run's stage checkpoints in `source`: the stage it names, or the one before `stage`."""
        other = ocp.CheckpointManager(source.absolute(), options=ocp.CheckpointManagerOptions(create=False))
        if other.latest_step() is None:
            raise JaxbratsError(f"{source}: no checkpoint to start stage {stage} from")
        name = source.name if source.name in self.method.stages else self.method.stages[max(index - 1, 0)]
        template = self.template(name, 1)[1]  # the schedule length does not change the layout
        return restore_newest_readable(other, template)[0]["models"]

    def pipeline_config(self, stage: str, index: int) -> PipelineConfig:
        d = self.config.data
        return PipelineConfig(
            crop_size=d.crop_size,
            batch_size=self.batch_size(stage) // jax.process_count(),
            foreground_oversample=d.foreground_oversample,
            flip_probability=d.flip_probability,
            intensity_scale=d.intensity_scale,
            intensity_shift=d.intensity_shift,
            rotation_degrees=d.rotation_degrees,
            rotation_probability=d.rotation_probability,
            seed=self.config.train.seed + index,
            workers=d.workers,
            prefetch=d.prefetch,
            **self.method.pipeline(stage),
        )

    def compile_step(self, stage: str, step_fn, state, batch):
        """The step compiled once for these shapes (a batch of other shapes is refused, never recompiled).

        The new state keeps the input state's shardings (family members stay split along
        "model"); the metrics come back replicated.
        """
        compilation.watch()
        before = compilation.counts(step_fn.__name__)
        start = time.perf_counter()
        shardings = state_shardings(state, self.mesh, self.method.families(stage))
        jitted = jax.jit(step_fn, donate_argnums=0, out_shardings=(shardings, replicated(self.mesh)))
        with jax.set_mesh(self.mesh):  # layers see whether the depth is split (networks.layers.space_shards)
            compiled = jitted.lower(state, batch).compile()
        after = compilation.counts(step_fn.__name__)
        how = "loaded from the compilation cache" if after["loaded"] > before["loaded"] else "compiled"
        if lead():
            print(f"stage {stage}: train step {how} in {time.perf_counter() - start:.1f} s")
            if getattr(step_fn, "unlogged", ""):
                print(f"note: {step_fn.unlogged}; not logged in this stage")
        self.compilations[stage] = {k: after[k] - before[k] for k in ("compiled", "loaded")}
        return compiled

    def run_stage(self, stage: str, index: int, total: int, train_set: CacheDataset, previous) -> dict:
        cfg = self.config
        families = self.method.families(stage)
        check_families(self.mesh, families)
        manager = checkpoint_manager(self.workdir, stage, cfg.train.keep_checkpoints)
        graphdefs, state, optimizers, iterator_state = self.stage_start(stage, index, total, previous, manager)
        start = int(jax.device_get(state["step"]))
        self.log.truncate({stage: start})
        if start >= total:
            if lead():
                print(f"stage {stage}: complete ({start} steps), skipped")
                self.method.on_stage_end(
                    stage, state["models"], self.workdir
                )  # idempotent: redone if a crash came before it
            return state["models"]
        state = shard_state(state, self.mesh, families)
        step_fn = make_train_step(self.method, stage, graphdefs, optimizers)
        self.compiled_steps[stage] = step_fn

        pipeline = self.pipeline_config(stage, index)
        iterator = iter(make_loader(train_set, pipeline))
        if iterator_state is not None:  # this process's own state (each reads its shard of the cases)
            iterator.set_state(iterator_state.encode())
        schedules = {
            u.group: make_schedule(self.method.optimizer(stage, u.group), total) for u in self.method.updates(stage)
        }
        voxels = pipeline.batch_size * jax.process_count() * pipeline.instantiations * int(np.prod(cfg.data.crop_size))
        pending, last_time, last_step = [], time.perf_counter(), start
        bar = tqdm(
            total=total,
            initial=start,
            desc=f"{stage}",
            unit="step",
            disable=not (cfg.train.progress and lead()),
            dynamic_ncols=True,
        )
        if start and lead():
            print(f"stage {stage}: resuming at step {start} of {total}")
        jitted = None
        try:
            for step in range(start, total):
                batch = place_batch(next(iterator), self.mesh)
                if jitted is None:
                    jitted = self.compile_step(stage, step_fn, state, batch)
                    last_time = time.perf_counter()  # the rate excludes compilation
                state, metrics = jitted(state, batch)
                pending.append((step + 1, metrics))
                if self.budget is not None:
                    self.budget -= 1
                last = step + 1 == total or self.budget == 0
                save_now = last or (step + 1) % cfg.train.checkpoint_every == 0
                if save_now or (step + 1) % cfg.train.log_every == 0:
                    now = time.perf_counter()
                    rate = (step + 1 - last_step) / (now - last_time)
                    shown = self._flush(stage, pending, manager, rate, voxels * rate, schedules)
                    bar.set_postfix(**shown, vox_s=f"{voxels * rate:.3g}")
                    bar.update(step + 1 - last_step)
                    pending, last_time, last_step = [], now, step + 1
                if save_now:
                    save(
                        manager,
                        state,
                        {
                            "config": to_dict(cfg),
                            "stage": stage,
                            "total_steps": total,
                            "processes": jax.process_count(),
                        },
                        iterator,
                    )
                if self.budget == 0:
                    break
        finally:
            bar.close()
            manager.wait_until_finished()
        if int(jax.device_get(state["step"])) == total and lead():  # reports: written once
            self.method.on_stage_end(stage, state["models"], self.workdir)
        return state["models"]

    def _flush(self, stage, pending, manager, rate, voxel_rate, schedules) -> dict:
        """Fetch, check and write the pending metrics; each group's latest loss for the progress bar."""
        keys = loss_keys(self.method, stage)
        fetched = jax.device_get([m for _, m in pending])
        for (step, _), metrics in zip(pending, fetched):
            values = {k: float(v) for k, v in metrics.items()}
            bad = [k for k, v in values.items() if not np.isfinite(v)]
            if bad:
                good = manager.latest_step()
                where = f"step {good} in {manager.directory}" if good is not None else "none (no checkpoint yet)"
                raise TrainingDiverged(
                    f"stage {stage}: {', '.join(bad)} became {values[bad[0]]} at step {step}; training stopped. Last good checkpoint: {where}"
                )
            self.losses.append((stage, step, values[keys[0]]))
            row = {"stage": stage, "step": step, **values}
            row.update({f"lr/{group}": float(schedule(step - 1)) for group, schedule in schedules.items()})
            self.log.write(row)
        self.log.write(
            {"stage": stage, "step": pending[-1][0], "steps_per_s": float(rate), "voxels_per_s": float(voxel_rate)}
        )
        return {k.replace("/", "_"): f"{values[k]:.4f}" for k in keys}


def train(config: Config, workdir, data_dir=None, stop_after: int | None = None, only: tuple[str, ...] = ()) -> Trainer:
    trainer = Trainer(config, workdir, data_dir, only)
    trainer.run(stop_after)
    return trainer
