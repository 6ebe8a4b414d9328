"""Finite-sample bounds and intervals for probabilities and means: the bottom of the package.

Imports only NumPy, SciPy and :mod:`skipit_core.errors` (and the standard library), so any module may use it without an
import cycle. :mod:`skipit_core.theory` re-exports the four bounds and intervals.

- :func:`hoeffding_upper`: one-sided Hoeffding bound from ``k`` successes in ``n`` trials.
- :func:`hoeffding_mean_upper`: the same inequality for the mean of ``n`` values in [0, 1]
  (e.g. per-sample fractions of tokens), given their sum.
- :func:`clopper_pearson`: exact binomial interval, two-sided or one-sided.
- :func:`wilson_interval`: Wilson score interval.
- :func:`mcnemar_exact`: the exact McNemar test of two paired success vectors (the same questions
  answered under two conditions), ``scipy.stats.binomtest`` on the discordant pairs.
- :func:`holm`: Holm's step-down adjustment of several p-values (family-wise error control).

All are vectorised over NumPy-broadcastable ``k`` and ``n`` and return floats for scalar inputs.
Clopper-Pearson and Wilson are the intervals of ``scipy.stats.binomtest(k, n).proportion_ci``
(``method="exact"`` / ``"wilson"``); they are written here as closed forms on ``scipy.stats.beta``
and ``scipy.stats.norm`` because ``binomtest`` takes one scalar count at a time: on the
``[layers x eps]`` = 32 x 26 arrays of :mod:`skipit_core.band` a loop of ``binomtest`` calls takes
0.7-2.1 s (exact) and 0.3-0.4 s (Wilson) against 0.1-2 ms here, 500-2900x slower, for the
same numbers to 5e-13 (``benchmarks/intervals.py``). ``tests/test_stats.py``
checks both against ``binomtest`` for every ``k`` at several ``n``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from .errors import InputError

__all__ = ["hoeffding_upper", "hoeffding_mean_upper", "clopper_pearson", "wilson_interval", "mcnemar_exact",
           "McNemar", "holm"]

SIDES = ("two-sided", "upper", "lower")


def _numeric(values, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind not in "iuf":
        what = "bools" if arr.dtype.kind == "b" else f"dtype {arr.dtype}"
        raise InputError(f"{name} must be numbers (counts); got {what} ({values!r}). Pass integers, e.g. "
                         f"{name}=int(mask.sum()).")
    return arr.astype(np.float64)


def _broadcast(ka: np.ndarray, na: np.ndarray, k, n) -> tuple[np.ndarray, np.ndarray]:
    try:
        return np.broadcast_arrays(ka, na)
    except ValueError:
        raise InputError(f"k and n must have the same (or broadcastable) shapes; got {np.shape(k)} and "
                         f"{np.shape(n)}. Pass one n per k, or one n for all.") from None


def _binom_inputs(k, n, confidence) -> tuple[np.ndarray, np.ndarray, float]:
    """Validated ``(k, n, alpha)``: integer counts ``0 <= k <= n``, ``n >= 1``, ``alpha = 1 - confidence``."""
    ka, na = _broadcast(_numeric(k, "k"), _numeric(n, "n"), k, n)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(ka) | ~np.isfinite(na) | (na < 1) | (ka < 0) | (ka > na) | (ka % 1 != 0) | (na % 1 != 0)
    if np.any(bad):
        raise InputError(f"need integer counts 0 <= k <= n with n >= 1; got k={k!r}, n={n!r}. For the mean "
                         "of values in [0, 1] (not a count) use hoeffding_mean_upper.")
    return ka, na, _alpha(confidence)


def _alpha(confidence) -> float:
    """``1 - confidence`` for a confidence strictly inside (0, 1); bools, strings, NaN, percentages rejected."""
    ok = isinstance(confidence, (int, float, np.integer, np.floating)) and not isinstance(confidence, (bool, np.bool_))
    if not ok or not (math.isfinite(confidence) and 0.0 < confidence < 1.0):
        hint = f" (a percentage? pass {confidence / 100:g})" if ok and 1.0 < confidence < 100.0 else ""
        raise InputError(f"confidence must be a number in (0, 1), e.g. 0.95; got {confidence!r}{hint}.")
    return 1.0 - float(confidence)


def _out(v):
    return float(v) if np.ndim(v) == 0 else v


def _hoeffding(mean: np.ndarray, n: np.ndarray, alpha: float) -> np.ndarray:
    return np.minimum(1.0, mean + np.sqrt(np.log(1.0 / alpha) / (2.0 * n)))


def hoeffding_upper(k, n, confidence: float = 0.95):
    """One-sided Hoeffding upper bound on a probability from ``k`` successes in ``n`` independent trials.

    ``P(p <= k/n + sqrt(ln(1/alpha) / (2n))) >= 1 - alpha`` (Hoeffding 1963, Theorem 1, for
    values in [0, 1]), ``alpha = 1 - confidence``, clipped at 1. The trials must be independent
    (e.g. images, not tokens of one image). Clopper-Pearson (``side="upper"``) is always tighter
    for counts; Hoeffding is the bound whose form the theorems use.
    """
    ka, na, alpha = _binom_inputs(k, n, confidence)
    return _out(_hoeffding(ka / na, na, alpha))


def hoeffding_mean_upper(total, n, confidence: float = 0.95):
    """One-sided Hoeffding upper bound on ``E[X]`` from ``n`` independent values ``X_i`` in [0, 1] summing to ``total``.

    ``P(E X <= total/n + sqrt(ln(1/alpha) / (2n))) >= 1 - alpha`` (Hoeffding 1963, Theorem 1),
    clipped at 1: the inequality of :func:`hoeffding_upper` for means of bounded values, e.g. the
    per-sample fraction of tokens with ``d > eps``; ``total`` need not be an integer.
    ``0 <= total <= n`` is required (each value lies in [0, 1]).
    """
    ta, na = _broadcast(_numeric(total, "total"), _numeric(n, "n"), total, n)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(ta) | ~np.isfinite(na) | (na < 1) | (na % 1 != 0) | (ta < 0) | (ta > na)
    if np.any(bad):
        raise InputError(f"need 0 <= total <= n with an integer n >= 1 (total = sum of n values in [0, 1]); "
                         f"got total={total!r}, n={n!r}.")
    return _out(_hoeffding(ta / na, na, _alpha(confidence)))


def clopper_pearson(k, n, confidence: float = 0.95, side: str = "two-sided"):
    """Exact binomial (Clopper & Pearson 1934) interval ``(low, high)`` for a probability.

    Two-sided: ``low = Beta^{-1}(alpha/2; k, n-k+1)``, ``high = Beta^{-1}(1-alpha/2; k+1, n-k)``
    (0 and 1 at the ends). ``side="upper"``: ``(0, Beta^{-1}(1-alpha; k+1, n-k))``;
    ``side="lower"``: ``(Beta^{-1}(alpha; k, n-k+1), 1)``. Coverage is at least ``confidence``.
    Equals ``scipy.stats.binomtest(k, n, alternative=...).proportion_ci(confidence, method="exact")``
    with ``alternative`` = ``"two-sided"``, ``"less"`` (upper) or ``"greater"`` (lower).
    """
    if not isinstance(side, str) or side not in SIDES:
        raise InputError(f"side must be one of {SIDES}; got {side!r}.")
    ka, na, alpha = _binom_inputs(k, n, confidence)
    a_lo = alpha / 2 if side == "two-sided" else alpha
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(ka > 0, stats.beta.ppf(a_lo, ka, na - ka + 1), 0.0)
        hi = np.where(ka < na, stats.beta.ppf(1 - a_lo, ka + 1, na - ka), 1.0)
    if side == "upper":
        lo = np.zeros_like(lo)
    if side == "lower":
        hi = np.ones_like(hi)
    return _out(lo), _out(hi)


def wilson_interval(k, n, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` for an accuracy k/n (Wilson 1927).

    ``(p + z^2/(2n) +- z sqrt(p(1-p)/n + z^2/(4n^2))) / (1 + z^2/n)``, ``z = Phi^{-1}(1 - alpha/2)``,
    ``p = k/n``: the interval of ``scipy.stats.binomtest(k, n).proportion_ci(confidence, method="wilson")``.
    Near-nominal coverage on average, not guaranteed (use :func:`clopper_pearson` for a guarantee).
    """
    ka, na, alpha = _binom_inputs(k, n, confidence)
    z = stats.norm.ppf(1.0 - alpha / 2.0)
    p = ka / na
    denom = 1.0 + z * z / na
    centre = (p + z * z / (2.0 * na)) / denom
    half = z * np.sqrt(p * (1.0 - p) / na + z * z / (4.0 * na * na)) / denom
    low = np.where(ka == 0, 0.0, np.clip(centre - half, 0.0, 1.0))  # exact ends: centre = half at k = 0
    high = np.where(ka == na, 1.0, np.clip(centre + half, 0.0, 1.0))
    return _out(low), _out(high)


