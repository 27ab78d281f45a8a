"""metrics.jsonl and TensorBoard: the training log, truncated to a resumed step."""

from __future__ import annotations

import json
from pathlib import Path

from jaxbrats.engine.workdir import load_splits  # noqa: F401  (eval and the demo read a run's splits from here)


class MetricsLog:
    """JSON lines plus TensorBoard event files in the work directory.

    Only one process of a multi-process run writes them (`write` False elsewhere: every
    call does nothing), so each row is written once.
    """

    def __init__(self, workdir: Path, write: bool = True):
        self.path = workdir / "metrics.jsonl"
        self.enabled = write
        self.writer = None
        if write:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(workdir / "tensorboard"))

    def truncate(self, resume_step: dict[str, int]) -> None:
        """Drop the rows of these stages past the step each resumes from: they are about to be redone."""
        if not self.enabled or not self.path.exists():
            return
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        keep = [r for r in rows if r["step"] <= resume_step.get(r["stage"], r["step"])]
        if len(keep) < len(rows):
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if isinstance(value, float):
                self.writer.add_scalar(f"{row['stage']}/{key}", value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
