#!/usr/bin/env bash
# RIRN's Table 4 (T1ce only) on the demo's phantom: the six rows (baseline student, + CRR
# without MF, + CRR, CAR alone, CRR + MF + CAR, all), each a T1ce student trained with its
# teacher for STEPS steps from configs/rirn_phantom.toml, scored on the same held-out cases;
# prints one line per row (the T1ce row's Dice, %).
# Usage: tools/rirn_table4_phantom.sh WORKDIR [STEPS]
set -euo pipefail
work=${1:?usage: tools/rirn_table4_phantom.sh WORKDIR [STEPS]}
steps=${2:-300}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$work"
cd "$work"
[ -d cache ] || { jaxbrats phantom phantom --cases 16 --shape 64 64 64 --layout brats2023 --seed 0; jaxbrats prepare phantom cache; }
rows=(
  "t1ce_alone:method.crr=false method.car=false method.adv=false"
  "crr_no_mf:method.mf=false method.car=false method.adv=false"
  "crr:method.car=false method.adv=false"
  "car:method.crr=false method.adv=false"
  "crr_car:method.adv=false"
  "rirn:"
)
for row in "${rows[@]}"; do
  name=${row%%:*}
  sets=(--set "method.students=[\"t1ce\"]" --set "stages.train.steps=$steps" --set train.progress=false)
  for s in ${row#*:}; do sets+=(--set "$s"); done
  start=$(date +%s)
  jaxbrats train --config "$repo/configs/rirn_phantom.toml" --workdir "$name" --data cache "${sets[@]}" > "$name.log" 2>&1
  took=$(( $(date +%s) - start ))
  jaxbrats eval --workdir "$name" --data cache --split test --out "$name/eval" >> "$name.log" 2>&1
  python3 - "$name" "$took" <<'PY'
import json, sys
name, took = sys.argv[1], sys.argv[2]
row = next(r for r in json.load(open(f"{name}/eval/summary.json"))["subsets"] if r["name"] == "t1ce")
d = row["dice"]
print(f"{name:12s} WT {100 * d['WT']:.2f}  TC {100 * d['TC']:.2f}  ET {100 * d['ET']:.2f}  "
      f"AVG {100 * (d['WT'] + d['TC'] + d['ET']) / 3:.2f}  ({row['cases']} cases, trained in {took} s)")
PY
done
