"""Information estimators against answers known independently (closed forms, exact tables)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import digamma
from scipy.stats import ortho_group

from skipit_core.errors import InputError, NumericalError, SkipitError
from skipit_core.information import (
    bootstrap_ci,
    conditional_entropy,
    conditional_entropy_from_table,
    conditional_mutual_information,
    entropy,
    entropy_from_pmf,
    ksg_backend,
    mutual_information,
    mutual_information_from_table,
    pid,
    quantize,
    shuffle_baseline,
)


def gaussian_pair(n: int, d: int, rhos, rng, mix: bool = True):
    """x, y in R^d with canonical correlations ``rhos``, mixed by well-conditioned linear maps.

    Returns x, y and the closed form ``1/2 log2(det S_x det S_y / det S)`` of the true covariance.
    """
    rhos = np.broadcast_to(np.asarray(rhos, dtype=float), (d,))
    ax = ortho_group.rvs(d, random_state=rng) @ np.diag(rng.uniform(0.5, 2, d)) if d > 1 else np.array([[1.7]])
    ay = ortho_group.rvs(d, random_state=rng) @ np.diag(rng.uniform(0.5, 2, d)) if d > 1 else np.array([[0.6]])
    if not mix:
        ax, ay = np.eye(d), np.eye(d)
    cov = np.block([[ax @ ax.T, ax @ np.diag(rhos) @ ay.T], [ay @ np.diag(rhos) @ ax.T, ay @ ay.T]])
    z = rng.multivariate_normal(np.zeros(2 * d), cov, size=n, method="cholesky")
    logdet = lambda m: np.linalg.slogdet(m)[1]  # noqa: E731
    closed = 0.5 * (logdet(cov[:d, :d]) + logdet(cov[d:, d:]) - logdet(cov)) / math.log(2)
    return z[:, :d], z[:, d:], closed


# ----------------------------------------------------------------------------------------------
# Gaussian data
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", range(1, 11))
def test_gaussian_matches_closed_form_to_1e2_bits(d):
    rng = np.random.default_rng(10 + d)
    # sum of rho_i^2 = 0.12 keeps the estimator's sd near 0.003 bits at n = 20000
    x, y, closed = gaussian_pair(20000, d, math.sqrt(0.12 / d), rng)
    assert closed == pytest.approx(-0.5 * d * math.log2(1 - 0.12 / d), rel=1e-9)
    assert abs(mutual_information(x, y, "gaussian") - closed) < 1e-2


@pytest.mark.parametrize("d", [1, 3, 10])
def test_gaussian_and_gcmi_at_large_mi(d):
    rng = np.random.default_rng(20 + d)
    x, y, closed = gaussian_pair(20000, d, 0.8, rng)  # up to 7.4 bits
    assert mutual_information(x, y, "gaussian") == pytest.approx(closed, rel=0.02, abs=0.01)
    # gcmi: documented |error| <= 0.02 bits + 1.5% of I at this n for well-conditioned covariances
    assert abs(mutual_information(x, y, "gcmi") - closed) <= 0.02 + 0.015 * closed


@pytest.mark.parametrize("d", [2, 6])
def test_gcmi_documented_bias_at_small_mi(d):
    x, y, closed = gaussian_pair(20000, d, 0.4, np.random.default_rng(30 + d))
    assert abs(mutual_information(x, y, "gcmi") - closed) <= 0.02 + 0.015 * closed


@pytest.mark.parametrize("d, rho, lo_rel, lo_abs, hi_rel, hi_abs", [
    (1, 0.6, -0.05, -0.05, 0.05, 0.05),   # joint dim 2
    (2, 0.6, -0.05, -0.05, 0.05, 0.05),   # joint dim 4
    (3, 0.6, -0.15, -0.03, 0.0, 0.03),    # joint dim 6
    (5, 0.6, -0.35, 0.0, -0.15, 0.0),     # joint dim 10: documented negative bias
])
def test_ksg_documented_bias(d, rho, lo_rel, lo_abs, hi_rel, hi_abs):
    x, y, closed = gaussian_pair(2000, d, rho, np.random.default_rng(40 + d), mix=False)
    err = mutual_information(x, y, "ksg") - closed
    assert lo_rel * closed + lo_abs <= err <= hi_rel * closed + hi_abs


def test_gaussian_cmi_closed_form_and_ksg_cmi():
    rng = np.random.default_rng(5)
    n = 20000
    z = rng.standard_normal((n, 2))
    x = z @ [[1.0], [0.5]] + rng.standard_normal((n, 1))
    y = 0.6 * x + z[:, :1] - z[:, 1:] + rng.standard_normal((n, 1))
    # closed form from the exact covariance of (x, y, z)
    cz = np.eye(2)
    a = np.array([[1.0, 0.5]])
    cxz, cxx = a @ cz, a @ a.T + 1
    b = np.array([[1.0, -1.0]])
    cyz = 0.6 * cxz + b @ cz
    cyx = 0.6 * cxx + b @ cz @ a.T
    cyy = 0.36 * cxx + 2 * 0.6 * (b @ cz @ a.T) + b @ b.T + 1
    full = np.block([[cxx, cyx.T, cxz], [cyx, cyy, cyz], [cxz.T, cyz.T, cz]])
    ld = lambda idx: np.linalg.slogdet(full[np.ix_(idx, idx)])[1]  # noqa: E731
    closed = 0.5 * (ld([0, 2, 3]) + ld([1, 2, 3]) - ld([0, 1, 2, 3]) - ld([2, 3])) / math.log(2)
    assert conditional_mutual_information(x, y, z, "gaussian") == pytest.approx(closed, abs=0.01)
    assert conditional_mutual_information(x, y, z, "gcmi") == pytest.approx(closed, abs=0.02)
    m = 3000
    assert conditional_mutual_information(x[:m], y[:m], z[:m], "ksg") == pytest.approx(closed, abs=0.06)
    # conditioning on an independent variable changes nothing
    noise = rng.standard_normal((n, 1))
    assert conditional_mutual_information(x, y, noise, "gaussian") == pytest.approx(
        mutual_information(x, y, "gaussian"), abs=2e-3)


def test_invariances_claimed_by_each_estimator():
    rng = np.random.default_rng(6)
    x, y, _ = gaussian_pair(3000, 2, 0.7, rng, mix=False)
    warped = np.column_stack([np.exp(2 * x[:, 0]), -(x[:, 1] ** 3) - x[:, 1]])  # increasing, decreasing
    # gcmi and ksg (copula marginals): strictly monotone maps per column change nothing
    for method in ("gcmi", "ksg"):
        assert mutual_information(warped, y, method) == pytest.approx(mutual_information(x, y, method), abs=1e-9)
    # ksg on z-scored columns is not invariant, which is why the copula transform is the default
    assert abs(mutual_information(warped, y, "ksg", marginals="zscore")
               - mutual_information(x, y, "ksg", marginals="zscore")) > 0.02
    # gaussian claims invariance under invertible linear maps of each variable only
    lin = x @ np.array([[2.0, 1.0], [-0.5, 3.0]]) + 7.0
    assert mutual_information(lin, y, "gaussian") == pytest.approx(mutual_information(x, y, "gaussian"), abs=1e-9)


def test_ksg_backends_match_a_brute_force_reference(monkeypatch):
    import skipit_core.information as info

    monkeypatch.setattr(info, "_TORCH_BLOCK_ELEMS", 400 * 37)  # 37-row blocks: many, last one partial
    rng = np.random.default_rng(7)
    x, y, _ = gaussian_pair(400, 3, 0.5, rng)
    k, n = 4, 400
    # plain O(n^2) KSG from the formula, on the raw data
    dx = np.abs(x[:, None, :] - x[None]).max(-1)
    dy = np.abs(y[:, None, :] - y[None]).max(-1)
    dz = np.maximum(dx, dy)
    np.fill_diagonal(dz, np.inf)
    eps = np.sort(dz, axis=1)[:, k - 1]
    nx = (dx < eps[:, None]).sum(1) - 1
    ny = (dy < eps[:, None]).sum(1) - 1
    ref = (digamma(k) + digamma(n) - np.mean(digamma(nx + 1) + digamma(ny + 1))) / math.log(2)
    for backend in ("tree", "torch"):
        got = mutual_information(x, y, "ksg", k=k, jitter=0, marginals="none", backend=backend)
        assert got == pytest.approx(ref, abs=1e-12)
    z = x[:, :1] + rng.standard_normal((n, 2))
    for est in (lambda b: conditional_mutual_information(x, y, z, "ksg", k=k, jitter=0, backend=b),
                lambda b: entropy(x, "ksg", k=k, jitter=0, backend=b)):
        assert est("torch") == est("tree")
    assert ksg_backend(5000, 16) == "torch" and ksg_backend(5000, 10) == "tree"


def test_ksg_entropy_of_gaussian_and_uniform():
    rng = np.random.default_rng(8)
    for d in (1, 2):
        h = entropy(rng.standard_normal((4000, d)) * 3.0, "ksg")
        assert h == pytest.approx(0.5 * d * math.log2(2 * math.pi * math.e * 9.0), abs=0.05)
    assert entropy(rng.uniform(0, 4, (4000, 1)), "ksg") == pytest.approx(2.0, abs=0.05)
    cov = np.array([[2.0, 0.8], [0.8, 1.0]])
    g = rng.multivariate_normal([0, 0], cov, size=20000)
    exact = 0.5 * math.log2((2 * math.pi * math.e) ** 2 * np.linalg.det(cov))
    assert entropy(g, "gaussian") == pytest.approx(exact, abs=0.01)


# ----------------------------------------------------------------------------------------------
# discrete data
# ----------------------------------------------------------------------------------------------

def test_discrete_entropy_of_exactly_realised_pmf():
    x = np.repeat([0, 1, 2, 3], [40, 20, 10, 10])  # pmf (1/2, 1/4, 1/8, 1/8) exactly
    assert entropy(x, miller_madow=False) == pytest.approx(1.75, abs=1e-12)
    assert entropy(x) == pytest.approx(1.75 + 3 / (2 * 80 * math.log(2)), abs=1e-12)
    pairs = np.column_stack([x % 2, x // 2])  # rows are joint symbols: same 4 symbols
    assert entropy(pairs, miller_madow=False) == pytest.approx(1.75, abs=1e-12)
    assert entropy_from_pmf([0.5, 0.25, 0.125, 0.125, 0.0]) == pytest.approx(1.75)


def test_discrete_mi_equals_table_closed_form():
    # binary symmetric channel, crossover 0.1, realised exactly by repeated rows
    x = np.repeat([0, 0, 1, 1], [45, 5, 5, 45])
    y = np.repeat([0, 1, 0, 1], [45, 5, 5, 45])
    h01 = -(0.1 * math.log2(0.1) + 0.9 * math.log2(0.9))
    assert mutual_information(x, y, miller_madow=False) == pytest.approx(1 - h01, abs=1e-12)
    assert mutual_information_from_table([[0.45, 0.05], [0.05, 0.45]]) == pytest.approx(1 - h01, abs=1e-12)
    # with the correction: plug-in + (m_X + m_Y - m_XY - 1) / (2 n ln 2) = plug-in - 1/(200 ln 2)
    assert mutual_information(x, y) == pytest.approx(1 - h01 - 1 / (200 * math.log(2)), abs=1e-12)
    # XOR: pairwise independent, conditionally fully dependent
    a = np.tile([0, 0, 1, 1], 25)
    b = np.tile([0, 1, 0, 1], 25)
    assert mutual_information(a, b, miller_madow=False) == pytest.approx(0.0, abs=1e-12)
    assert conditional_mutual_information(a, b, a ^ b, miller_madow=False) == pytest.approx(1.0, abs=1e-12)


def test_conditional_entropy_from_samples_matches_the_table():
    # joint table p[x, y] realised exactly by repeated rows: x | y=0 uniform on {0, 1}, x | y=1 always 2
    x = np.repeat([0, 1, 2], [30, 30, 40])
    y = np.repeat([0, 0, 1], [30, 30, 40])
    table = [[0.3, 0.0], [0.3, 0.0], [0.0, 0.4]]
    assert conditional_entropy(x, y, miller_madow=False) == pytest.approx(0.6, abs=1e-12)  # 0.6 * 1 bit + 0.4 * 0
    assert conditional_entropy(x, y, miller_madow=False) == pytest.approx(conditional_entropy_from_table(table))
    assert conditional_entropy(y, x, miller_madow=False) == pytest.approx(0.0, abs=1e-12)  # y is a function of x
    # Miller-Madow: plug-in + (m_XY - m_Y) / (2 n ln 2) = plug-in + 1 / (200 ln 2)
    assert conditional_entropy(x, y) == pytest.approx(0.6 + 1 / (200 * math.log(2)), abs=1e-12)
    # H(X|Y) = H(X) - I(X;Y) with the same correction, and a constant y leaves H(X)
    assert conditional_entropy(x, y) == pytest.approx(entropy(x) - mutual_information(x, y), abs=1e-12)
    assert conditional_entropy(x, np.zeros(100, dtype=int)) == pytest.approx(entropy(x), abs=1e-12)
    with pytest.raises(InputError, match="same number of samples"):
        conditional_entropy(x, y[:-1])


def test_miller_madow_reduces_bias_on_uniform_source():
    rng = np.random.default_rng(9)
    plug, mm = [], []
    for _ in range(200):
        x = rng.integers(0, 32, size=100)
        plug.append(entropy(x, miller_madow=False))
        mm.append(entropy(x))
    bias_plugin, bias_mm = np.mean(plug) - 5.0, np.mean(mm) - 5.0
    assert bias_plugin < -0.15  # the plug-in underestimates by about (m - 1) / (2 n ln 2)
    assert abs(bias_mm) < 0.3 * abs(bias_plugin)


def test_discrete_accepts_tensors_and_2d_codes():
    x = torch.tensor([0, 1, 1, 0, 2, 2, 1, 0])
    y = torch.tensor([[0, 1], [1, 1], [1, 1], [0, 1], [2, 0], [2, 0], [1, 1], [0, 1]])
    assert mutual_information(x, y, miller_madow=False) == pytest.approx(entropy(x, miller_madow=False))


# ----------------------------------------------------------------------------------------------
# quantisation, permutation null, bootstrap
# ----------------------------------------------------------------------------------------------

def test_quantize_is_deterministic_and_recovers_clusters():
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 4, 600)
    centres = rng.standard_normal((4, 5)) * 10
    x = centres[labels] + rng.standard_normal((600, 5))
    a, b = quantize(x, 4, seed=3), quantize(torch.as_tensor(x), 4, seed=3)
    assert np.array_equal(a, b) and a.min() == 0 and a.max() == 3
    assert mutual_information(a, labels, miller_madow=False) == pytest.approx(
        entropy(labels, miller_madow=False), abs=1e-12)  # a relabelling of the true clusters
    with pytest.raises(InputError, match="use n_codes <= 3"):
        quantize(np.repeat(np.eye(3), 5, axis=0), 4)


def test_shuffle_baseline_null_and_p_values():
    rng = np.random.default_rng(12)
    x = rng.integers(0, 6, 300)
    indep = rng.integers(0, 6, 300)
    plug = lambda a, b: mutual_information(a, b, miller_madow=False)  # noqa: E731
    res = shuffle_baseline(plug, x, indep, n_shuffles=60, seed=0)
    # the plug-in bias under independence is about (|X|-1)(|Y|-1) / (2 n ln 2) = 0.06 bits
    assert res.null_mean == pytest.approx(25 / (600 * math.log(2)), rel=0.3)
    assert res.p_value > 0.05 and res.null.shape == (60,)
    dep = (x + (rng.random(300) < 0.2)) % 6
    res = shuffle_baseline(plug, x, dep, n_shuffles=60, seed=0)
    assert res.p_value == pytest.approx(1 / 61) and res.corrected > 1.0


def test_bootstrap_ci_for_mean_and_mi():
    rng = np.random.default_rng(13)
    v = rng.standard_normal(400)
    ci = bootstrap_ci(np.mean, v, n_boot=400, level=0.95, seed=1)
    assert ci.low < ci.estimate < ci.high
    assert ci.high - ci.low == pytest.approx(2 * 1.96 / 20, rel=0.2)  # normal theory: +-1.96 sd/sqrt(n)
    x, y, closed = gaussian_pair(2000, 2, 0.5, rng)
    ci = bootstrap_ci(lambda a, b: mutual_information(a, b, "gaussian"), x, y, n_boot=100, seed=2)
    assert ci.low <= closed <= ci.high


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

def test_bad_input_messages():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((50, 2))
    with pytest.raises(InputError, match=r"at least k \+ 1 = 4 samples.*smaller k"):
        mutual_information(x[:3], x[:3, :1], "ksg", k=3)
    for method in ("gaussian", "gcmi", "ksg"):
        const = np.column_stack([x[:, 0], np.ones(50)])
        with pytest.raises(InputError, match="constant column.*Drop them"):
            mutual_information(const, x[:, 1], method)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(NumericalError, match="NaN/inf.*drop or impute"):
        mutual_information(bad, x, "gaussian")
    bad[3, 1] = np.inf
    with pytest.raises(NumericalError, match="NaN/inf"):
        entropy(bad, "ksg")
    with pytest.raises(InputError, match="same number of samples.*row by row"):
        mutual_information(x, x[:40], "gcmi")
    with pytest.raises(InputError, match="single distinct value.*more codes"):
        mutual_information(np.zeros(20, dtype=int), np.arange(20) % 2)
    with pytest.raises(InputError, match="choose one of"):
        entropy(x, "plugin")
    with pytest.raises(InputError, match=r"shape \(n,\) or \(n, d\)"):
        entropy(np.zeros((4, 2, 2)))
    with pytest.raises(InputError, match="marginals must be one of"):
        mutual_information(x, x, "ksg", marginals="rank")
    with pytest.raises(SkipitError, match="jitter"):
        mutual_information(np.repeat(x[:5], 10, axis=0), np.repeat(x[:5], 10, axis=0), "ksg", jitter=0)


# ----------------------------------------------------------------------------------------------
# Gaussian / GCMI bias (plug-in + analytic correction, Ince et al. 2017)
# ----------------------------------------------------------------------------------------------

def canonical_pairs(n: int, d: int, rho: float, rng):
    """x, y in R^d with corr(x_i, y_i) = rho, independent across i: I = -d/2 log2(1 - rho^2) bits."""
    x = rng.standard_normal((n, d))
    return x, rho * x + math.sqrt(1 - rho**2) * rng.standard_normal((n, d))


def test_closed_form_of_canonical_pairs():
    # the log-determinant closed form of gaussian_pair equals -d/2 log2(1 - rho^2) for unmixed pairs
    for d, rho in [(1, 0.5), (4, 0.9), (10, 0.99)]:
        _, _, closed = gaussian_pair(10, d, rho, np.random.default_rng(0))
        assert closed == pytest.approx(-0.5 * d * math.log2(1 - rho**2), rel=1e-9)


def test_gaussian_mi_at_strong_dependence_is_not_shrunk_down():
    # issue 10 item 6: d = 10, n = 1000, rho = 0.9 gave 11.21 bits against the closed form 11.98
    closed = -5 * math.log2(1 - 0.81)
    errs = [mutual_information(*canonical_pairs(1000, 10, 0.9, np.random.default_rng(s)), "gaussian") - closed
            for s in range(8)]
    assert abs(np.mean(errs)) < 0.05  # the standard error of the mean is about 0.02 bits


def test_gaussian_logdet_bias_is_the_wishart_expectation():
    from skipit_core.information import gaussian_logdet_bias

    rng = np.random.default_rng(3)
    n, d = 12, 4  # small n: the bias is large (about -2.6 nats) and the Monte Carlo mean pins it
    logdets = [np.linalg.slogdet(np.cov(rng.standard_normal((n, d)), rowvar=False))[1] for _ in range(20000)]
    assert np.mean(logdets) == pytest.approx(gaussian_logdet_bias(n, d), abs=0.02)
    assert gaussian_logdet_bias(10**6, 3) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(InputError, match="need n > d"):
        gaussian_logdet_bias(5, 5)


def test_gaussian_entropy_is_unbiased_at_small_n():
    from scipy.special import polygamma

    d, n, rho, seeds = 10, 200, 0.9, 300  # joint entropy of 10 canonical pairs (20 dimensions)
    exact = 0.5 * (2 * d * math.log2(2 * math.pi * math.e) + d * math.log2(1 - rho**2))
    errs = [entropy(np.hstack(canonical_pairs(n, d, rho, np.random.default_rng(s))), "gaussian") - exact
            for s in range(seeds)]
    # Var(ln det S) = sum_j psi'((n - j) / 2) for a Wishart matrix; H carries half of it, in bits
    se = 0.5 * math.sqrt(polygamma(1, (n - np.arange(1, 2 * d + 1)) / 2).sum()) / math.log(2) / math.sqrt(seeds)
    assert abs(np.mean(errs)) < 3 * se  # 3 se = 0.05 bits; the plug-in is 1.6 bits low here


# measured over rho in {0, .3, .6, .9, .99}, d in {1, 5, 10, 20}, n in {500, 2000, 1e4, 1e5} with
# 100 seeds per point (10 at 1e5): see the docstring of mutual_information. The test below sweeps a
# subset of that grid with fewer seeds and asserts the documented bound plus 3 standard errors.
GRID_N = (500, 5000, 100_000)
GRID_D = (1, 5, 20)
GRID_RHO = (0.0, 0.5, 0.9, 0.99)


def documented_bias_bound(method: str, n: int, d: int, rho: float) -> float:
    """The bias bounds stated in the docstring of mutual_information (bits)."""
    if method == "gaussian":
        return 0.0  # unbiased by construction (the Wishart log-determinant expectation)
    return 1.5 * d * rho**2 / (math.sqrt(1 - rho**2) * n**0.8)  # gcmi: rank noise, always downward


@pytest.mark.parametrize("n", GRID_N)
def test_gaussian_and_gcmi_bias_within_documented_bound_over_the_grid(n):
    seeds = {500: 6, 5000: 3, 100_000: 2}[n]
    for d in GRID_D:
        for rho in GRID_RHO:
            closed = -0.5 * d * math.log2(1 - rho**2)
            for method in ("gaussian", "gcmi"):
                errs = np.array([mutual_information(*canonical_pairs(n, d, rho, np.random.default_rng(100 * s + d)),
                                                    method) - closed for s in range(seeds)])
                # standard error of the mean from the estimator's sd, sqrt(d rho^2 / n + d^2 / (2 n^2)) / ln 2
                se = math.sqrt(d * rho**2 / n + d**2 / (2 * n**2)) / math.log(2) / math.sqrt(seeds)
                bound = documented_bias_bound(method, n, d, rho)
                assert abs(errs.mean()) <= bound + 3 * se + 0.005, (method, n, d, rho, errs.mean(), bound, se)


# ----------------------------------------------------------------------------------------------
# input rules (issue 10 item 5 and the same class of fault elsewhere)
# ----------------------------------------------------------------------------------------------

def test_float64_tensors_keep_their_precision():
    rng = np.random.default_rng(15)
    tiny = np.column_stack([rng.standard_normal(200), 1.0 + 1e-10 * rng.standard_normal(200)])
    # float32 would round the second column to a constant and reject it
    assert entropy(torch.from_numpy(tiny), "gaussian") == pytest.approx(entropy(tiny, "gaussian"), abs=1e-9)
    x = rng.standard_normal((500, 1))
    for method, noise in (("ksg", 1e-9), ("gaussian", 1e-4)):  # float32 merges neighbours / drops digits
        y = x + noise * rng.standard_normal((500, 1))
        kw = {"jitter": 0, "marginals": "none"} if method == "ksg" else {}
        assert mutual_information(torch.from_numpy(x), torch.from_numpy(y), method, **kw) == pytest.approx(
            mutual_information(x, y, method, **kw), abs=1e-9)
    codes = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 2.0], dtype=torch.bfloat16)  # NumPy has no bfloat16
    assert entropy(codes, miller_madow=False) == pytest.approx(entropy(codes.float().numpy(), miller_madow=False))


@pytest.mark.parametrize("call", [
    lambda x, y: entropy(x, "gaussian"),
    lambda x, y: mutual_information(x, y, "gcmi"),
    lambda x, y: mutual_information(x, y, "ksg", k=2),
    lambda x, y: conditional_mutual_information(x, y, y, "discrete"),
    lambda x, y: entropy((x > 0).astype(int)),
    lambda x, y: pid(x > 0, y > 0, x[:, :1] > 0),
])
def test_inputs_that_look_transposed_are_rejected(call):
    rng = np.random.default_rng(16)
    x, y = rng.standard_normal((5, 500)), rng.standard_normal((5, 500))  # 500 samples given as columns
    with pytest.raises(InputError, match=r"more columns than rows.*\.T"):
        call(x, y)
    call(x.T, y.T)  # the fix the message gives works


def test_wide_inputs_are_fine_where_d_greater_than_n_is_meaningful():
    rng = np.random.default_rng(24)
    states = np.repeat(rng.standard_normal((4, 300)) * 5, 10, axis=0) + rng.standard_normal((40, 300))
    codes = quantize(states, 4)  # 40 hidden states of width 300: k-means is defined
    assert mutual_information(codes, np.repeat(np.arange(4), 10), miller_madow=False) == pytest.approx(2.0)
    from skipit_core.information import copula_normalize, ledoit_wolf_covariance
    assert ledoit_wolf_covariance(states)[0].shape == (300, 300)  # Ledoit-Wolf is made for d > n
    assert copula_normalize(states).shape == states.shape
    ci = bootstrap_ci(lambda s: float(np.linalg.norm(s.mean(0))), states, n_boot=20)
    assert ci.low <= ci.estimate <= ci.high


def test_k_accepts_integer_likes_and_rejects_bools():
    rng = np.random.default_rng(17)
    x = rng.standard_normal((300, 2))
    y = x[:, :1] + rng.standard_normal((300, 1))
    ref = mutual_information(x, y, "ksg", k=3)
    for k in (np.int64(3), torch.tensor(3), np.array(3)):
        assert mutual_information(x, y, "ksg", k=k) == ref
        assert entropy(x, "ksg", k=k) == entropy(x, "ksg", k=3)
    for bad, message in [(True, "bool"), (np.bool_(True), "bool"), (3.0, "of type float"),
                         ("3", "got '3' of type str"), (0, "positive integer"), (torch.tensor(2.0), "Tensor")]:
        with pytest.raises(InputError, match=f"k .*{message}"):
            mutual_information(x, y, "ksg", k=bad)
        with pytest.raises(InputError, match="k "):
            conditional_mutual_information(x, y, y, "ksg", k=bad)


def test_counts_levels_and_flags_of_the_helpers():
    rng = np.random.default_rng(18)
    v = rng.standard_normal(100)
    x = rng.integers(0, 3, 100)
    plug = lambda a, b: mutual_information(a, b, miller_madow=False)  # noqa: E731
    assert np.array_equal(quantize(v[:, None], torch.tensor(3)), quantize(v[:, None], 3))
    for bad in (True, 3.0, "4", 1):
        with pytest.raises(InputError, match="n_codes"):
            quantize(v[:, None], bad)
    for bad in (2.5, True, "10", 1):
        with pytest.raises(InputError, match="n_boot"):
            bootstrap_ci(np.mean, v, n_boot=bad)
    for bad in (0, 1, 1.5, 95, float("nan"), True):
        with pytest.raises(InputError, match=r"level must be .*\(0, 1\)"):
            bootstrap_ci(np.mean, v, level=bad)
    for bad in (2.5, True, "10", 0):
        with pytest.raises(InputError, match="n_shuffles"):
            shuffle_baseline(plug, x, x, n_shuffles=bad)
    assert shuffle_baseline(plug, x, x, n_shuffles=np.int64(5)).null.shape == (5,)
    for call in (lambda: shuffle_baseline("mi", x, x), lambda: bootstrap_ci(None, v)):
        with pytest.raises(InputError, match="estimator must be a function"):
            call()
    for call in (lambda: shuffle_baseline(plug, [], []), lambda: bootstrap_ci(np.mean, np.array([])),
                 lambda: bootstrap_ci(np.mean, np.array(3.0))):
        with pytest.raises(InputError, match="2 samples|scalar"):
            call()
    with pytest.raises(InputError, match="same number of samples"):
        bootstrap_ci(lambda a, b: 0.0, v, v[:50])
    with pytest.raises(NumericalError, match="NaN"):
        bootstrap_ci(np.mean, np.append(v, np.nan))
    for bad in ("no", 1, None):
        with pytest.raises(InputError, match="miller_madow must be True or False"):
            entropy(x, miller_madow=bad)
    for bad in (float("nan"), -1.0, "1e-10", True):
        with pytest.raises(InputError, match="jitter must be a finite number >= 0"):
            mutual_information(v, v, "ksg", jitter=bad)
    with pytest.raises(InputError, match="seed"):
        mutual_information(v, v, "ksg", seed=-1)
    with pytest.raises(InputError, match="joint_dim"):
        ksg_backend(100, "a")


def test_complex_text_and_integer_inputs():
    rng = np.random.default_rng(19)
    x = rng.standard_normal((400, 1))
    y = x + rng.standard_normal((400, 1))
    with pytest.raises(InputError, match="complex"):
        mutual_information(x + 1j, y, "gaussian")
    with pytest.raises(InputError, match="numeric"):
        mutual_information(np.array(["a", "b"] * 200), y, "gaussian")
    # integer / bool data in the continuous estimators are read as floats (same answer as floats)
    xi = rng.integers(-5, 6, (400, 1))
    yi = xi + rng.integers(-2, 3, (400, 1))
    for method in ("gaussian", "gcmi", "ksg"):
        assert mutual_information(xi, yi, method) == pytest.approx(
            mutual_information(xi.astype(float), yi.astype(float), method), abs=1e-12)
    assert mutual_information(torch.from_numpy(xi), torch.from_numpy(yi), "gaussian") == pytest.approx(
        mutual_information(xi, yi, "gaussian"), abs=1e-12)


def test_gaussian_estimators_need_more_samples_than_dimensions():
    rng = np.random.default_rng(20)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 3))
    with pytest.raises(InputError, match="more samples than joint dimensions.*n=6.*6 dimensions"):
        mutual_information(x, y, "gaussian")
    assert math.isfinite(mutual_information(x[:, :2], y[:, :2], "gaussian"))


def test_ledoit_wolf_covariance_is_sklearns():
    from sklearn.covariance import ledoit_wolf

    from skipit_core.information import ledoit_wolf_covariance

    x = np.random.default_rng(21).standard_normal((200, 6)) @ np.diag([1, 2, 3, 4, 5, 6.0])
    cov, shrink = ledoit_wolf_covariance(x)
    ref_cov, ref_shrink = ledoit_wolf(x)
    assert np.allclose(cov, ref_cov, atol=1e-14) and shrink == pytest.approx(ref_shrink, abs=1e-14)


def test_shuffle_and_bootstrap_are_scipys_resampling():
    from scipy import stats

    rng = np.random.default_rng(22)
    x = rng.standard_normal(60)
    y = 0.3 * x + rng.standard_normal(60)
    corr = lambda a, b: float(np.corrcoef(a, b)[0, 1])  # noqa: E731
    res = shuffle_baseline(corr, x, y, n_shuffles=199, seed=4)
    ref = stats.permutation_test((x, y), corr, permutation_type="pairings", n_resamples=199,
                                 alternative="greater", vectorized=False, rng=np.random.default_rng(4))
    assert res.p_value == pytest.approx(ref.pvalue, abs=0.05)  # other draws, same test
    assert res.p_value == pytest.approx((1 + np.sum(res.null >= res.observed)) / 200)
    # n! <= n_shuffles: SciPy enumerates every pairing (exact test)
    small = shuffle_baseline(corr, x[:4], y[:4], n_shuffles=100)
    assert small.null.shape == (24,)
    ci = bootstrap_ci(np.mean, x, n_boot=300, seed=5)
    assert (ci.low, ci.high) == pytest.approx(tuple(np.quantile(ci.samples, [0.025, 0.975])), abs=1e-12)
    pairs = bootstrap_ci(corr, x, y, n_boot=50, seed=6)  # rows resampled as pairs
    assert pairs.samples.shape == (50,) and np.all(np.abs(pairs.samples) <= 1)


def test_ragged_inputs_and_estimators_that_return_no_number():
    with pytest.raises(InputError, match="one shape"):
        entropy([[1.0, 2.0], [3.0]], "gaussian")
    rng = np.random.default_rng(23)
    v = rng.standard_normal(50)
    with pytest.raises(InputError, match="estimator must return one number"):
        bootstrap_ci(lambda a: a[:2], v, n_boot=5)
    with pytest.raises(NumericalError, match="on the data itself"):
        shuffle_baseline(lambda a, b: float("nan"), v, v, n_shuffles=5)
    # an estimator undefined on some resamples (a constant resample) is reported, not averaged away
    few = np.array([0.0] * 9 + [1.0])
    with pytest.raises(NumericalError, match="NaN/inf on"), np.errstate(all="ignore"):
        bootstrap_ci(lambda a: 1.0 / a.std(), few, n_boot=200)
    # custom estimators may resample any dtype, e.g. answers as strings
    answers = np.array(["a", "b", "a", "a"] * 10)
    ci = bootstrap_ci(lambda p, g: float(np.mean(p == g)), answers, np.array(["a"] * 40), n_boot=50)
    assert ci.estimate == pytest.approx(0.75) and 0.5 <= ci.low <= ci.high <= 1.0


def test_resample_counts_and_seeds_have_upper_limits():
    v = np.arange(20.0)
    with pytest.raises(InputError, match="n_shuffles .*at most 10000000"):
        shuffle_baseline(lambda a, b: 0.0, v, v, n_shuffles=10**30)  # hung before
    with pytest.raises(InputError, match="n_boot .*at most"):
        bootstrap_ci(np.mean, v, n_boot=10**8)
    with pytest.raises(InputError, match="seed must be at most 4294967295"):
        quantize(v[:, None], 2, seed=2**40)  # scikit-learn's limit: a raw InvalidParameterError before
