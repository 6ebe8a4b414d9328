"""stats: finite-sample bounds and intervals (Hoeffding, Clopper-Pearson, Wilson), the bottom module.

Moved here from test_theory.py with the code (assertions unchanged), plus: agreement with
scipy.stats.binomtest, the Hoeffding bound for means of [0, 1] values, bad inputs, and the rule
that stats imports nothing from skipit_core but errors.
"""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import skipit_core.stats as sks
from skipit_core import theory
from skipit_core.errors import InputError, SkipitError
from skipit_core.stats import clopper_pearson, hoeffding_mean_upper, hoeffding_upper, wilson_interval

# ----------------------------------------------------------------------------------------------
# certificates (moved from test_theory.py)
# ----------------------------------------------------------------------------------------------

def test_intervals_known_values():
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    lo, hi = clopper_pearson(8, 10)
    assert (lo, hi) == pytest.approx((0.4439, 0.9748), abs=1e-4)
    assert clopper_pearson(0, 50, side="upper")[1] == pytest.approx(1 - 0.05 ** (1 / 50))
    assert clopper_pearson(50, 50)[1] == 1.0 and clopper_pearson(0, 50)[0] == 0.0
    assert hoeffding_upper(10, 100) == pytest.approx(0.1 + math.sqrt(math.log(20) / 200))


def test_interval_coverage_exact_over_binomial():
    n, conf = 30, 0.95
    ks = np.arange(n + 1)
    cp_lo, cp_hi = clopper_pearson(ks, n, conf)
    up = clopper_pearson(ks, n, conf, side="upper")[1]
    hoeff = hoeffding_upper(ks, n, conf)
    w_lo, w_hi = wilson_interval(ks, n, conf)
    wilson_cov = []
    for p in np.linspace(0.01, 0.99, 99):
        pmf = stats.binom.pmf(ks, n, p)
        assert pmf[(cp_lo <= p) & (p <= cp_hi)].sum() >= conf - 1e-9
        assert pmf[p <= up].sum() >= conf - 1e-9
        assert pmf[p <= hoeff].sum() >= conf - 1e-9
        wilson_cov.append(pmf[(w_lo <= p) & (p <= w_hi)].sum())
    assert 0.93 <= np.mean(wilson_cov) <= 0.97  # Wilson: near nominal on average, not guaranteed


def test_certificates_reject_bad_counts():
    with pytest.raises(InputError, match="0 <= k <= n"):
        wilson_interval(11, 10)
    with pytest.raises(InputError, match="confidence"):
        clopper_pearson(1, 10, confidence=1.5)
    with pytest.raises(SkipitError):
        hoeffding_upper(1.5, 10)


# ----------------------------------------------------------------------------------------------
# the closed forms are scipy's binomtest intervals
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, conf", [(1, 0.95), (7, 0.9), (40, 0.99)])
def test_intervals_equal_scipy_binomtest(n, conf):
    alternatives = {"two-sided": "two-sided", "upper": "less", "lower": "greater"}
    for k in range(n + 1):
        for side, alt in alternatives.items():
            ref = stats.binomtest(k, n, alternative=alt).proportion_ci(conf, method="exact")
            assert clopper_pearson(k, n, conf, side=side) == pytest.approx((ref.low, ref.high), abs=1e-9)
        ref = stats.binomtest(k, n).proportion_ci(conf, method="wilson")
        assert wilson_interval(k, n, conf) == pytest.approx((ref.low, ref.high), abs=1e-12)
    # vectorised over k: the same numbers as one call per k
    ks = np.arange(n + 1)
    lo, hi = clopper_pearson(ks, n, conf)
    assert np.allclose([clopper_pearson(int(k), n, conf) for k in ks], np.column_stack([lo, hi]), atol=1e-15)


def test_theory_reexports_the_same_functions():
    for name in ("hoeffding_upper", "hoeffding_mean_upper", "clopper_pearson", "wilson_interval"):
        assert getattr(theory, name) is getattr(sks, name) and name in theory.__all__


# ----------------------------------------------------------------------------------------------
# Hoeffding for means of values in [0, 1]
# ----------------------------------------------------------------------------------------------

def test_hoeffding_mean_upper_formula_and_coverage():
    assert hoeffding_mean_upper(2.5, 10, 0.9) == pytest.approx(0.25 + math.sqrt(math.log(10) / 20))
    assert hoeffding_mean_upper(10.0, 10) == 1.0  # clipped
    assert hoeffding_mean_upper(np.array([3.0, 7.0]), 10) == pytest.approx(hoeffding_upper(np.array([3, 7]), 10))
    # coverage: means of n Beta(2, 5) fractions (true mean 2/7), 4000 repetitions
    rng = np.random.default_rng(0)
    n, conf = 25, 0.9
    totals = rng.beta(2, 5, size=(4000, n)).sum(1)
    covered = np.mean(2 / 7 <= hoeffding_mean_upper(totals, n, conf))
    assert covered >= conf


