#!/usr/bin/env bash
# Two methods on the same phantom at the same budget, each scored on all 15 subsets of the
# same held-out cases (the split comes from data.split_seed, equal in both configs).
# Usage: tools/compare_phantom.sh WORKDIR [CONFIG_A] [CONFIG_B]
#   default: configs/baseline_phantom.toml (1200 steps) vs configs/m3ae_phantom.toml (600 + 600)
set -euo pipefail
work=${1:?usage: tools/compare_phantom.sh WORKDIR [CONFIG_A] [CONFIG_B]}
repo=$(cd "$(dirname "$0")/.." && pwd)
a=${2:-$repo/configs/baseline_phantom.toml}
b=${3:-$repo/configs/m3ae_phantom.toml}
mkdir -p "$work"
cd "$work"
[ -d cache ] || { jaxbrats phantom phantom --cases 10 --shape 64 64 64 --layout brats2023 --seed 0; jaxbrats prepare phantom cache; }
for config in "$a" "$b"; do
  name=$(basename "$config" .toml)
  start=$(date +%s)
  jaxbrats train --config "$config" --workdir "$name" --data cache --set train.progress=false
  echo "$name: trained in $(( $(date +%s) - start )) s"
  jaxbrats eval --workdir "$name" --data cache --split test --out "$name/eval"
done
