"""Evaluation and reports: the 15-subset program, its metrics, and the comparisons of runs.

`program` evaluates every case on all 15 modality subsets in one compiled program (`cost`: its FLOPs
per window), `validation` scores the val split during training, `metrics` holds Dice and HD95,
`reports` the summary tables and heatmap, `figures` and `plots` the images of cases and training
curves, `compare` and `compare_report` the paired comparison of runs.
"""

from jaxbrats.faces import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "evaluate": "program",
        "make_case_program": "program",
        "applicability": "program",
        "StageValidation": "validation",
        "window_flops": "cost",
        "dice_counts": "metrics",
        "dice_from_counts": "metrics",
        "hd95": "metrics",
        "summarize": "reports",
        "markdown_table": "reports",
        "write_reports": "reports",
        "CaseFigures": "figures",
        "plot_runs": "plots",
        "load_run": "compare",
        "write_report": "compare_report",
    },
)
