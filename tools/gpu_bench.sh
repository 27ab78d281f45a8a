#!/usr/bin/env bash
# One prepared GPU run from a bare machine (no network, jaxbrats not installed): see tools/gpu_bench.py
# and docs/benchmarks/README.md ("GPU run").
#
#   OUT=DIR bash tools/gpu_bench.sh [--tiny] [--budget SECONDS] [--only STEP...]
#
# Installs the carried wheels of .whl/ if there are any (tools/build_wheels.sh: what `jaxbrats train`
# needs beyond the GPU image; the benchmark itself runs without them), prints the versions and devices,
# then runs the steps within the budget and writes $OUT/gpu_bench.json and $OUT/gpu_bench.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${OUT:?set OUT to the folder of the results}"
mkdir -p "$OUT"
cd "$ROOT"

if compgen -G ".whl/*.whl" > /dev/null; then
  # --target, not site-packages: the image's own packages (jax, torch) stay as they are.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" \
    || echo "gpu_bench: installing .whl/ failed; going on without it" >&2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# PyTorch runs in the same processes as JAX: JAX must not take 75 % of the GPU up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# One persistent compilation cache for every step (a rerun on the same machine loads its programs).
export JAXBRATS_COMPILE_CACHE="${JAXBRATS_COMPILE_CACHE-${TMPDIR:-/tmp}/jaxbrats-gpu-bench-xla}"
export JAX_COMPILATION_CACHE_DIR="${JAXBRATS_COMPILE_CACHE}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/jaxbrats-gpu-bench-inductor}"

echo "gpu_bench: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname), $(nproc) CPUs"
python3 --version
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
fi
exec python3 tools/gpu_bench.py --out "$OUT" "$@"