@dataclass(frozen=True)
class McNemar:
    """Result of :func:`mcnemar_exact`: ``n`` pairs, ``only_a`` / ``only_b`` items right under one condition
    only, the paired accuracy ``difference`` (a minus b) with its ``ci``, and the two-sided exact ``p_value``."""

    n: int
    only_a: int
    only_b: int
    difference: float
    ci: tuple[float, float]
    p_value: float


def mcnemar_exact(correct_a, correct_b, confidence: float = 0.95) -> McNemar:
    """Exact McNemar test (McNemar 1947) of two paired 0/1 vectors, e.g. per-question correctness without
    and with a skip plan on the same questions.

    Only the discordant pairs carry information: with ``b`` = right under a only and ``c`` = right under b
    only, ``H0: P(a right, b wrong) = P(a wrong, b right)`` makes ``b ~ Binomial(b + c, 1/2)``; the p-value
    is ``scipy.stats.binomtest(b, b + c, 0.5)`` (two-sided; 1 when there is no discordant pair). The effect
    size is the paired accuracy difference ``(b - c) / n``; its interval maps the Clopper-Pearson interval
    ``[lo, hi]`` of ``b / (b + c)`` to ``(b + c) / n * (2 [lo, hi] - 1)`` (conditional on ``b + c``).
    """
    a = np.asarray(correct_a)
    bb = np.asarray(correct_b)
    if a.ndim != 1 or a.shape != bb.shape or a.size == 0:
        raise InputError(f"mcnemar_exact needs two non-empty 1-D vectors of the same length (one entry per "
                         f"question); got shapes {a.shape} and {bb.shape}.")
    for name, v in (("correct_a", a), ("correct_b", bb)):
        if v.dtype.kind not in "biu" or not np.isin(v, (0, 1)).all():
            raise InputError(f"{name} must hold 0/1 or booleans (right / wrong per question); got dtype {v.dtype}.")
    a, bb = a.astype(bool), bb.astype(bool)
    only_a, only_b, n = int((a & ~bb).sum()), int((~a & bb).sum()), int(a.size)
    discordant = only_a + only_b
    if discordant == 0:
        return McNemar(n, 0, 0, 0.0, (0.0, 0.0), 1.0)
    p = float(stats.binomtest(only_a, discordant, 0.5).pvalue)
    lo, hi = clopper_pearson(only_a, discordant, confidence)
    scale = discordant / n
    return McNemar(n, only_a, only_b, (only_a - only_b) / n, (scale * (2 * lo - 1), scale * (2 * hi - 1)), p)