@pytest.mark.parametrize("total, n, message", [
    (-0.5, 10, "0 <= total <= n"), (10.5, 10, "0 <= total <= n"), (2.0, 0, "n >= 1"),
    (2.0, 2.5, "integer n"), (np.nan, 10, "total"), (True, 10, "bools"), ("2", 10, "numbers"),
])
def test_hoeffding_mean_upper_rejects_impossible_sums(total, n, message):
    with pytest.raises(InputError, match=message):
        hoeffding_mean_upper(total, n)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call", [hoeffding_upper, clopper_pearson, wilson_interval])
def test_counts_must_be_numbers_of_matching_shape(call):
    for k in (True, np.array([True, False]), "3", None):
        with pytest.raises(InputError, match="must be numbers"):
            call(k, 10)
    with pytest.raises(InputError, match="broadcastable"):
        call([1, 2, 3], [10, 10])
    for conf in (True, "0.95", float("nan"), 0, 1, 95):
        with pytest.raises(InputError, match=r"confidence must be a number in \(0, 1\)"):
            call(3, 10, conf)
    with pytest.raises(InputError, match="pass 0.95"):
        call(3, 10, 95)
    assert np.shape(call(np.array([], dtype=int), 10)[0] if call is not hoeffding_upper
                    else call(np.array([], dtype=int), 10)) == (0,)


def test_clopper_pearson_side_must_be_known():
    with pytest.raises(InputError, match="side must be one of"):
        clopper_pearson(3, 10, side="less")


# ----------------------------------------------------------------------------------------------
# a bottom module
# ----------------------------------------------------------------------------------------------

def test_stats_imports_only_numpy_scipy_and_errors():
    tree = ast.parse(Path(sks.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(("." * node.level) + (node.module or ""))
    assert imported <= {"__future__", "math", "dataclasses", "numpy", "scipy", ".errors"}, imported
    code = "import sys, skipit_core.stats; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


# ----------------------------------------------------------------------------------------------
# paired test
# ----------------------------------------------------------------------------------------------

def test_mcnemar_exact_is_the_binomial_test_of_the_discordant_pairs():
    from skipit_core.stats import mcnemar_exact

    # 10 discordant pairs all one way: p = 2 * 2^-10 by hand; the 30 concordant pairs change nothing
    a = np.array([1] * 10 + [1] * 20 + [0] * 10, bool)
    b = np.array([0] * 10 + [1] * 20 + [0] * 10, bool)
    r = mcnemar_exact(a, b)
    assert (r.n, r.only_a, r.only_b) == (40, 10, 0)
    assert r.p_value == pytest.approx(2 * 0.5 ** 10, rel=1e-12)
    assert r.difference == pytest.approx(10 / 40) and r.ci[0] <= r.difference <= r.ci[1] <= 10 / 40 + 1e-12
    swapped = mcnemar_exact(b, a)  # symmetric: the same p, the opposite effect
    assert swapped.p_value == r.p_value and swapped.difference == -r.difference
    # 7 against 3: the two-sided exact p-value summed by hand
    a = np.r_[np.ones(7), np.zeros(3), np.ones(5)].astype(int)
    b = np.r_[np.zeros(7), np.ones(3), np.ones(5)].astype(int)
    tail = sum(math.comb(10, k) for k in range(0, 4)) / 2 ** 10
    assert mcnemar_exact(a, b).p_value == pytest.approx(2 * tail, rel=1e-12)
    same = mcnemar_exact(a, a)
    assert same.p_value == 1.0 and same.difference == 0.0
    for bad in ([], [[1, 0]], [0.5, 1.0], ["y", "n"]):
        with pytest.raises(InputError):
            mcnemar_exact(bad, bad)
    with pytest.raises(InputError, match="same length"):
        mcnemar_exact([1, 0, 1], [1, 0])


def test_wilson_interval_ends_exactly_at_zero_and_one():
    """At k = 0 the lower end is 0 and at k = n the upper end is 1, exactly (the closed form's centre and
    half-width are equal there; computed apart they differed by rounding, 5.6e-17 at k = 0, n = 7)."""
    for n in (1, 7, 140, 840):
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0
        assert 0.0 < wilson_interval(0, n)[1] and wilson_interval(n, n)[0] < 1.0
    lo, hi = wilson_interval(np.array([0, 3, 7]), 7)
    assert lo[0] == 0.0 and hi[2] == 1.0 and 0 < lo[1] < 3 / 7 < hi[1] < 1
