#!/usr/bin/env bash
# Two methods on the same phantom at the same budget, each scored on all 15 subsets of the
# same held-out cases (the split comes from data.split_seed, equal in both configs), then
# compared (`jaxbrats compare`, CONFIG_A the reference) into WORKDIR/compare.
# The phantom is the demo's (16 cases of 64^3, seed 0; half held out by the configs' split).
# Usage: tools/compare_phantom.sh WORKDIR [CONFIG_A] [CONFIG_B] [-- --set k=v ...]
#   default: configs/baseline_phantom.toml (1600 steps) vs configs/m3ae_phantom.toml (800 + 800);
#   the --set overrides after "--" apply to CONFIG_B (e.g. its steps, to match A's wall clock)
set -euo pipefail
work=${1:?usage: tools/compare_phantom.sh WORKDIR [CONFIG_A] [CONFIG_B]}
repo=$(cd "$(dirname "$0")/.." && pwd)
a=${2:-$repo/configs/baseline_phantom.toml}
b=${3:-$repo/configs/m3ae_phantom.toml}
shift $(( $# < 3 ? $# : 3 ))
[ "${1:-}" = "--" ] && shift
extra=("$@")
mkdir -p "$work"
cd "$work"
[ -d cache ] || { jaxbrats phantom phantom --cases 16 --shape 64 64 64 --layout brats2023 --seed 0; jaxbrats prepare phantom cache; }
for config in "$a" "$b"; do
  name=$(basename "$config" .toml)
  sets=()
  if [ "$config" = "$b" ]; then for s in "${extra[@]}"; do sets+=(--set "$s"); done; fi
  start=$(date +%s)
  jaxbrats train --config "$config" --workdir "$name" --data cache --set train.progress=false "${sets[@]}"
  echo "$name: trained in $(( $(date +%s) - start )) s"
  jaxbrats eval --workdir "$name" --data cache --split test --out "$name/eval"
done
jaxbrats compare "$(basename "$a" .toml)/eval" "$(basename "$b" .toml)/eval" --out compare
