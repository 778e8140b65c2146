"""Which configurations of a sweep are statistically tied with the best, for the summary's ``vs best`` column.

On one seed each, two jobs are compared image by image on the validation split they share: McNemar's exact test on
the images one classified correctly and the other did not (Dietterich, 1998). With several seeds, their best
``val/acc`` values are compared by Welch's t-test. A p-value of at least ``SIGNIFICANCE`` is a tie: this validation
set cannot tell the two apart. Plain Python: the t distribution through the regularised incomplete beta function.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlplab.run.records import MONITOR, VAL_CORRECT_FILE, read_val_correct

SIGNIFICANCE = 0.05
PAIRED = "McNemar's exact test on the validation images only one of the two classified correctly"
OVER_SEEDS = f"Welch's t-test on the seeds' best `{MONITOR}`"
NOT_RECORDED = (
    "their jobs have no readable record of which validation images they classified correctly "
    f"(`{VAL_CORRECT_FILE}`: jobs trained before mlplab wrote it have none)"
)
OTHER_IMAGES = "their jobs were validated on other images (another `data.split_seed` or `data.val_size`)"
FEW_SEEDS = "Welch's t-test needs at least 2 seeds on each side"


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided p-value of McNemar's exact test: ``b`` images only the first classified correctly, ``c`` only the
    second; ``2 P[X <= min(b, c)]`` for X ~ Binomial(b + c, 1/2), at most 1. Exact integers, then one division."""
    n, term, total = b + c, 1, 1  # term: C(n, k), from k = 0
    for k in range(min(b, c)):
        term = term * (n - k) // (k + 1)
        total += term
    return min(1.0, 2 * total / 2**n)


def welch_p(first: Sequence[float], second: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test that two samples (at least two values each) have the same mean, with the
    Welch–Satterthwaite degrees of freedom."""
    v1, v2 = statistics.variance(first) / len(first), statistics.variance(second) / len(second)
    difference = statistics.fmean(first) - statistics.fmean(second)
    if v1 + v2 == 0:  # no spread on either side: equal means are tied, others are not
        return 1.0 if difference == 0 else 0.0
    t = difference / math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1**2 / (len(first) - 1) + v2**2 / (len(second) - 1))
    return t_two_sided_p(t, df)


def t_two_sided_p(t: float, df: float) -> float:
    """P[|T| >= |t|] for Student's t with ``df`` degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    return regularized_beta(df / (df + t * t), df / 2, 0.5)


def regularized_beta(x: float, a: float, b: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (modified Lentz, as in Numerical
    Recipes' betacf), used where it converges fast and mirrored (I_x(a, b) = 1 - I_{1-x}(b, a)) elsewhere."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_beta(1.0 - x, b, a)
    log_front = a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    c, d = 1.0, _nonzero(1.0 - (a + b) * x / (a + 1))
    d = 1.0 / d
    fraction = d
    for m in range(1, 1000):
        for term in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # the even step
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),  # the odd step
        ):
            d = 1.0 / _nonzero(1.0 + term * d)
            c = _nonzero(1.0 + term / c)
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


def _nonzero(value: float, tiny: float = 1e-300) -> float:
    return value if abs(value) > tiny else tiny


@dataclass(frozen=True)
class Ties:
    """Each configuration (as mlplab.sweeps.pareto.configurations lists them) against one of them, the reference:
    its p-value, or None and why there is none (the reference's own is None with no reason)."""

    test: str  # which test gave the p-values
    reference: int
    p_values: list[float | None]
    why: list[str]

    @property
    def tied(self) -> int:
        """How many other configurations are tied with the reference."""
        return sum(p is not None and p >= SIGNIFICANCE for p in self.p_values)

    def cell(self, index: int) -> str:
        """The ``vs best`` cell of configuration ``index``: ``best``, ``0.3 tied``, ``0.001953 worse`` or empty."""
        p = self.p_values[index]
        if index == self.reference or p is None:
            return "best" if index == self.reference else ""
        return f"{p:.4g} {'tied' if p >= SIGNIFICANCE else 'worse'}"

    def lines(self) -> list[str]:
        """The summary's lines on ties: how many configurations are tied with the best, then why cells are empty."""
        others = len(self.p_values) - 1
        lines = []
        if self.tied:
            lines.append(
                f"{_configurations(self.tied)} tied with the best (p >= {SIGNIFICANCE}, {self.test}; column "
                "`vs best`): this validation set does not tell them apart."
            )
        elif any(p is not None for p in self.p_values):
            lines.append(f"No configuration is tied with the best (p < {SIGNIFICANCE}, {self.test}; column `vs best`).")
        for why, count in Counter(why for why in self.why if why).items():
            lines.append(f"`vs best` is empty for {count} of the {others} other configurations: {why}.")
        return lines


def compare_with(
    configs: list[dict[str, Any]],
    reference: int = 0,
    read: Callable[[Path], tuple[np.ndarray, np.ndarray] | None] = read_val_correct,
) -> Ties:
    """Every configuration against ``configs[reference]``: by Welch's t-test over seeds when any configuration has
    several, else by McNemar's test on the one job of each (``read``: a job's recorded correctness and labels)."""
    if any(len(config["jobs"]) > 1 for config in configs):
        values = [[job[MONITOR] for job in config["jobs"]] for config in configs]
        best = values[reference]
        p_values = [welch_p(best, mine) if min(len(best), len(mine)) > 1 else None for mine in values]
        why = ["" if p is not None else FEW_SEEDS for p in p_values]
        test = OVER_SEEDS
    else:
        records = [read(Path(config["jobs"][0]["run_dir"])) for config in configs]
        p_values, why = [], []
        for record in records:
            p, reason = _paired(records[reference], record)
            p_values.append(p)
            why.append(reason)
        test = PAIRED
    p_values[reference], why[reference] = None, ""
    return Ties(test, reference, p_values, why)


def _paired(
    best: tuple[np.ndarray, np.ndarray] | None, other: tuple[np.ndarray, np.ndarray] | None
) -> tuple[float | None, str]:
    if best is None or other is None:
        return None, NOT_RECORDED
    if not np.array_equal(best[1], other[1]):  # the labels in order: the same images, nearly surely
        return None, OTHER_IMAGES
    only_best, only_other = int((best[0] & ~other[0]).sum()), int((~best[0] & other[0]).sum())
    return mcnemar_p(only_best, only_other), ""


def chosen_line(configs: list[dict[str, Any]], job: str) -> str:
    """A search's line on whether its chosen trial (the configuration of ``job``, its first seed's folder) is tied
    with other configurations."""
    index = next((i for i, config in enumerate(configs) if any(j["job"] == job for j in config["jobs"])), None)
    if index is None or len(configs) < 2:
        return ""
    ties = compare_with(configs, index)
    if all(p is None for p in ties.p_values):
        return f"Whether other configurations are tied with it is not known: {next(w for w in ties.why if w)}."
    if not ties.tied:
        return f"No other configuration is tied with it (p < {SIGNIFICANCE} against each, {ties.test})."
    return (
        f"{_configurations(ties.tied)} tied with it (p >= {SIGNIFICANCE}, {ties.test}): this validation set does not "
        "tell them apart, so the choice among them is open."
    )


def _configurations(count: int) -> str:
    return "1 configuration is" if count == 1 else f"{count} configurations are"
