#!/usr/bin/env bash
# Every method's phantom config trained on the demo phantom (16 cases of 64^3, seed 0; the same
# 8 held out by every config's split), each scored on all 15 subsets, then compared with
# `jaxbrats compare` (the baseline the reference) into WORKDIR/compare, and the training curves
# drawn into WORKDIR/curves.png. A run already evaluated is not redone.
# Usage: tools/methods_phantom.sh WORKDIR [METHOD ...]   (default: baseline m3ae rirn mind_the_gap acdis)
set -euo pipefail
work=${1:?usage: tools/methods_phantom.sh WORKDIR [METHOD ...]}
shift
if [ $# -gt 0 ]; then methods=("$@"); else methods=(baseline m3ae rirn mind_the_gap acdis); fi
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$work"
cd "$work"
[ -d cache ] || { jaxbrats phantom phantom --cases 16 --shape 64 64 64 --layout brats2023 --seed 0; jaxbrats prepare phantom cache; }
for method in "${methods[@]}"; do
  [ -f "$method/eval/summary.json" ] && continue
  start=$(date +%s)
  jaxbrats train --config "$repo/configs/${method}_phantom.toml" --workdir "$method" --data cache --set train.progress=false
  echo "$method: trained in $(( $(date +%s) - start )) s"
  jaxbrats eval --workdir "$method" --data cache --split test --out "$method/eval" --predictions none --figures 1
done
dirs=(); for method in "${methods[@]}"; do dirs+=("$method/eval"); done
jaxbrats compare "${dirs[@]}" --out compare
jaxbrats plot "${methods[@]}" --out curves.png --smooth 0.9
