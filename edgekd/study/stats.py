"""The study's statistics: mean ± sample std over seeds, and a paired comparison of two rows over the same seeds.

Rows of the study share their seeds (the same initialization and data order per seed), so two rows are compared
by the per-seed differences d_i = a_i − b_i: their mean, its standard error s_d / √n, and a two-sided paired
t-test (t = mean / SE on n − 1 degrees of freedom). scipy is not a dependency, so the t distribution's tail comes
from the regularized incomplete beta function, P(|T| ≥ t) = I_{ν/(ν+t²)}(ν/2, 1/2), evaluated with the
continued fraction of Numerical Recipes (§6.4) in double precision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "mean_std",
    "Paired",
    "paired",
    "t_two_sided_p",
    "t_quantile",
    "betainc",
    "flat_gain",
    "holm",
    "detectable_effect",
]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; NaN for fewer than two values, both NaN for none)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), Numerical Recipes ``betacf``."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 ≤ x ≤ 1."""
    if a <= 0 or b <= 0:
        raise ValueError(f"betainc needs a, b > 0; got {a}, {b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1; got {x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| ≥ |t|) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df={df} must be > 0")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile (0.5 < q < 1) of Student's t with ``df`` degrees of freedom: the t with
    P(|T| ≥ t) = 2(1 − q), found by bisection on ``t_two_sided_p`` (monotone in t) to 1e-12."""
    if not 0.5 < q < 1.0:
        raise ValueError(f"t_quantile needs 0.5 < q < 1; got {q}")
    target, lo, hi = 2.0 * (1.0 - q), 0.0, 1.0
    while t_two_sided_p(hi, df) > target:
        hi *= 2.0
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > target else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Paired:
    """A paired comparison a − b over n shared seeds: mean difference, its standard error, t, df and the p-value."""

    n: int
    mean: float
    se: float
    t: float
    p: float

    @property
    def df(self) -> int:
        return self.n - 1

    def ci(self, level: float = 0.95) -> tuple[float, float]:
        """The ``level`` confidence interval of the mean difference, mean ± t(1 − (1 − level)/2, n − 1)·SE."""
        if self.n < 2 or math.isnan(self.se):
            return math.nan, math.nan
        half = t_quantile(1.0 - (1.0 - level) / 2.0, self.df) * self.se
        return self.mean - half, self.mean + half


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: the k-th smallest p times (m − k + 1), made
    monotone and capped at 1 (a contrast is significant at family-wise level α when its adjusted p ≤ α)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [math.nan] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference a two-sided paired t-test at level ``alpha`` over ``n`` pairs detects with
    probability ``power`` when the differences have standard deviation ``sd``:
    (t(1 − α/2, n − 1) + t(power, n − 1)) · sd / √n (the usual approximation to the noncentral t)."""
    df = n - 1
    return (t_quantile(1.0 - alpha / 2.0, df) + t_quantile(power, df)) * sd / math.sqrt(n)


def paired(a: Sequence[float], b: Sequence[float]) -> Paired:
    """The paired t-test of ``a`` against ``b`` (equal lengths, entry i of both from seed i).

    With fewer than two pairs SE, t and p are NaN. When every difference is the same, SE is 0: t is ±inf and p 0
    for a non-zero difference, and t 0, p 1 when all differences are 0.
    """
    if len(a) != len(b):
        raise ValueError(f"paired comparison of {len(a)} and {len(b)} values; pass the same seeds for both")
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean, sd = mean_std(d)
    n = len(d)
    if n < 2:
        return Paired(n, mean, math.nan, math.nan, math.nan)
    se = sd / math.sqrt(n)
    if se == 0.0:
        return (
            Paired(n, mean, 0.0, 0.0, 1.0) if mean == 0.0 else Paired(n, mean, 0.0, math.copysign(math.inf, mean), 0.0)
        )
    t = mean / se
    return Paired(n, mean, se, t, t_two_sided_p(t, n - 1))


def flat_gain(curve: Sequence[float], fraction: float) -> tuple[float, int]:
    """The gain of a per-epoch curve over its last ``fraction`` of epochs: (final − value ``w`` epochs earlier, ``w``),
    ``w = max(1, round(fraction · epochs))``; NaN when the curve is not longer than ``w``."""
    w = max(1, round(fraction * len(curve)))
    if len(curve) <= w:
        return math.nan, w
    return curve[-1] - curve[-1 - w], w
