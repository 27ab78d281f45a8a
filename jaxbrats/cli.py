"""The `jaxbrats` command: thin wrappers over the library, one line per error."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from jaxbrats import __version__
from jaxbrats.errors import JaxbratsError
from jaxbrats.labels import CONVENTIONS
from jaxbrats.modalities import MODALITIES


def _phantom(args) -> int:
    from jaxbrats.data.phantom import write_phantom

    ids = write_phantom(args.out_dir, args.cases, tuple(args.shape), args.layout, args.seed, workers=args.workers)
    print(f"wrote {len(ids)} {args.layout} phantom cases of shape {tuple(args.shape)} to {args.out_dir}")
    return 0


def _print_report(report: dict, what: str) -> int:
    records = report["records"]
    counts = Counter(m for r in records for m in r.images)
    with_seg = sum(r.seg is not None for r in records)
    print(f"layout: {report['layout']}")
    print(f"cases: {len(records)} (" + ", ".join(f"{m} {counts[m]}" for m in MODALITIES) + f"; seg {with_seg})")
    states = Counter(report["prepared"].values())
    print(f"{what}: " + (", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none"))
    for error in report["errors"]:
        print(f"bad: {error}")
    return len(report["errors"])


def _prepare(args) -> int:
    from jaxbrats.data.preprocess import check_dataset, prepare_dataset

    need_labels = not args.no_labels
    if args.check_only:
        report = check_dataset(args.data_dir, need_labels=need_labels, workers=args.workers, convention=args.convention)
        bad = _print_report(report, "checked")
    else:
        report = prepare_dataset(
            args.data_dir,
            args.cache_dir,
            normalization=args.normalize,
            margin=args.margin,
            need_labels=need_labels,
            skip_bad=args.skip_bad,
            workers=args.workers,
            convention=args.convention,
        )
        bad = _print_report(report, "prepared")
    if bad and not args.skip_bad:
        raise JaxbratsError(f"{args.data_dir}: {bad} bad case(s); fix them or rerun with --skip-bad")
    if bad and not report["prepared"]:  # --skip-bad would leave nothing: no index was written
        raise JaxbratsError(
            f"{args.data_dir}: every case is bad ({bad} of {bad}), none usable"
            + ("" if args.check_only else f"; no index written to {args.cache_dir}")
        )
    if bad:
        print(f"skipped {bad} bad case(s)")
    if not args.check_only:
        print(f"cache: {args.cache_dir}")
    return 0


def _train(args) -> int:
    from jaxbrats.engine.trainer import train
    from jaxbrats.evaluation.validation import StageValidation
    from jaxbrats.methods import load_config
    from jaxbrats.runtime.devices import announce_platform
    from jaxbrats.runtime.processes import distributed_settings, run_distributed

    settings = distributed_settings(args)
    config = load_config(args.config, args.set)

    stopped = []  # the `TrainingStopped` of a run that a signal stopped (a checkpoint saved)

    def work() -> None:
        from jaxbrats.runtime.signals import TrainingStopped

        announce_platform()  # here: a multi-process run starts JAX's backend only after joining its peers
        try:
            train(config, args.workdir, args.data, args.stop_after, tuple(args.stage), validator=StageValidation)
        except TrainingStopped as e:  # every process stopped at the same step: leave as after a finished run
            stopped.append(e)

    done = f"{'stopped' if args.stop_after else 'trained'} {config.method_name} in {args.workdir}"
    count = run_distributed(work, settings) if args.distributed else work()  # a failure ends it with its line
    if stopped:  # SIGTERM 143, SIGINT 130, as a shell reports a process the signal ended
        if not args.distributed or count is not None:
            print(f"jaxbrats: {stopped[0]}", file=sys.stderr)
        return stopped[0].exit_code
    if not args.distributed:
        print(done)
    elif count is not None:  # process 0
        print(f"{done} ({count} processes)")
    return 0


def _eval(args) -> int:
    from jaxbrats.data.cache import CacheDataset
    from jaxbrats.engine.workdir import split_cases
    from jaxbrats.evaluation.program import evaluate
    from jaxbrats.evaluation.reports import markdown_table
    from jaxbrats.inference.trained import load_trained, served_step
    from jaxbrats.runtime.devices import announce_platform

    if args.figures < 0:
        raise JaxbratsError(f"--figures must be 0 or more, got {args.figures}")
    announce_platform()
    method, graphdefs, models, config = load_trained(
        args.workdir, stage=args.stage, overrides=args.set, segmenting=True, checkpoint=args.checkpoint
    )
    print(_served(method.served_checkpoint))
    ids = split_cases(Path(args.workdir), CacheDataset(args.data), args.split)
    summary = evaluate(
        method,
        graphdefs,
        models,
        CacheDataset(args.data, ids),
        config.eval,
        args.out,
        predictions=args.predictions,
        figures=args.figures,
        step=served_step(args.workdir, method),
        checkpoint=method.served_checkpoint,
    )
    print(markdown_table(summary, config.eval))
    print(f"results: {args.out}")
    return 0


def _served(c: dict) -> str:
    """Which checkpoint eval and predict read (`Method.served_checkpoint`): one line."""
    return f"models: stage {c['stage']}, step {c['step']} ({c['checkpoint']} checkpoint)"


def _listed(text: str | None) -> list[str] | None:
    """A comma-separated option (`--names a,b`) as its items, or None when not given."""
    return [item.strip() for item in text.split(",")] if text else None


def _plot(args) -> int:
    from jaxbrats.evaluation.plots import plot_runs

    written = plot_runs(args.workdirs, args.out, names=_listed(args.names), keys=_listed(args.keys), smooth=args.smooth)
    print(f"wrote {written}")
    return 0


def _predict(args) -> int:
    from jaxbrats.inference.predict import predict_case, predict_folder

    options = {"convention": args.convention, "overrides": args.set, "stage": args.stage, "checkpoint": args.checkpoint}
    if args.input:
        return _predict_folder(predict_folder(args.workdir, args.input, args.out, **options))
    info = predict_case(args.workdir, args.case, args.out, **options)
    print(_served(info["checkpoint"]))
    print(f"modalities used: {', '.join(info['present'])}; missing: {', '.join(info['missing']) or 'none'}")
    print(
        "predicted voxels: "
        + ", ".join(f"{r} {n}" for r, n in info["voxels"].items())
        + f" (labels in the {info['convention']} convention)"
    )
    print(f"wrote {info['out']}")
    return 0


def _predict_folder(summary: dict) -> int:
    """What was missing per case, grouped; the failed cases were named as they failed."""
    print(_served(summary["checkpoint"]))
    groups: dict[str, list[str]] = {}
    for case in summary["predicted"]:
        groups.setdefault(", ".join(case["missing"]) or "nothing", []).append(case["case"])
    for missing, cases in sorted(groups.items(), key=lambda g: (g[0] != "nothing", g[0])):
        listed = ", ".join(cases[:5]) + (f" and {len(cases) - 5} more" if len(cases) > 5 else "")
        print(f"missing {missing}: {len(cases)} case(s) ({listed})")
    total = len(summary["predicted"]) + len(summary["failed"])
    print(f"wrote {len(summary['predicted'])} of {total} segmentations to {summary['out']} (predict_summary.json)")
    if summary["failed"]:
        raise JaxbratsError(
            f"{len(summary['failed'])} of {total} case(s) failed (listed above and in predict_summary.json)"
        )
    return 0


def _compare(args) -> int:
    from jaxbrats.evaluation.compare import compare
    from jaxbrats.evaluation.compare_report import markdown

    result = compare(
        args.eval_dirs,
        args.out,
        names=_listed(args.names),
        reference=args.reference,
        papers=args.paper,
        correction=args.correction,
        bootstrap=args.bootstrap,
        seed=args.seed,
    )
    for line in result["skipped"]:
        print(f"note: {line}")
    print(markdown(result["tables"]["dice"]))
    titles = ", ".join(t.title for t in result["tables"].values())
    print(f"wrote {len(result['written'])} files to {args.out} ({titles}: .md, .csv, .tex, charts; compare.json)")
    return 0


def _import_m3ae(args) -> int:
    from jaxbrats.interop.m3ae_import import import_m3ae

    summary = import_m3ae(args.checkpoint, args.out, source_axcodes=tuple(args.source_axes), margin=args.margin)
    print(
        f"imported {summary['unet_parameters']:,} U-Net parameters and x_sub {tuple(summary['x_sub_shape'])} "
        f"(deep-supervision heads: {summary['deep_supervision_heads']}) into {args.out}"
    )
    print(
        f"prepare the cases to score with: jaxbrats prepare DATA CACHE --normalize percentile --margin {args.margin}; "
        f"then jaxbrats eval --workdir {args.out} --data CACHE --split all --out EVAL"
    )
    return 0


def _demo(args) -> int:
    from jaxbrats import demo

    demo.run(Path(args.workdir), seed=args.seed)
    return 0


def _bench(args) -> int:
    from jaxbrats.interop import benchmark

    return benchmark.main(args)


def _add_phantom(sub) -> None:
    p = sub.add_parser("phantom", help="write a synthetic BraTS-like dataset as NIfTI files")
    p.add_argument("out_dir")
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--shape", type=int, nargs=3, default=[96, 96, 96], metavar=("D", "H", "W"))
    p.add_argument("--layout", choices=["brats2020", "brats2023"], default="brats2023")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.set_defaults(func=_phantom)


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="check a BraTS dataset and preprocess it into a cache")
    p.add_argument("data_dir")
    p.add_argument("cache_dir", nargs="?", help="required unless --check-only")
    p.add_argument(
        "--normalize",
        choices=["zscore", "percentile", "minmax"],
        default="zscore",
        help="per modality over brain voxels, outside the brain 0: zscore (mean 0, std 1), "
        "percentile (M3AE: [1, 99] percentiles -> [0, 1]), minmax (Mind the Gap: min/max -> [-1, 1])",
    )
    p.add_argument("--margin", type=int, default=4, help="voxels kept around the brain's bounding box")
    p.add_argument("--check-only", action="store_true", help="validate every case, write nothing")
    p.add_argument("--skip-bad", action="store_true", help="skip bad cases (listed) instead of failing")
    p.add_argument("--no-labels", action="store_true", help="cases need no seg file (inference-only data)")
    p.add_argument(
        "--convention",
        choices=sorted(CONVENTIONS),
        help="label convention of every case (default: the layout's, or detected per case from its labels)",
    )
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.set_defaults(func=_prepare)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a method; resumes when WORKDIR holds a checkpoint")
    p.add_argument(
        "--config", required=True, help="TOML config: a file, or a shipped config by name (e.g. baseline_phantom)"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (TOML value)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--data", help="prepared cache directory (overrides data.cache)")
    p.add_argument(
        "--stop-after", type=int, metavar="STEPS", help="checkpoint and stop after this many steps (resume later)"
    )
    p.add_argument(
        "--stage",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this stage (repeatable); earlier stages come from their checkpoints or stages.NAME.init_from",
    )
    g = p.add_argument_group(
        "multi-process training",
        "One `jaxbrats train` per host (or per GPU), all with the same arguments but the process id. Each flag "
        "falls back to an environment variable; with none given, jax.distributed.initialize() detects them "
        "(SLURM, Open MPI, Cloud TPU). The work directory must be on a file system every process sees.",
    )
    g.add_argument(
        "--distributed", action="store_true", help="start JAX's distributed runtime first (multi-host / multi-process)"
    )
    g.add_argument(
        "--coordinator", metavar="HOST:PORT", help="process 0's address and a free port [env JAXBRATS_COORDINATOR]"
    )
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the run [env JAXBRATS_NUM_PROCESSES]")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0 to N-1 [env JAXBRATS_PROCESS_ID]")
    g.add_argument(
        "--timeout",
        type=int,
        metavar="SECONDS",
        help="bounds the start (all processes must join), the heartbeat (a process silent that long "
        "counts as dead: the run stops) and the wait at shutdown (default: JAX's 300/100/300 s) "
        "[env JAXBRATS_TIMEOUT]",
    )
    p.set_defaults(func=_train)


def _add_checkpoint(p) -> None:
    p.add_argument(
        "--checkpoint",
        default="latest",
        metavar="best|latest|STEP",
        help="the stage's checkpoint to read: the newest (default), the best validated one "
        "(train.validate_every) or a step",
    )


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score all 15 modality subsets of a split")
    p.add_argument("--workdir", required=True)
    p.add_argument("--data", required=True, help="prepared cache directory")
    p.add_argument("--split", default="test", help="split of the run (train, val, test) or 'all'")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--predictions",
        choices=["none", "full", "all"],
        default="full",
        help="NIfTI predictions to write: none, the full-modality one, or all 15 subsets",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a saved config key, e.g. eval.hd95_empty='\"zero\"'",
    )
    p.add_argument(
        "--stage",
        help="score the models of this stage (default: the last stage whose models segment; "
        "e.g. Mind the Gap's teacher)",
    )
    _add_checkpoint(p)
    p.add_argument(
        "--figures",
        type=int,
        default=0,
        metavar="N",
        help="figures of the first N cases: OUT/figures/<case>.png (axial, coronal, sagittal slices; images, "
        "truth, full and single-modality predictions) and the same in OUT/tensorboard",
    )
    p.set_defaults(func=_eval)


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="training curves (losses, learning rates) of runs from their metrics.jsonl")
    p.add_argument("workdirs", nargs="+", metavar="WORKDIR")
    p.add_argument("--out", required=True, help="output figure; the format follows the suffix: .png, .pdf, .svg")
    p.add_argument("--names", help="comma-separated label per run (default: each work directory's name)")
    p.add_argument(
        "--keys", help="comma-separated metrics to draw per stage, e.g. loss,grad_norm (default: the losses)"
    )
    p.add_argument(
        "--smooth",
        type=float,
        default=0.0,
        metavar="W",
        help="also draw each metric as a moving average of weight W in [0, 1) (TensorBoard's; e.g. 0.9)",
    )
    p.set_defaults(func=_plot)


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict", help="segment a case folder, or every case of a folder, with the modality files each has"
    )
    p.add_argument("--workdir", required=True)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--case", help="one case folder (never written to); --out is the segmentation, e.g. seg.nii.gz")
    where.add_argument(
        "--input",
        metavar="DIR",
        help="a folder of case folders or a dataset in any layout `prepare` "
        "reads; --out is a folder that gets <case>.nii.gz each and predict_summary.json",
    )
    p.add_argument("--out", required=True, help="the segmentation (--case) or the output folder (--input)")
    p.add_argument(
        "--convention", choices=sorted(CONVENTIONS), help="label values to write (default: the case's release)"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a saved config key")
    p.add_argument("--stage", help="segment with the models of this stage (default: the last that segments)")
    _add_checkpoint(p)
    p.set_defaults(func=_predict)


def _add_compare(sub) -> None:
    from jaxbrats.evaluation.compare_stats import CORRECTIONS, Statistics

    p = sub.add_parser(
        "compare", help="evaluations (and papers' tables) side by side: 15-subset tables, corrected tests, CIs, charts"
    )
    p.add_argument("eval_dirs", nargs="+", metavar="EVAL_DIR", help="outputs of `jaxbrats eval` on the same cases")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--names", help="comma-separated run names (default: each folder's name, its parent's for <run>/eval)"
    )
    p.add_argument("--reference", metavar="NAME", help="the run the others are tested against (default: the first)")
    p.add_argument(
        "--paper",
        action="append",
        default=[],
        metavar="NAME[:METHOD]",
        help="add a published table's method as a column, never tested (default METHOD: the paper's own); repeatable",
    )
    p.add_argument(
        "--correction",
        choices=list(CORRECTIONS),
        default="holm",
        help="multiple-testing correction of each run's tests against the reference (default: holm)",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=Statistics().resamples,
        metavar="N",
        help="bootstrap resamples for the differences' 95%% intervals (default: %(default)s; 0: none)",
    )
    p.add_argument("--seed", type=int, default=0, help="the bootstrap's random seed (default: 0)")
    p.set_defaults(func=_compare)


def _add_import_m3ae(sub) -> None:
    p = sub.add_parser("import-m3ae", help="the official M3AE PyTorch checkpoint as a jaxbrats run (for eval, predict)")
    p.add_argument(
        "checkpoint",
        metavar="CHECKPOINT.pth",
        help="the public code's fine-tuned model_best_<epoch>.pth.tar "
        "({'epoch', 'state_dict', 'optimizer'}) or a bare state dict",
    )
    p.add_argument("--out", required=True, help="the new work directory (must not exist, or be empty)")
    p.add_argument(
        "--source-axes",
        default="LPS",
        metavar="AXES",
        help="voxel axes of the NIfTI files it was trained on (BraTS: LPS); they place x_sub in RAS+",
    )
    p.add_argument(
        "--margin", type=int, default=1, help="brain-box margin of the preprocessing it expects (public code: 1)"
    )
    p.set_defaults(func=_import_m3ae)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="phantom -> prepare -> train the baseline -> evaluate all 15 subsets")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantom and of training")
    p.set_defaults(func=_demo)


def _add_bench(sub) -> None:
    from jaxbrats.interop.benchmark import add_arguments

    p = sub.add_parser("bench", help="time the train step, forward pass and 15-subset evaluation (JAX vs PyTorch)")
    add_arguments(p)
    p.set_defaults(func=_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxbrats", description="Missing-modality brain tumour segmentation in JAX.")
    parser.add_argument("--version", action="version", version=f"jaxbrats {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_phantom,
        _add_prepare,
        _add_train,
        _add_eval,
        _add_plot,
        _add_predict,
        _add_compare,
        _add_import_m3ae,
        _add_demo,
        _add_bench,
    ):
        add(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser.parse_args(argv)
    args.command_line = " ".join(["jaxbrats", *argv])
    if args.command == "prepare" and not args.check_only and not args.cache_dir:
        parser.error("prepare needs CACHE_DIR (or --check-only)")
    from jaxbrats.runtime.compilation import enable_persistent_cache

    enable_persistent_cache()
    try:
        return args.func(args)
    except JaxbratsError as e:
        print(f"jaxbrats: error: {e}", file=sys.stderr)
    except OSError as e:  # e.g. permissions or a full disk: name the file, skip the traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"jaxbrats: error: {where}{e.strerror or e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("jaxbrats: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
