"""XLA compilations counted per program, from JAX's monitoring events; the persistent compilation cache.

A Python trace counter says how often a function was traced, not how often
XLA compiled it, nor whether the persistent compilation cache
(`jax_compilation_cache_dir`, set by `enable_persistent_cache`) served it. JAX
reports every backend compilation as a
``/jax/core/compile/backend_compile_duration`` event named after the jitted
function (``jit(<name>)``), preceded by a ``/jax/compilation_cache/cache_hits``
event in the same thread when the program came from the on-disk cache.
`watch()` registers one listener for the process; `counts(name)` then says how
often a program was compiled and how often it was loaded, so the engine can
report it and tests can hold it to one.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import Counter
from pathlib import Path

import jax
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


def enable_persistent_cache() -> None:
    """Keep XLA programs on disk, so a repeated run skips compilation: in $JAXBRATS_COMPILE_CACHE
    (default ~/.cache/jaxbrats/xla; an empty value disables it). The command line calls it."""
    path = os.environ.get("JAXBRATS_COMPILE_CACHE", str(Path("~/.cache/jaxbrats/xla").expanduser()))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)


# --- what a compiled program exchanges between devices ------------------------------------

COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")
_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "bf16": 2,
    "f16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}
_COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def array_bytes(hlo_type: str) -> list[int]:
    """Bytes of each array in an HLO type, e.g. ``(f32[2,3], bf16[4])`` -> [24, 8]."""
    return [_DTYPE_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _SHAPE.findall(hlo_type)]


def collectives(hlo_text: str) -> list[tuple[str, int]]:
    """(op, bytes of its result on one device) for every collective of a compiled program's HLO
    (`compiled.as_text()`), e.g. to check that a depth-split step moves halos (collective-permute)
    and never all-gathers an activation. An async pair (-start/-done) counts once, its result."""
    out = []
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.search(re.sub(r"/\*.*?\*/", "", line))  # tuple types carry /*index=k*/ comments
        if not match:
            continue
        shapes = array_bytes(match.group(1))
        if not shapes:
            continue
        # An async start's tuple holds its operand and its result: the result counts; a combined
        # collective (XLA merges gradient all-reduces) returns a tuple of results: they all count.
        out.append((match.group(2), shapes[-1] if "-start(" in match.group(0) else sum(shapes)))
    return out
