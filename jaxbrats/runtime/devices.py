"""Which backend a command runs on, said in one line at its start.

A `pip install .` gives CPU JAX; a GPU or TPU needs the `cuda` or `tpu`
extra (README, Install). Without the line a run that silently fell back to
the CPU (a missing CUDA plugin, a driver JAX cannot use) shows up only as a
slow step.
"""

from __future__ import annotations

import jax


def platform_line() -> str:
    """E.g. ``jax 0.10.2 on gpu: 8 devices (NVIDIA H100 80GB HBM3)``; the processes when more than one.
    Starts JAX's backend: in a multi-process run call it after `jax.distributed.initialize`."""
    devices = jax.devices()
    kinds = ", ".join(sorted({d.device_kind for d in devices}))
    line = (
        f"jax {jax.__version__} on {jax.default_backend()}: {len(devices)} device{'s' * (len(devices) != 1)} ({kinds})"
    )
    processes = jax.process_count()
    return line + (f" in {processes} processes" if processes > 1 else "")


def announce_platform() -> None:
    """Print `platform_line` once per run (process 0)."""
    line = platform_line()
    if jax.process_index() == 0:
        print(line, flush=True)
