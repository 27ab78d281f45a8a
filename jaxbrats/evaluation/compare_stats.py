"""The statistics of `jaxbrats compare`: paired Wilcoxon tests, their multiple-testing correction and
bootstrap confidence intervals of a mean difference.

Corrections: Holm's step-down method (S. Holm, "A simple sequentially rejective multiple test
procedure", Scandinavian Journal of Statistics 6(2), 1979), which bounds the family-wise error rate
under any dependence between the tests, and Benjamini and Hochberg's step-up method (JRSS B 57(1),
1995, doi:10.1111/j.2517-6161.1995.tb02031.x; `scipy.stats.false_discovery_control`), which bounds
the false discovery rate. scipy has no Holm adjustment, so it is written out here.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

ALPHA = 0.05
CONFIDENCE = 0.95
CORRECTIONS = {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "no correction"}


@dataclasses.dataclass(frozen=True)
class Statistics:
    """How a comparison tests: the correction of each run's family of tests, the bootstrap (0: none)."""

    correction: str = "holm"
    resamples: int = 10000
    seed: int = 0
    confidence: float = CONFIDENCE

    @property
    def correction_name(self) -> str:
        return CORRECTIONS[self.correction]


def wilcoxon_p(x: np.ndarray, y: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired values (scipy's defaults) over the finite pairs."""
    from scipy import stats

    keep = np.isfinite(x) & np.isfinite(y)
    if not keep.any():
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all differences zero: scipy says p = 1
        return float(stats.wilcoxon(x[keep], y[keep]).pvalue)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values of a 1-D family: the i-th smallest becomes max over j <= i of
    min(1, (m - j + 1) p_(j)), so that adjusted <= alpha exactly where the step-down test rejects."""
    p = np.asarray(p, float)
    order = np.argsort(p, kind="stable")
    m = len(p)
    stepped = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = stepped
    return out


def adjust(p: np.ndarray, correction: str) -> np.ndarray:
    """`p` of any shape adjusted as one family; NaNs (no test) are not members and stay NaN."""
    if correction not in CORRECTIONS:
        raise ValueError(f"correction {correction!r}: expected one of {', '.join(CORRECTIONS)}")
    p = np.asarray(p, float)
    out = np.full(p.shape, np.nan)
    tested = np.isfinite(p)
    if correction == "none" or not tested.any():
        out[tested] = p[tested]
    elif correction == "holm":
        out[tested] = holm(p[tested])
    else:
        from scipy import stats

        out[tested] = stats.false_discovery_control(p[tested], method="bh")
    return out


def uniforms(resamples: int, cases: int, seed: int) -> np.ndarray:
    """The one draw every bootstrap of a comparison shares: (resamples, cases) uniforms in [0, 1)."""
    return np.random.default_rng(seed).random((resamples, cases))


class Bootstrap:
    """Percentile bootstrap intervals from one draw of uniforms (resamples, cases): a sample of k pairs
    is resampled by the indices floor(k u) of the first k columns, computed once per k."""

    def __init__(self, u: np.ndarray, confidence: float = CONFIDENCE):
        self.u, self.confidence, self._index = u, confidence, {}

    def index(self, k: int) -> np.ndarray:
        if k not in self._index:
            self._index[k] = np.minimum((self.u[:, :k] * k).astype(np.int64), k - 1)
        return self._index[k]

    def __call__(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(mean, low, high) of the paired mean difference x - y over the finite pairs; NaNs without a pair."""
        d = (np.asarray(x, float) - np.asarray(y, float))[np.isfinite(x) & np.isfinite(y)]
        if not len(d):
            return np.full(3, np.nan)
        means = d[self.index(len(d))].mean(axis=1)  # one mean per resample, all resamples at once
        tail = 50 * (1 - self.confidence)
        return np.asarray([d.mean(), *np.percentile(means, [tail, 100 - tail])])


def bootstrap_ci(x: np.ndarray, y: np.ndarray, u: np.ndarray, confidence: float = CONFIDENCE) -> np.ndarray:
    """(mean, low, high) of the paired mean difference x - y: `Bootstrap(u, confidence)(x, y)`."""
    return Bootstrap(u, confidence)(x, y)