def holm(p_values) -> np.ndarray:
    """Holm's (1979) step-down adjusted p-values of ``m`` tests, in the order given.

    With the p-values sorted, ``p_(1) <= ... <= p_(m)``, the adjusted value of the ``i``-th is
    ``max_{j <= i} min(1, (m - j + 1) p_(j))``. Rejecting every test whose adjusted p-value is ``<= alpha``
    keeps the probability of any false rejection ``<= alpha`` whatever the dependence between the tests
    (e.g. plans scored on the same questions). Never below the raw p-value, never above Bonferroni's
    ``min(1, m p)``, and equal to it for the smallest.
    """
    p = np.asarray(p_values, dtype=np.float64) if np.ndim(p_values) else None
    if p is None or p.ndim != 1 or p.size == 0 or not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise InputError(f"holm needs a non-empty 1-D sequence of p-values in [0, 1]; got {p_values!r}.")
    m = p.size
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = stepped
    return out


# ------------------------------------------------------------------ rank agreement over images (bootstrap)
__all__ += ["bootstrap_spearman", "SpearmanCI"]


@dataclass(frozen=True)
class SpearmanCI:
    """Result of :func:`bootstrap_spearman`: the Spearman correlation ``estimate`` of the two per-layer
    profiles, its percentile bootstrap interval ``[low, high]`` at ``confidence``, the number ``n`` of images
    resampled, the number of resamples ``n_boot`` and ``n_undefined``, how many of them gave a constant
    profile (no rank correlation; left out of the interval)."""

    estimate: float
    low: float
    high: float
    confidence: float
    n: int
    n_boot: int
    n_undefined: int

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}] (n={self.n}, {self.n_boot} resamples)"


