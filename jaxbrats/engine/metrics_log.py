"""metrics.jsonl and TensorBoard: the training log, truncated to a resumed step; the NaN/Inf guard.

Metrics stay on the device until they are fetched, every `train.log_every` steps
(`PendingMetrics.flush`: one transfer), checked for NaN/Inf and written.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from jaxbrats.errors import JaxbratsError, require
from jaxbrats.files import write_text_atomic
from jaxbrats.runtime.rundir import RunDir


class TrainingDiverged(JaxbratsError):
    """A metric became NaN or Inf: the run stops, its last checkpoint holding good steps only."""


class MetricsLog:
    """JSON lines plus TensorBoard event files in the work directory.

    Only one process of a multi-process run writes them (`write` False elsewhere: every
    call does nothing), so each row is written once.
    """

    def __init__(self, workdir: Path, write: bool = True):
        run = RunDir(workdir)
        self.path = run.metrics
        self.enabled = write
        self.writer = None
        if write:
            tensorboard = require("tensorboardX", "the training's TensorBoard log")
            self.writer = tensorboard.SummaryWriter(str(run.tensorboard))

    def truncate(self, resume_step: dict[str, int]) -> None:
        """Drop the rows of these stages past the step each resumes from: they are about to be redone."""
        if not self.enabled or not self.path.exists():
            return
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        keep = [r for r in rows if r["step"] <= resume_step.get(r["stage"], r["step"])]
        if len(keep) < len(rows):
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:  # one row appended: a reader sees whole rows
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if isinstance(value, float):
                self.writer.add_scalar(f"{row['stage']}/{key}", value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class PendingMetrics:
    """The metrics of a stage's steps since the last fetch, still on the device.

    `loss_keys`: each update group's loss (`step.loss_keys`), the first of which goes into
    `losses` as (stage, step, loss) for every step; `schedules`: each group's learning-rate
    schedule, logged as ``lr/<group>``.
    """

    def __init__(self, log: MetricsLog, stage: str, loss_keys: list[str], schedules: dict, losses: list):
        self.log, self.stage, self.loss_keys, self.schedules, self.losses = log, stage, loss_keys, schedules, losses
        self.steps: list[tuple[int, dict]] = []  # (step, metrics on the device)

    def add(self, step: int, metrics: dict) -> None:
        self.steps.append((step, metrics))

    def flush(self, manager, steps_per_s: float, voxels_per_s: float) -> dict:
        """Fetch, check and write the pending metrics, then the stage's throughput; each group's
        latest loss for the progress bar. A NaN or Inf stops the run (`TrainingDiverged`) naming
        the last checkpoint of `manager`, written before these steps."""
        fetched = jax.device_get([metrics for _, metrics in self.steps])
        for (step, _), metrics in zip(self.steps, fetched):
            values = {k: float(v) for k, v in metrics.items()}
            self._check_finite(step, values, manager)
            self.losses.append((self.stage, step, values[self.loss_keys[0]]))
            row = {"stage": self.stage, "step": step, **values}
            row.update({f"lr/{group}": float(schedule(step - 1)) for group, schedule in self.schedules.items()})
            self.log.write(row)
        last = self.steps[-1][0]
        self.log.write(
            {"stage": self.stage, "step": last, "steps_per_s": float(steps_per_s), "voxels_per_s": float(voxels_per_s)}
        )
        self.steps = []
        return {k.replace("/", "_"): f"{values[k]:.4f}" for k in self.loss_keys}

    def _check_finite(self, step: int, values: dict, manager) -> None:
        bad = [k for k, v in values.items() if not np.isfinite(v)]
        if not bad:
            return
        good = manager.latest_step()
        where = f"step {good} in {manager.directory}" if good is not None else "none (no checkpoint yet)"
        raise TrainingDiverged(
            f"stage {self.stage}: {', '.join(bad)} became {values[bad[0]]} at step {step}; "
            f"training stopped. Last good checkpoint: {where}"
        )
