#!/usr/bin/env bash
# ACDIS on the demo phantom, and the paper's ablation without MFSB (Table 3's first row: a 3x3x3
# convolution in the block's place, by default 4C -> C filling the missing modalities' slots,
# method.mfsb_conv; no L_syn), each trained with configs/acdis_phantom.toml and
# scored on all 15 subsets of the same held-out cases. The phantom is the demo's (16 cases of
# 64^3, seed 0; half held out). STEPS (default: the config's 200, the baseline's wall clock)
# sets the stage length of both. Compares them (`jaxbrats compare`, into WORKDIR/compare, the
# first named run the reference) with the runs named in NAME=EVAL_DIR ... (e.g. the baseline's
# and M3AE's from tools/compare_phantom.sh).
# Usage: tools/acdis_phantom.sh WORKDIR [STEPS] [NAME=EVAL_DIR ...]
set -euo pipefail
work=${1:?usage: tools/acdis_phantom.sh WORKDIR [STEPS] [NAME=EVAL_DIR ...]}
steps=${2:-}
shift $(( $# < 2 ? $# : 2 ))
repo=$(cd "$(dirname "$0")/.." && pwd)
config=$repo/configs/acdis_phantom.toml
mkdir -p "$work"
cd "$work"
[ -d cache ] || { jaxbrats phantom phantom --cases 16 --shape 64 64 64 --layout brats2023 --seed 0; jaxbrats prepare phantom cache; }
run() {  # NAME [--set k=v ...]
  local name=$1; shift
  local start; start=$(date +%s)
  local length=()
  [ -n "$steps" ] && length=(--set stages.train.steps="$steps")
  jaxbrats train --config "$config" --workdir "$name" --data cache --set train.progress=false "${length[@]}" "$@"
  echo "$name: trained in $(( $(date +%s) - start )) s"
  jaxbrats eval --workdir "$name" --data cache --split test --out "$name/eval"
}
run acdis
run acdis_without_mfsb --set method.mfsb=false --set 'method.synthesis=[]'
names=() dirs=()
for pair in "$@" acdis=acdis/eval acdis_without_mfsb=acdis_without_mfsb/eval; do
  names+=("${pair%%=*}"); dirs+=("${pair#*=}")
done
jaxbrats compare "${dirs[@]}" --names "$(IFS=,; echo "${names[*]}")" --out compare
