#!/usr/bin/env bash
# Mind the Gap's Tables IV and I in miniature on the demo's phantom (16 cases of 64^3, seed 0,
# 8 held out), from configs/mind_the_gap_phantom.toml (same budget for every row):
# - Table IV: four teachers (anchor none, normal = P_N, modality = P_k with T1ce, mix = P_mix),
#   each scored on the 15 subsets (`eval --stage teacher`);
# - Table I: the four single-modality students trained with no KD ("unimodal"), and with each KD
#   loss in KDS (default: pmkl kdnet) from the unaligned teacher ("original") and from the P_mix
#   teacher, each scored on its own rows;
# - the baseline (configs/baseline_phantom.toml) on the same cases, for its single-modality rows.
# Prints the full-modality teacher rows with P_mix's learned weights, then the students' rows.
# Usage: tools/mind_the_gap_phantom.sh WORKDIR [KD...]
set -euo pipefail
work=${1:?usage: tools/mind_the_gap_phantom.sh WORKDIR [KD...]}
shift
if [ $# -eq 0 ]; then kds=(pmkl kdnet); else kds=("$@"); fi
repo=$(cd "$(dirname "$0")/.." && pwd)
config="$repo/configs/mind_the_gap_phantom.toml"
mkdir -p "$work"
cd "$work"
[ -d cache ] || { jaxbrats phantom phantom --cases 16 --shape 64 64 64 --layout brats2023 --seed 0; jaxbrats prepare phantom cache; }

timed() {  # LOG COMMAND...: run, log, append the wall time
  local log=$1 start
  shift
  start=$(date +%s)
  "$@" > "$log" 2>&1
  echo "wall $(( $(date +%s) - start )) s" >> "$log"
}

for anchor in none normal modality mix; do
  [ -d "teacher_$anchor/eval" ] && continue
  timed "teacher_$anchor.log" jaxbrats train --config "$config" --workdir "teacher_$anchor" --data cache --stage teacher \
    --set "method.anchor='$anchor'" --set train.progress=false
  jaxbrats eval --workdir "teacher_$anchor" --data cache --stage teacher --out "teacher_$anchor/eval" --predictions none >> "teacher_$anchor.log" 2>&1
done

students() {  # NAME ANCHOR KD: the four single-modality students of the ANCHOR teacher
  [ -d "$1/eval" ] && return
  timed "$1.log" jaxbrats train --config "$config" --workdir "$1" --data cache --stage students \
    --set "method.anchor='$2'" --set "method.kd='$3'" --set train.progress=false \
    --set "stages.students.init_from='$PWD/teacher_$2/checkpoints/teacher'"
  jaxbrats eval --workdir "$1" --data cache --out "$1/eval" --predictions none >> "$1.log" 2>&1
}
students unimodal mix none
for kd in "${kds[@]}"; do
  students "${kd}_original" none "$kd"
  students "${kd}_mix" mix "$kd"
done
if [ ! -d baseline/eval ]; then
  timed baseline.log jaxbrats train --config "$repo/configs/baseline_phantom.toml" --workdir baseline --data cache --set train.progress=false
  jaxbrats eval --workdir baseline --data cache --out baseline/eval --predictions none >> baseline.log 2>&1
fi

python3 - "${kds[@]}" <<'PY'
import json, sys
from pathlib import Path

SINGLES = ("t1", "t2", "t1ce", "flair")  # the paper's Table I order
def rows(run):
    return {r["name"]: r for r in json.loads(Path(run, "eval", "summary.json").read_text())["subsets"]}
def cells(row):
    d = row["dice"]
    return f"{100 * d['WT']:6.2f} {100 * d['TC']:6.2f} {100 * d['ET']:6.2f}  avg {100 * (d['WT'] + d['TC'] + d['ET']) / 3:6.2f}"
def wall(run):
    return Path(f"{run}.log").read_text().rsplit("wall ", 1)[-1].split()[0]

print("Table IV (teachers, all four modalities: WT TC ET)")
for anchor in ("none", "normal", "modality", "mix"):
    run = f"teacher_{anchor}"
    summary = json.loads(Path(run, "eval", "summary.json").read_text())["mean"]["dice"]
    line = f"  {anchor:9s} full {cells(rows(run)['flair+t1ce+t1+t2'])} | 15-row mean WT {100 * summary['WT']:.2f} TC {100 * summary['TC']:.2f} ET {100 * summary['ET']:.2f} ({wall(run)} s)"
    print(line)
metrics = [json.loads(l) for l in Path("teacher_mix", "metrics.jsonl").read_text().splitlines()]
last = [m for m in metrics if "w/t1ce" in m][-1]
print("  P_mix weights at step", last["step"], ", ".join(f"{m} {last['w/' + m]:.3f}" for m in ("t1", "t2", "t1ce", "flair")))
print("Table I (single-modality rows: WT TC ET)")
runs = ["baseline", "unimodal"] + [f"{kd}_{t}" for kd in sys.argv[1:] for t in ("original", "mix")]
for run in runs:
    r = rows(run)
    print(f"  {run:16s} " + " | ".join(f"{m} {cells(r[m])}" for m in SINGLES) + f" ({wall(run)} s)")
PY
