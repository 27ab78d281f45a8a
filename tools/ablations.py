"""Each paper's own ablation in miniature on the demo phantom: two (or more) arms of one method's
phantom config, over several seeds, compared per seed with `jaxbrats compare`, and summarised as
the paired difference of the arms' mean Dice with its spread over the seeds.

    python3 tools/ablations.py WORKDIR ABLATION [--seeds 0 1 2] [--arms A B ...] [--steps N]
    python3 tools/ablations.py WORKDIR --list

Seed s: a phantom of 16 cases of 64^3 drawn with seed s (the demo's, half held out), and training
with `train.seed = s`, so a seed's arms see the same cases and start from the same weights. Every
step goes through the `jaxbrats` command line (train, eval, compare): what a user runs. A run
already evaluated is not redone, so the tool resumes where it stopped. Outputs, under WORKDIR:
``seed<s>/<ablation>/<arm>/`` (work directory and ``eval/``), ``seed<s>/<ablation>/compare/``
(the first arm the reference) and ``<ablation>.md`` / ``.json``: per seed each arm's Dice (the
full-modality row and the mean of the rows the arms serve) and each arm's difference from the
first, then the mean and the standard deviation of that difference over the seeds.

An arm that `shares` a stage with the first arm starts its own stages from that arm's checkpoint
(M3AE's row (e) fine-tunes from the full method's pretraining: the rows differ in fine-tuning only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path

from jaxbrats import files
from jaxbrats.runtime.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent
REGIONS = ("WT", "TC", "ET")
FULL = "flair+t1ce+t1+t2"


@dataclasses.dataclass(frozen=True)
class Ablation:
    config: str  # a file in configs/
    arms: dict  # arm name -> its --set overrides (the first arm is the reference)
    about: str
    common: tuple = ()  # --set overrides of every arm (a shorter budget, the student under study)
    stage: str = ""  # train only this stage (`--stage`), evaluate its models
    shares: str = ""  # a stage the other arms take from the first arm's run (stages.<s>.init_from)
    evaluation: tuple = ()  # --set overrides of every arm's evaluation


ABLATIONS = {
    "m3ae_table3": Ablation(
        "m3ae_phantom.toml",
        {
            "full": (),
            "no_self_distillation": ("method.consistency_weight=0",),
            "deep_quarter": ("method.consistency_feature='deep_quarter'",),
        },
        "M3AE Table 3: row (e), no self-distillation (lambda = 0), against the full method; "
        "`deep_quarter`: the public code's consistency feature (issue item 2)",
        shares="pretrain",
    ),
    "rirn_table4": Ablation(
        "rirn_phantom.toml",
        {
            "rirn": (),
            "student_alone": ("method.crr=false", "method.car=false", "method.adv=false"),
            "crr_0.33": ("method.crr_weight=0.33",),
            "crr_0.03": ("method.crr_weight=0.03",),
        },
        "RIRN Table 4 (T1ce student): the student alone (L_SEG only) against RIRN (CRR + CAR + ADV, unit "
        "weights); `crr_*`: CRR's weight lowered",
        common=("method.students=['t1ce']",),
    ),
    "mind_the_gap_table4": Ablation(
        "mind_the_gap_phantom.toml",
        {"mix": (), "none": ("method.anchor='none'",), "mix_mixture": ("method.mix_target='mixture'",)},
        "Mind the Gap Table IV (the teacher): no alignment against P_mix (its target the prior modality's "
        "latent, the loss the paper writes); `mix_mixture`: P_mix's target the weighted mixture of the latents "
        "(the distribution the paper defines)",
        stage="teacher",
        # The teacher under eq. 7 runs C* once per present latent, for each of the 15 subsets:
        # windows that tile the case without overlap (8, not 27, per 64^3 case) keep it to minutes.
        evaluation=("eval.overlap=0",),
    ),
    "acdis_table3": Ablation(
        "acdis_phantom.toml",
        {
            "acdis": (),
            "no_mfsb": ("method.mfsb=false", "method.synthesis=[]"),
            "plain_sum": ("method.syn_grad_encoders=true", "method.syn_grad_target=true"),
        },
        "ACDIS Table 3: without MFSB (a 3x3x3 conv fills the missing modalities' features, no L_syn) "
        "against the full method; `plain_sum`: eq. 12's plain sum (L_syn's gradient into the encoders and "
        "its target; the phantom config trains the MFSB only with it)",
    ),
}


def run(*args: str) -> None:
    print("+ jaxbrats " + " ".join(args), flush=True)
    subprocess.run(["jaxbrats", *args], check=True)


def sets(overrides) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def phantom(work: Path, seed: int) -> Path:
    cache = work / f"seed{seed}" / "cache"
    if not (cache / "index.json").exists():
        raw = work / f"seed{seed}" / "phantom"
        run(
            "phantom",
            str(raw),
            "--cases",
            "16",
            "--shape",
            "64",
            "64",
            "64",
            "--layout",
            "brats2023",
            "--seed",
            str(seed),
        )
        run("prepare", str(raw), str(cache))
    return cache


def train_and_eval(
    ablation: Ablation, arm: str, folder: Path, cache: Path, seed: int, first: Path | None, steps: int | None
):
    if (folder / "eval" / "summary.json").exists():
        return
    overrides = [*ablation.common, *ablation.arms[arm], f"train.seed={seed}", "train.progress=false"]
    if steps:
        stages = [ablation.stage] if ablation.stage else ["train", "pretrain", "finetune", "teacher", "students"]
        overrides += [
            f"stages.{s}.steps={steps}"
            for s in stages
            if f"[stages.{s}]" in (REPO / "configs" / ablation.config).read_text()
        ]
    stage = ["--stage", ablation.stage] if ablation.stage else []
    if first is not None and ablation.shares:
        later = _stages_after(ablation.config, ablation.shares)
        overrides.append(f"stages.{later[0]}.init_from='{RunDir(first).checkpoints(ablation.shares)}'")
        stage = [x for s in later for x in ("--stage", s)]
    run(
        "train",
        "--config",
        str(REPO / "configs" / ablation.config),
        "--workdir",
        str(folder),
        "--data",
        str(cache),
        *stage,
        *sets(overrides),
    )
    run(
        "eval",
        "--workdir",
        str(folder),
        "--data",
        str(cache),
        "--split",
        "test",
        "--out",
        str(folder / "eval"),
        "--predictions",
        "none",
        *(["--stage", ablation.stage] if ablation.stage else []),
        *sets(ablation.evaluation),
    )


def _stages_after(config: str, shared: str) -> list[str]:
    text = (REPO / "configs" / config).read_text()
    order = [
        line.strip()[len("[stages.") : -1]
        for line in text.splitlines()
        if line.startswith("[stages.") and line.count(".") == 1
    ]
    return order[order.index(shared) + 1 :]


def dice_of(summary: dict, rows: list[str]) -> dict:
    by_name = {r["name"]: r for r in summary["subsets"]}
    return {region: statistics.fmean(by_name[n]["dice"][region] for n in rows) for region in REGIONS}


def summarise(work: Path, name: str, arms: list[str], seeds: list[int]) -> dict:
    evals = {
        s: {a: json.loads((work / f"seed{s}" / name / a / "eval" / "summary.json").read_text()) for a in arms}
        for s in seeds
    }

    def scored(summary):  # the rows a run serves and scores (a dedicated method's students' rows)
        return {r["name"] for r in summary["subsets"] if r["cases"] and r.get("served", True)}

    order = [r["name"] for r in evals[seeds[0]][arms[0]]["subsets"]]
    served = [n for n in order if all(n in scored(evals[s][a]) for s in seeds for a in arms)]
    views = {"full": [FULL] if FULL in served else served[-1:]}
    if len(served) > 1:  # a dedicated method's single student: its one row is the mean
        views["mean"] = served
    table = {view: {s: {a: dice_of(evals[s][a], rows) for a in arms} for s in seeds} for view, rows in views.items()}
    out = {"ablation": name, "seeds": seeds, "arms": arms, "rows": views, "dice": table, "difference": {}}
    for view in views:
        for arm in arms[1:]:
            diffs = {r: [table[view][s][arm][r] - table[view][s][arms[0]][r] for s in seeds] for r in REGIONS}
            out["difference"][f"{view}/{arm}"] = {
                r: {"per_seed": d, "mean": statistics.fmean(d), "sd": statistics.stdev(d) if len(d) > 1 else 0.0}
                for r, d in diffs.items()
            }
    return out


def _per_seed(values) -> str:
    """Each seed's difference in Dice points, e.g. ``+1.2, -0.3``."""
    return ", ".join(f"{100 * x:+.1f}" for x in values)


