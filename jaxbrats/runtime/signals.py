"""Stopping training cleanly on SIGTERM or SIGINT: at a step every process agrees on.

Schedulers ask a job to leave with SIGTERM (SLURM at its time limit or on
`scancel`, then SIGKILL after its grace period; a preempted cloud VM the same),
and a user with Ctrl-C (SIGINT). `StopRequests` turns either into a request that
the training loop checks after each step (`due`); the loop then saves a
checkpoint of that step and training ends with `TrainingStopped`, whose exit
code is the shell's for the signal (128 + its number: 143, 130).

- One process: Python handlers set a flag (and write a note); reading it after a
  step costs nothing (no transfer from the device).
- Several processes (`jax.distributed`): every process must save the same step,
  or the collective checkpoint waits forever. JAX's distributed runtime already
  catches SIGTERM (its preemption notifier, which polls for it once a second)
  and tells every process through the coordinator; the processes then agree on
  a step, one past the furthest any of them has reported, and
  `jax.experimental.multihost_utils.reached_preemption_sync_point` answers true
  at that step on all of them. SIGTERM is left to JAX's handler; SIGINT is
  turned into a SIGTERM to this process, so Ctrl-C takes the same path. A
  signal reaching one process stops them all.

A second SIGTERM while stopping is ignored (the checkpoint is being written:
the grace period is better spent finishing it); a second SIGINT stops at once,
leaving the previous checkpoint. The previous handlers come back on exit.
"""

from __future__ import annotations

import os
import signal
import threading

import jax

from jaxbrats.errors import JaxbratsError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(JaxbratsError):
    """Training stopped on a signal after saving a checkpoint of its last step; `exit_code`: 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def _agreeing_processes() -> bool:
    """Whether JAX's preemption sync decides where a stop falls: a started distributed runtime
    with its preemption service (on unless `jax_enable_preemption_service` is off)."""
    if not jax.distributed.is_initialized():
        return False
    from jax._src import distributed  # the service's state has no public accessor (jax 0.10)

    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class StopRequests:
    """A context manager that catches SIGTERM and SIGINT during training (see the module docstring).

    `due(step)` is asked after every step with the stage's step count (the same on every
    process); true when the run should save and stop there. `begin(step)` is told where a
    stage starts.

    With several processes the step is the count JAX's sync compares, which Orbax's
    `CheckpointManager.save` also reports (the checkpoint's step): the stage's step is the one
    count both agree on. The count must not fall between the notice and the sync point, so a
    stage tells where it starts (`begin`) before it compiles: a notice during a stage's compile
    then stops after its first step. One that comes between a stage's last step and the next
    stage's `begin` (the last save, the reports, the restore) sets a sync point the next stage
    may never reach: the run then goes on as if no signal came (`docs/scaling.md`).
    """

    def __init__(self):
        self.signum: int | None = None  # the first signal received (here), or SIGTERM when JAX's sync stops the run
        self.agreeing = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        self.signum = None
        if threading.current_thread() is not threading.main_thread():
            return self  # Python takes handlers only in the main thread: a signal acts as it did before
        self.agreeing = _agreeing_processes()
        # With JAX's sync, SIGTERM stays with its notifier (a Python handler would replace it).
        for signum in (signal.SIGINT,) if self.agreeing else STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *_) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _on_signal(self, signum: int, _frame) -> None:
        if self.signum is None:
            self.signum = signum
            name = signal.Signals(signum).name
            when = "at a step every process reaches" if self.agreeing else "after the step in flight"
            _note(f"jaxbrats: {name}: stopping {when}, then saving a checkpoint")
            if self.agreeing:
                os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier tells the other processes
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, the previous checkpoint stays
        else:
            _note("jaxbrats: SIGTERM while stopping: ignored, the checkpoint is on its way (SIGINT stops at once)")

    def begin(self, step: int) -> None:
        """A stage starts after `step` (0, or the step it resumes from)."""
        if self.agreeing:
            from jax.experimental import multihost_utils

            # JAX's count drops to this stage's: a notice from here on falls on one of its steps.
            # True here (rare: the previous stage's last count was `step` - 1) is let go, the
            # same on every process: the stop is missed, the run goes on, nothing hangs.
            multihost_utils.reached_preemption_sync_point(step)

    def due(self, step: int) -> bool:
        """Whether to save and stop after the stage's `step` (every process asks after every step)."""
        if not self.agreeing:
            return self.signum is not None
        from jax.experimental import multihost_utils

        if not multihost_utils.reached_preemption_sync_point(step):
            return False
        self.signum = self.signum or signal.SIGTERM
        return True

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


def _note(text: str) -> None:
    """One line on stderr from a signal handler: written to the file descriptor, because the
    handler may run while the main thread is inside a write to sys.stderr's buffer."""
    os.write(2, (text + "\n").encode())
