#!/usr/bin/env bash
# Mind the Gap's Tables IV and I in miniature on the demo's phantom (16 cases of 64^3, seed 0,
# 8 held out), from configs/mind_the_gap_phantom.toml (same budget for every row):
# - Table IV: five teachers (anchor none, normal = P_N, modality = P_k with T1ce, mix = P_mix with
#   the written loss's prior target, and P_mix with the mixture target), each scored on the 15
#   subsets (`eval --stage teacher`, the teacher's inference rule: method.teacher_inference);
# - Table I: the four single-modality students trained with no KD ("unimodal"), and with each KD
#   loss in KDS (default: pmkl kdnet) from the KD method's usual teacher ("original": a plain
#   4-channel U-Net trained on all four modalities, 400 steps, softmax over the labels, given as
#   method.teacher_from), from the unaligned teacher ("unaligned": anchor none) and from the P_mix
#   teacher, each scored on its own rows. The "original" runs are the students stage alone, whose
#   seeds are train.seed + 0: train.seed = 1 gives them the two-stage students' seeds (0 + 1);
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

teacher() {  # NAME SETTINGS...: a teacher stage, scored on the 15 subsets
  local name=$1
  shift
  [ -d "teacher_$name/eval" ] && return
  timed "teacher_$name.log" jaxbrats train --config "$config" --workdir "teacher_$name" --data cache --stage teacher \
    "$@" --set train.progress=false
  jaxbrats eval --workdir "teacher_$name" --data cache --stage teacher --out "teacher_$name/eval" --predictions none >> "teacher_$name.log" 2>&1
}
teacher none --set "method.anchor='none'"
teacher normal --set "method.anchor='normal'"
teacher modality --set "method.anchor='modality'"
teacher mix --set "method.anchor='mix'"
teacher mix_mixture --set "method.anchor='mix'" --set "method.mix_target='mixture'"

if [ ! -d kd_teacher/checkpoints ]; then  # the KD methods' usual teacher: every modality, no dropout, the teacher's budget
  timed kd_teacher.log jaxbrats train --config "$repo/configs/baseline_phantom.toml" --workdir kd_teacher --data cache \
    --set "method.output='labels'" --set "method.dropout_mode='none'" --set stages.train.steps=400 --set train.progress=false
fi

students() {  # NAME KD SETTINGS...: the four single-modality students
  local name=$1 kd=$2
  shift 2
  [ -d "$name/eval" ] && return
  timed "$name.log" jaxbrats train --config "$config" --workdir "$name" --data cache --stage students \
    --set "method.kd='$kd'" --set train.progress=false "$@"
  jaxbrats eval --workdir "$name" --data cache --out "$name/eval" --predictions none >> "$name.log" 2>&1
}
from_teacher() { echo "stages.students.init_from='$PWD/teacher_$1/checkpoints/teacher'"; }
students unimodal none --set "method.anchor='mix'" --set "$(from_teacher mix)"
for kd in "${kds[@]}"; do
  students "${kd}_original" "$kd" --set "method.teacher_from='$PWD/kd_teacher'" --set train.seed=1
  students "${kd}_unaligned" "$kd" --set "method.anchor='none'" --set "$(from_teacher none)"
  students "${kd}_mix" "$kd" --set "method.anchor='mix'" --set "$(from_teacher mix)"
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
for anchor in ("none", "normal", "modality", "mix", "mix_mixture"):
    run = f"teacher_{anchor}"
    summary = json.loads(Path(run, "eval", "summary.json").read_text())["mean"]["dice"]
    line = f"  {anchor:11s} full {cells(rows(run)['flair+t1ce+t1+t2'])} | 15-row mean WT {100 * summary['WT']:.2f} TC {100 * summary['TC']:.2f} ET {100 * summary['ET']:.2f} ({wall(run)} s)"
    print(line)
for run in ("teacher_mix", "teacher_mix_mixture"):
    metrics = [json.loads(l) for l in Path(run, "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if "w/t1ce" in m][-1]
    print(f"  {run} weights at step", last["step"], ", ".join(f"{m} {last['w/' + m]:.3f}" for m in SINGLES),
          "(paper: t1 0.776, t2 0.898, t1ce 2.206, flair 0.306)")
print("Table I (single-modality rows: WT TC ET)")
runs = ["baseline", "unimodal"] + [f"{kd}_{t}" for kd in sys.argv[1:] for t in ("original", "unaligned", "mix")]
for run in runs:
    r = rows(run)
    print(f"  {run:16s} " + " | ".join(f"{m} {cells(r[m])}" for m in SINGLES) + f" ({wall(run)} s)")
PY
