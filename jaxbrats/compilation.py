"""XLA compilations counted per program, from JAX's monitoring events.

A Python trace counter says how often a function was traced, not how often
XLA compiled it, nor whether the persistent compilation cache
(`jax_compilation_cache_dir`, set by the CLI) served it. JAX reports every
backend compilation as a ``/jax/core/compile/backend_compile_duration`` event
named after the jitted function (``jit(<name>)``), preceded by a
``/jax/compilation_cache/cache_hits`` event in the same thread when the
program came from the on-disk cache. `watch()` registers one listener for the
process; `counts(name)` then says how often a program was compiled and how
often it was loaded, so the engine can report it and tests can hold it to one.
"""

from __future__ import annotations

import threading
from collections import Counter

from jax import monitoring

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
CACHE_HIT = "/jax/compilation_cache/cache_hits"

compiled: Counter = Counter()  # program name -> XLA compilations
loaded: Counter = Counter()  # program name -> programs read from the persistent cache
seconds: Counter = Counter()  # program name -> total seconds spent compiling or loading

_thread = threading.local()
_lock = threading.Lock()
_watching = False


def _on_event(event: str, **_) -> None:
    if event == CACHE_HIT:
        _thread.hit = True


def _on_duration(event: str, duration: float, fun_name: str = "", **_) -> None:
    if event != BACKEND_COMPILE:
        return
    hit, _thread.hit = getattr(_thread, "hit", False), False
    with _lock:
        (loaded if hit else compiled)[fun_name] += 1
        seconds[fun_name] += duration


def watch() -> None:
    """Start counting (once per process; later calls do nothing)."""
    global _watching
    with _lock:
        if _watching:
            return
        monitoring.register_event_listener(_on_event)
        monitoring.register_event_duration_secs_listener(_on_duration)
        _watching = True


def counts(name: str) -> dict:
    """``{"compiled": n, "loaded": n, "seconds": s}`` for the jitted function named `name`."""
    key = f"jit({name})"
    with _lock:
        return {"compiled": compiled[key], "loaded": loaded[key], "seconds": seconds[key]}
