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
    conditional_mutual_information,
    entropy,
    entropy_from_pmf,
    ksg_backend,
    mutual_information,
    mutual_information_from_table,
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
