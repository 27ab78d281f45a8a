"""The run folder's layout: the one place that spells out what a work directory holds.

A work directory (``jaxbrats train --workdir``) holds::

    config.json            the resolved config of the run (what eval and predict load)
    config_history.jsonl   one row per train call: when, which keys changed on a resume
    splits.json            the train/val/test case ids
    data.json              the cache and its preprocessing settings
    import.json            only in a run made by `jaxbrats import-m3ae`
    checkpoints/<stage>/   Orbax checkpoints of each stage, one folder per step
    checkpoints/<stage>/best/  the models of the best validation score (train.validate_every)
    metrics.jsonl          one JSON row per logged step (and per stage's throughput)
    tensorboard/           TensorBoard event files of the same rows
    substitute/            M3AE's learned substitute image x_sub (NIfTI + PNG)
    .train.lock            the one-writer lock of `jaxbrats train` (empty while nobody holds it)

Everything here is a path: reading and writing the files is their owners' job.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def config_history(self) -> Path:
        return self.root / "config_history.jsonl"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def data_record(self) -> Path:
        return self.root / "data.json"

    @property
    def import_record(self) -> Path:
        return self.root / "import.json"

    @property
    def checkpoint_root(self) -> Path:
        return self.root / "checkpoints"

    def checkpoints(self, stage: str) -> Path:
        return self.checkpoint_root / stage

    def best(self, stage: str) -> Path:
        return self.checkpoints(stage) / "best"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def substitute(self) -> Path:
        return self.root / "substitute"

    @property
    def lock(self) -> Path:
        return self.root / ".train.lock"

    def is_run(self) -> bool:
        return self.config.is_file()

    @classmethod
    def of_checkpoints(cls, path) -> RunDir | None:
        """The run whose ``checkpoints/<stage>`` folder `path` is, or None."""
        path = Path(path)
        if path.parent.name == "checkpoints" and cls(path.parent.parent).is_run():
            return cls(path.parent.parent)
        return None