def _row_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``a [R, L]`` with the same row of ``b [R, L]`` (average ranks for
    ties, as ``scipy.stats.spearmanr``); NaN where a row is constant."""
    ra, rb = stats.rankdata(a, axis=1), stats.rankdata(b, axis=1)
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    den = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(1) / np.where(den > 0, den, 1.0), np.nan)


def bootstrap_spearman(a, b, *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> SpearmanCI:
    """Spearman rank correlation across layers of two per-layer scores, with a bootstrap over images.

    ``a`` and ``b`` are per-image, per-layer scores ``[n, L]`` (row ``i`` = image ``i``, the same images in
    both), or one of them a fixed per-layer vector ``[L]`` (a score that exists only as an average; it is
    then not resampled). The statistic is ``rho = spearmanr(mean_i a[i], mean_i b[i])``, the rank
    correlation of the two layer profiles ``[L]``. Each of ``n_boot`` resamples draws ``n`` images with
    replacement, the same rows from ``a`` and ``b`` (the pairing is kept: a resample is a new set of
    images scored by both), and recomputes ``rho``; the interval is the ``(1 -+ confidence) / 2``
    percentiles of the resampled values (Efron & Tibshirani 1993, ch. 13). Images, not layers, are the
    independent units: the ``L`` layer scores of one image are not independent. Resamples in which a
    profile is constant have no rank correlation and are left out (counted in ``n_undefined``).
    """
    A, B = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if A.ndim not in (1, 2) or B.ndim not in (1, 2) or A.ndim + B.ndim < 3:
        raise InputError(f"bootstrap_spearman needs per-image scores [n, L] for a and b (or one of them a fixed "
                         f"per-layer vector [L]); got shapes {A.shape} and {B.shape}.")
    if A.shape[-1] != B.shape[-1] or A.shape[-1] < 2:
        raise InputError(f"a and b must score the same layers (at least 2); got {A.shape[-1]} and {B.shape[-1]}.")
    if A.ndim == B.ndim == 2 and A.shape[0] != B.shape[0]:
        raise InputError(f"a and b must hold the same images (rows); got {A.shape[0]} and {B.shape[0]}. Score the "
                         "same images with both measures.")
    if not (np.isfinite(A).all() and np.isfinite(B).all()):
        raise InputError("a and b must be finite (a NaN or infinite score cannot be ranked).")
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1 or not 0 < confidence < 1:
        raise InputError(f"need an integer n_boot >= 1 and 0 < confidence < 1; got {n_boot!r}, {confidence!r}.")
    n = A.shape[0] if A.ndim == 2 else B.shape[0]
    if n < 2:
        raise InputError(f"a bootstrap over images needs at least 2 images; got {n}.")
    profile_a, profile_b = (x.mean(0) if x.ndim == 2 else x for x in (A, B))
    estimate = float(_row_spearman(profile_a[None], profile_b[None])[0])
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot) / n  # [n_boot, n]: resampled image counts
    # [n_boot, L]: each resample's layer profile (a fixed vector stays the same in every resample)
    boot_a, boot_b = (weights @ x if x.ndim == 2 else np.broadcast_to(x, (n_boot, x.shape[0])) for x in (A, B))
    rho = _row_spearman(boot_a, boot_b)
    ok = rho[np.isfinite(rho)]
    tail = (1.0 - confidence) / 2.0
    low, high = (np.quantile(ok, [tail, 1.0 - tail]) if ok.size else (np.nan, np.nan))
    return SpearmanCI(estimate, float(low), float(high), float(confidence), int(n), int(n_boot),
                      int(n_boot - ok.size))
