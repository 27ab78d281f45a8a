"""The processes of a multi-host run: which one writes the run's files, and how its outcome reaches the others.

A run's processes share one work directory. Process 0 alone writes what is
written once (metrics, reports, the saved config and split, notes: `lead`)
and takes the decisions that must be the same everywhere (the lock, the
split, a refused resume). `on_process_0` runs such a decision on process 0
and gives every process its result, or its error: the others must not run
on into the first collective and wait there for a process 0 that has left.
With one process both are trivial.

Starting one: `distributed_settings` reads `jaxbrats train --distributed`'s
flags (or JAXBRATS_* variables), `start_distributed` joins the coordinator
within a timeout, `run_distributed` runs the work of one process and ends it
with one line on a failure, `stop_process` leaves without waiting for peers.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np

from jaxbrats.errors import JaxbratsError

T = TypeVar("T")


def lead() -> bool:
    """Whether this process writes the run's files and notes (process 0)."""
    return jax.process_index() == 0


def broadcast_json(payload):
    """Process 0's JSON-able `payload` on every process (the others' argument is ignored)."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(payload).encode(), np.uint8) if lead() else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    buffer = np.zeros(size, np.uint8)
    buffer[: data.size] = data
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8).tobytes().decode())


def on_process_0(decide: Callable[[], T]) -> T:
    """`decide()` on process 0; every process returns its (JSON-able) result, or raises its error:
    process 0 its own exception, the others a `JaxbratsError` with the same line."""
    if jax.process_count() == 1:
        return decide()
    outcome, error = None, None
    if lead():
        try:
            outcome = {"value": decide()}
        except Exception as e:  # noqa: BLE001  re-raised below, after the broadcast every process must join
            error = e
            outcome = {"error": str(e) if isinstance(e, JaxbratsError) else f"process 0: {type(e).__name__}: {e}"}
    outcome = broadcast_json(outcome)
    if error is not None:
        raise error
    if "error" in outcome:
        raise JaxbratsError(outcome["error"])
    return outcome["value"]


# --- starting a multi-process run ----------------------------------------------------------

#: Environment variables the distributed flags fall back to (flag, variable, type).
DISTRIBUTED_ENV = (
    ("coordinator", "JAXBRATS_COORDINATOR", str),
    ("num_processes", "JAXBRATS_NUM_PROCESSES", int),
    ("process_id", "JAXBRATS_PROCESS_ID", int),
    ("timeout", "JAXBRATS_TIMEOUT", int),
)


def distributed_settings(args, environ=None) -> dict:
    """The coordinator, process count, process id and timeout of a `--distributed` run, from the
    flags or else the environment (JAXBRATS_*); None where neither gives one (JAX detects it).
    Bad or incomplete values raise a `JaxbratsError` in one line."""
    environ = os.environ if environ is None else environ
    given = {name: getattr(args, name) for name, _, _ in DISTRIBUTED_ENV if getattr(args, name) is not None}
    if not args.distributed:
        if given:
            flags = ", ".join("--" + n.replace("_", "-") for n in given)
            raise JaxbratsError(f"{flags}: only with --distributed (a multi-process run)")
        return {}
    out = {}
    for name, variable, kind in DISTRIBUTED_ENV:
        flag = "--" + name.replace("_", "-")
        value = getattr(args, name)
        if value is None and environ.get(variable, "").strip():
            flag, value = variable, environ[variable].strip()
            try:
                value = kind(value)
            except ValueError:
                raise JaxbratsError(
                    f"{variable}={value!r}: not a whole number (it stands for {'--' + name.replace('_', '-')})"
                ) from None
        out[name] = value
        out[name + "_from"] = flag
    address, n, i, timeout = out["coordinator"], out["num_processes"], out["process_id"], out["timeout"]
    if address is not None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise JaxbratsError(
                f"{out['coordinator_from']} {address}: give the coordinator as HOST:PORT "
                f"(process 0's host, a free port)"
            )
    if n is not None and n < 1:
        raise JaxbratsError(f"{out['num_processes_from']} {n}: the number of processes must be at least 1")
    if i is not None and n is None:
        raise JaxbratsError(
            f"{out['process_id_from']} {i} needs --num-processes (or JAXBRATS_NUM_PROCESSES): "
            f"the number of processes of the run"
        )
    if n == 1 and i is None:
        out["process_id"] = i = 0
    if n is not None and i is None:
        raise JaxbratsError(
            f"{out['num_processes_from']} {n} needs --process-id (or JAXBRATS_PROCESS_ID): "
            f"this process's number, 0 to {n - 1}"
        )
    if i is not None and not 0 <= i < n:
        raise JaxbratsError(f"{out['process_id_from']} {i}: out of range for {n} processes (0 to {n - 1})")
    if n is not None and address is None:
        raise JaxbratsError(
            f"{out['num_processes_from']} {n} needs --coordinator HOST:PORT (or JAXBRATS_COORDINATOR): "
            f"where process 0 listens"
        )
    if timeout is not None and timeout < 1:
        raise JaxbratsError(f"{out['timeout_from']} {timeout}: the timeout must be at least 1 second")
    return {k: out[k] for k in ("coordinator", "num_processes", "process_id", "timeout")}


def start_distributed(coordinator=None, num_processes=None, process_id=None, timeout=None) -> None:
    """`jax.distributed.initialize` with these settings (None: detected, e.g. under SLURM).

    `timeout` bounds the start (every process must reach the coordinator), the heartbeat
    (a process silent that long counts as dead and the run stops) and the wait at shutdown;
    None keeps JAX's (300 s, 100 s, 300 s). A start that does not complete in time stops this
    process with one line naming the coordinator and the timeout (JAX's own timeout would
    abort with a stack trace, so a watchdog stops it first).
    """
    wait = timeout or 300
    where = coordinator or "(detected from the cluster environment)"
    who = f"process {process_id} of {num_processes}" if num_processes else "this process"

    def give_up():
        print(
            f"jaxbrats: error: {who} could not start the distributed run within {wait} s: the coordinator "
            f"{where} was not reached or not every process joined it (start all processes with the same "
            f"--coordinator and --num-processes, or raise --timeout)",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(1)

    watchdog = threading.Timer(wait, give_up)
    watchdog.daemon = True
    limits = {} if timeout is None else {"heartbeat_timeout_seconds": timeout, "shutdown_timeout_seconds": timeout}
    start = time.monotonic()
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator, num_processes, process_id, initialization_timeout=2 * wait + 30, **limits
        )  # the watchdog comes first
    except (ValueError, TypeError, RuntimeError) as e:  # nothing detected, bad values, or a start that failed
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if None in (coordinator, num_processes, process_id) and "defined" in text:
            raise JaxbratsError(
                f"--distributed: no cluster detected (SLURM, Open MPI, Cloud TPU) that gives what is missing "
                f"(JAX: {text}); give --coordinator HOST:PORT, --num-processes N and --process-id I "
                f"(or JAXBRATS_COORDINATOR, JAXBRATS_NUM_PROCESSES, JAXBRATS_PROCESS_ID)"
            ) from None
        raise JaxbratsError(
            f"--distributed: could not start with coordinator {where} "
            f"after {time.monotonic() - start:.0f} s (timeout {wait} s): {text}"
        ) from None
    finally:
        watchdog.cancel()


def run_distributed(work: Callable[[], None], settings: dict) -> int | None:
    """`work()` as one process of a multi-process run that `start_distributed(**settings)` joins;
    the number of processes on process 0, None on the others.

    A failure ends this process at once (`stop_process`) with one line: every process meets the
    same problem and says it once; a collective that fails most often means another process
    stopped; a bug prints its traceback. None waits for the peers, which may be gone.
    """
    where = "this process"
    try:
        start_distributed(**settings)  # before any computation
        where = f"process {jax.process_index()} of {jax.process_count()}"
        work()
    except JaxbratsError as e:
        print(f"jaxbrats: error: {e}", file=sys.stderr)
        stop_process(1)
    except OSError as e:  # as the command line words it
        print(f"jaxbrats: error: {e.filename or ''}: {e.strerror or e} ({where})", file=sys.stderr)
        stop_process(1)
    except jax.errors.JaxRuntimeError as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        print(
            f"jaxbrats: error: {where} stopped: {first} (has another process failed? see its output)", file=sys.stderr
        )
        stop_process(1)
    except KeyboardInterrupt:
        print(f"jaxbrats: interrupted ({where})", file=sys.stderr)
        stop_process(130)
    except BaseException:  # noqa: BLE001  a bug: its traceback, then out without waiting for the peers
        import traceback

        traceback.print_exc()
        stop_process(1)
    return jax.process_count() if lead() else None


def stop_process(code: int) -> None:
    """End a distributed process now: JAX's exit hook would wait (up to the shutdown timeout) for
    peers that may be gone, then print a traceback."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