def markdown(result: dict, about: str) -> str:
    arms, seeds = result["arms"], result["seeds"]
    lines = [f"# {result['ablation']}", "", about, ""]
    for view, rows in result["rows"].items():
        label = f"{rows[0]} row" if view == "full" else f"mean of {len(rows)} served rows"
        lines += [
            f"## Dice (%), {label}",
            "",
            "| seed | " + " | ".join(f"{a} {r}" for a in arms for r in REGIONS) + " |",
            "|---|" + "---|" * (len(arms) * len(REGIONS)),
        ]
        for s in seeds:
            cells = [f"{100 * result['dice'][view][s][a][r]:.2f}" for a in arms for r in REGIONS]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines += ["", f"Paired difference (arm - {arms[0]}) over the seeds, mean ± sd (per seed):", ""]
        for arm in arms[1:]:
            d = result["difference"][f"{view}/{arm}"]
            parts = [
                f"{r} {100 * d[r]['mean']:+.2f} ± {100 * d[r]['sd']:.2f} ({_per_seed(d[r]['per_seed'])})"
                for r in REGIONS
            ]
            lines.append(f"- {arm}: " + "; ".join(parts))
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("ablation", nargs="?", choices=sorted(ABLATIONS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", help="the arms to run (default: all; the first arm always runs)")
    p.add_argument("--steps", type=int, help="steps of each trained stage (default: the config's)")
    p.add_argument("--list", action="store_true", help="list the ablations and their arms")
    args = p.parse_args(argv)
    if args.list or not args.ablation:
        for name, a in ABLATIONS.items():
            print(f"{name}: {', '.join(a.arms)} ({a.config}) - {a.about}")
        return 0
    ablation = ABLATIONS[args.ablation]
    first_arm = next(iter(ablation.arms))
    arms = [first_arm] + [a for a in (args.arms or list(ablation.arms)) if a != first_arm]
    unknown = sorted(set(arms) - set(ablation.arms))
    if unknown:
        p.error(f"unknown arm(s) {unknown} of {args.ablation} (its arms: {', '.join(ablation.arms)})")
    for seed in args.seeds:
        cache = phantom(args.workdir, seed)
        base = args.workdir / f"seed{seed}" / args.ablation
        for arm in arms:
            train_and_eval(
                ablation, arm, base / arm, cache, seed, None if arm == first_arm else base / first_arm, args.steps
            )
        done = base / "compare" / "compare.json"
        if not done.exists() or json.loads(done.read_text())["names"] != arms:
            run(
                "compare",
                *(str(base / a / "eval") for a in arms),
                "--names",
                ",".join(arms),
                "--out",
                str(base / "compare"),
            )
    result = summarise(args.workdir, args.ablation, arms, args.seeds)
    files.write_text_atomic(args.workdir / f"{args.ablation}.json", json.dumps(result, indent=1) + "\n")
    text = markdown(result, ablation.about)
    files.write_text_atomic(args.workdir / f"{args.ablation}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
