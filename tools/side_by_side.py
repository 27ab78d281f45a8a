"""Print the 15-subset Dice tables of several evaluations side by side (Markdown), as the papers do.

    python3 tools/side_by_side.py NAME=EVAL_DIR [NAME=EVAL_DIR ...]

Each EVAL_DIR holds a `jaxbrats eval` summary.json; one WT / TC / ET block per run, one row per
subset in the papers' order, then the mean. Rows a run does not serve show a dash.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REGIONS = ("WT", "TC", "ET")


def cell(row: dict | None) -> str:
    if not row or row.get("dice") is None or row["dice"].get("WT") is None:
        return " - | - | - "
    return " | ".join(f"{100 * row['dice'][r]:.2f}" for r in REGIONS)


def main(argv: list[str]) -> int:
    if not argv or any("=" not in a for a in argv):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    runs = [(name, json.loads((Path(path) / "summary.json").read_text())) for name, path in (a.split("=", 1) for a in argv)]
    print("| subset | " + " | ".join(f"{name} {r}" for name, _ in runs for r in REGIONS) + " |")
    print("|---|" + "---|" * (3 * len(runs)))
    for i, row in enumerate(runs[0][1]["subsets"]):
        print(f"| {row['name']} | " + " | ".join(cell(summary["subsets"][i]) for _, summary in runs) + " |")
    print("| **mean** | " + " | ".join(cell(summary["mean"]) for _, summary in runs) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
