#!/usr/bin/env bash
# Build the folder of wheels to carry to a machine without network that lacks jaxbrats's optional
# packages (the GPU machine used for tools/gpu_bench.sh has jax, flax, optax, orbax-checkpoint,
# torch, scipy, matplotlib and tqdm, but no grain, nibabel or tensorboardX).
#
# Usage: bash tools/build_wheels.sh [DIR]
#   DIR defaults to .whl in the repository root (ignored by git: /.whl/ is in .gitignore; a clone
#   that keeps it elsewhere can list it in .git/info/exclude instead). Set PYTHON to choose the
#   interpreter that runs pip (default python3); the wheels are for CPython 3.12 on manylinux
#   x86_64 whatever interpreter downloads them.
#
# It downloads, without their dependencies (the target machine has them: absl-py, etils,
# cloudpickle, numpy, protobuf, psutil, packaging, typing-extensions, fsspec, zipp), grain and
# what it needs that the machine lacks (array-record, portpicker), nibabel and tensorboardX, each
# at the version installed here (the one the tests ran with) or, where it is not installed, the
# pinned one below. On the target machine, from the repository root:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${1:-$ROOT/.whl}"
PYTHON="${PYTHON:-python3}"
# name=version used where the package is not installed here.
PINNED=(grain=0.2.18 array-record=0.8.6 portpicker=1.6.0 nibabel=5.4.2 tensorboardX=2.6.5)
# manylinux tags a wheel may carry, up to glibc 2.28 (the target machine, Python 3.12.3, has a newer
# one); a newer version whose wheels need more adds its manylinux_2_N here.
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done

mkdir -p "$DIR"
SPECS=()
for entry in "${PINNED[@]}"; do
    name="${entry%%=*}"
    version="$("$PYTHON" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')"
    SPECS+=("$name==${version:-${entry#*=}}")
done
echo "downloading ${SPECS[*]} into $DIR"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DIR" "${SPECS[@]}"
ls -l "$DIR"/*.whl
du -ch "$DIR"/*.whl | tail -1
