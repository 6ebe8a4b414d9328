"""Partial information decomposition: canonical gates, an independent solver, Gaussian MMI."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize
from threadpoolctl import threadpool_info, threadpool_limits

from skipit_core.errors import InputError, NumericalError, SkipitError
from skipit_core.information import PIDResult, _single_thread_blas, mutual_information_from_table, pid, pid_from_table

H_QUARTER = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))  # h(1/4) = 0.8113 bits


def gate_table(f, n1: int = 2, n2: int = 2) -> np.ndarray:
    """p[x1, x2, y] for uniform independent inputs and y = f(x1, x2)."""
    ys = {f(a, b) for a in range(n1) for b in range(n2)}
    p = np.zeros((n1, n2, max(ys) + 1))
    for a in range(n1):
        for b in range(n2):
            p[a, b, f(a, b)] += 1.0 / (n1 * n2)
    return p


def atoms(r: PIDResult) -> tuple[float, float, float, float]:
    return r.redundancy, r.unique_1, r.unique_2, r.synergy


@pytest.mark.parametrize(
    "name, f, expected",
    [
        ("xor", lambda a, b: a ^ b, (0.0, 0.0, 0.0, 1.0)),
        ("and", lambda a, b: a & b, (H_QUARTER - 0.5, 0.0, 0.0, 0.5)),
        ("unq", lambda a, b: a, (0.0, 1.0, 0.0, 0.0)),
        ("copy", lambda a, b: 2 * a + b, (0.0, 1.0, 1.0, 0.0)),
    ],
)
def test_broja_canonical_gates(name, f, expected):
    r = pid_from_table(gate_table(f))
    assert atoms(r) == pytest.approx(expected, abs=1e-5), name
    assert sum(atoms(r)) == pytest.approx(r.joint, abs=1e-12)


def test_rdn_redundancy_is_one_bit():
    p = np.zeros((2, 2, 2))
    p[0, 0, 0] = p[1, 1, 1] = 0.5  # one bit copied to both sources and the target
    for method in ("broja", "mmi"):
        assert atoms(pid_from_table(p, method)) == pytest.approx((1.0, 0.0, 0.0, 0.0), abs=1e-6)


def test_mmi_gates_and_where_it_differs_from_broja():
    assert atoms(pid_from_table(gate_table(lambda a, b: a ^ b), "mmi")) == pytest.approx((0, 0, 0, 1), abs=1e-12)
    assert atoms(pid_from_table(gate_table(lambda a, b: a & b), "mmi")) == pytest.approx(
        (H_QUARTER - 0.5, 0, 0, 0.5), abs=1e-12)
    # COPY: MMI calls the two independent bits "redundant + synergistic", BROJA "unique" (known)
    r = pid_from_table(gate_table(lambda a, b: 2 * a + b), "mmi")
    assert atoms(r) == pytest.approx((1.0, 0.0, 0.0, 1.0), abs=1e-12)


def test_pid_from_samples_matches_table():
    x1, x2 = np.meshgrid([0, 1], [0, 1], indexing="ij")
    x1, x2 = np.tile(x1.ravel(), 50), np.tile(x2.ravel(), 50)  # the XOR table realised exactly
    r = pid(x1, x2, x1 ^ x2)
    assert atoms(r) == pytest.approx((0, 0, 0, 1), abs=1e-5)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, 4000), rng.integers(0, 2, 4000)
    r = pid(a, b, a & b, method="broja")
    assert r.redundancy == pytest.approx(H_QUARTER - 0.5, abs=0.03)
    assert r.synergy == pytest.approx(0.5, abs=0.03)
    assert "synergy" in repr(r) and "broja" in repr(r)


def _broja_reference(p: np.ndarray) -> float:
    """min_Q I_Q(Y; X1, X2) over Delta_P by plain SLSQP on the full table (independent solver)."""
    a, b, py = p.sum(1), p.sum(0), p.sum((0, 1))
    mask = (a[:, None, :] > 0) & (b[None, :, :] > 0)
    m = int(mask.sum())

    def table(v):
        q = np.zeros(p.shape)
        q[mask] = v
        return q

    def objective(v):
        q = np.maximum(table(v), 1e-300)
        qx = q.sum(2, keepdims=True)
        val = np.sum(table(v) * np.log2(q / (qx * py)))
        grad = np.log2(q / (qx * py))[mask]
        return val, grad

    # (x1, y) and (x2, y) marginals; one (x2, y) row per y is implied by the others and is dropped,
    # since SLSQP fails on linearly dependent equality constraints
    cons = [{"type": "eq", "fun": lambda v: (table(v).sum(1) - a).ravel()},
            {"type": "eq", "fun": lambda v: (table(v).sum(0) - b)[:-1].ravel()}]
    q0 = (a[:, None, :] * b[None, :, :] / np.where(py > 0, py, 1))[mask]
    with threadpool_limits(1, user_api="blas"):  # tiny problems: BLAS threads only add contention
        res = optimize.minimize(objective, q0, jac=True, method="SLSQP", bounds=[(0, 1)] * m,
                                constraints=cons, options={"ftol": 1e-14, "maxiter": 2000})
    assert res.success, res.message
    return float(res.fun)


def test_broja_agrees_with_independent_solver_on_random_tables():
    rng = np.random.default_rng(1)
    for trial in range(12):
        shape = (int(rng.integers(2, 4)), int(rng.integers(2, 4)), int(rng.integers(2, 4)))
        p = rng.dirichlet(np.full(np.prod(shape), rng.choice([0.3, 1.0]))).reshape(shape)
        r = pid_from_table(p)
        i1 = mutual_information_from_table(p.sum(1))
        i2 = mutual_information_from_table(p.sum(0))
        union = r.redundancy + r.unique_1 + r.unique_2
        ref = _broja_reference(p)
        assert union <= ref + 1e-6  # ours is the global minimum
        assert union == pytest.approx(ref, abs=1e-4)
        assert r.redundancy + r.unique_1 == pytest.approx(i1, abs=1e-12)
        assert r.redundancy + r.unique_2 == pytest.approx(i2, abs=1e-12)


def test_broja_atoms_nonnegative_sum_and_symmetry_on_8x8x8():
    rng = np.random.default_rng(2)
    for conc in (0.1, 1.0):
        p = rng.dirichlet(np.full(512, conc)).reshape(8, 8, 8)
        r = pid_from_table(p)
        assert min(atoms(r)) >= 0 and sum(atoms(r)) == pytest.approx(r.joint, abs=1e-12)
        swapped = pid_from_table(p.transpose(1, 0, 2))
        assert swapped.unique_1 == pytest.approx(r.unique_2, abs=1e-6)
        assert swapped.redundancy == pytest.approx(r.redundancy, abs=1e-6)
        mmi = pid_from_table(p, "mmi")
        # BROJA's redundancy never exceeds MMI's (MMI's is the largest possible: min of the two MIs)
        assert r.redundancy <= mmi.redundancy + 1e-9


def test_gaussian_mmi_pid_matches_closed_form():
    rng = np.random.default_rng(3)
    n = 20000
    x1 = rng.standard_normal((n, 3))
    x2 = rng.standard_normal((n, 1))
    w = np.array([1.0, 0.5, 0.0])
    y = x1 @ w + 0.8 * x2[:, 0] + 0.7 * rng.standard_normal(n)
    var1, var2, noise = w @ w, 0.64, 0.49
    total = var1 + var2 + noise
    i1 = 0.5 * math.log2(total / (var2 + noise))
    i2 = 0.5 * math.log2(total / (var1 + noise))
    i12 = 0.5 * math.log2(total / noise)
    r = pid(x1, x2, y, method="gaussian")
    assert r.joint == pytest.approx(i12, abs=0.02)
    assert r.redundancy == pytest.approx(min(i1, i2), abs=0.02)
    assert r.unique_1 == pytest.approx(i1 - min(i1, i2), abs=0.02)
    assert r.unique_2 == pytest.approx(0.0, abs=0.02)
    assert r.synergy == pytest.approx(i12 - max(i1, i2), abs=0.02)
    assert sum(atoms(r)) == pytest.approx(r.joint, abs=1e-12) and min(atoms(r)) >= 0


def test_pid_bad_input():
    with pytest.raises(InputError, match="single value.*target varies"):
        pid([0, 1, 0, 1], [0, 0, 1, 1], [1, 1, 1, 1])
    constant_target = np.zeros((2, 2, 3))
    constant_target[:, :, 1] = 0.25
    with pytest.raises(InputError, match="target varies"):
        pid_from_table(constant_target)
    with pytest.raises(InputError, match="non-negative"):
        pid_from_table(-gate_table(lambda a, b: a ^ b))
    with pytest.raises(InputError, match="3-D table"):
        pid_from_table(np.ones((2, 2)))
    with pytest.raises(InputError, match="choose 'broja', 'mmi' or 'gaussian'"):
        pid([0, 1], [0, 1], [0, 1], method="ccs")
    with pytest.raises(InputError, match="same number of samples"):
        pid([0, 1, 1], [0, 1], [0, 1])
    with pytest.raises(NumericalError, match="NaN"):
        pid(np.array([0.0, np.nan]), [0, 1], [0, 1], method="gaussian")
    with pytest.raises(SkipitError, match="constant"):
        pid(np.ones(10), np.arange(10.0), np.arange(10.0) ** 2, method="gaussian")


def test_single_thread_blas_limits_and_restores_blas_threads():
    """The cached controller still limits every BLAS library to one thread inside, and restores after."""
    def blas_threads():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before = blas_threads()
    for _ in range(2):  # the second use goes through the cached controller
        with _single_thread_blas():
            assert blas_threads() and set(blas_threads()) == {1}
        assert blas_threads() == before
