"""Time and value of skipit_core's estimators next to plain reference implementations.

Run:  .venv/bin/python benchmarks/estimators.py               (the table below)
      .venv/bin/python benchmarks/estimators.py --crossover   (tree vs torch KSG over n and dimension)

Each row measures, in the same run, the library estimator and a reference written for clarity
inside this script (not imported from the library):

- KSG MI, n = 5000, x and y with d = 8 each (joint dimension 16): a brute-force O(n^2) NumPy loop,
  one sample at a time. Both run on the same raw data (``marginals="none"``, ``jitter=0``) so the
  values must be identical; the library's default call (copula marginals + jitter) is timed too.
- Gaussian MI, n = 100000, x and y with d = 64 each: the plain formula
  ``1/2 log2(det S_x det S_y / det S)`` on ``np.cov``. The values differ by the library's log-determinant bias correction (``gaussian_logdet_bias``).
- BROJA PID on a random 8 x 8 x 8 table: a naive alternating-minimisation solver
  (Csiszar & Tusnady 1984) with iterative proportional fitting for the inner I-projection.

Targets (2-core CPU): KSG under 2 s and >= 10x faster than brute force with identical values;
Gaussian MI under 1 s; BROJA 8x8x8 under 2 s.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import sys
import time

import numpy as np
import torch
from scipy.special import digamma, xlogy

from skipit_core.information import ksg_backend, mutual_information, pid_from_table

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------
# reference implementations (clarity over speed)
# ----------------------------------------------------------------------------------------------

def ksg_reference(x: np.ndarray, y: np.ndarray, k: int = 3) -> float:
    """Kraskov et al. (2004) algorithm 1, max-norm, brute force: one sample at a time."""
    n = len(x)
    nx, ny = np.empty(n), np.empty(n)
    for i in range(n):
        dx = np.abs(x - x[i]).max(axis=1)
        dy = np.abs(y - y[i]).max(axis=1)
        dz = np.maximum(dx, dy)
        dz[i] = np.inf  # exclude the point itself
        eps = np.partition(dz, k - 1)[k - 1]  # distance to the k-th neighbour
        nx[i] = np.count_nonzero(dx < eps) - 1
        ny[i] = np.count_nonzero(dy < eps) - 1
    return float((digamma(k) + digamma(n) - np.mean(digamma(nx + 1) + digamma(ny + 1))) / LN2)


def gaussian_mi_reference(x: np.ndarray, y: np.ndarray) -> float:
    """1/2 log2(det S_x det S_y / det S) with the sample covariance."""
    s = np.cov(np.hstack([x, y]), rowvar=False)
    dx = x.shape[1]
    logdet = lambda m: np.linalg.slogdet(m)[1]  # noqa: E731
    return 0.5 * (logdet(s[:dx, :dx]) + logdet(s[dx:, dx:]) - logdet(s)) / LN2


def entropy_bits(p: np.ndarray) -> float:
    return float(-xlogy(p, p).sum() / LN2)


def broja_union_reference(p: np.ndarray, outer: int = 20000, inner: int = 50, tol: float = 1e-11) -> float:
    """min over Q in Delta_P of I_Q(Y; X1, X2) by alternating minimisation (bits).

    I_Q(Y; X1X2) = min_r D(Q || r(x1, x2) p(y)); alternate r = Q(x1, x2) and the I-projection of
    r(x1, x2) p(y) onto Delta_P, computed by iterative proportional fitting of the two marginals.
    """
    a, b, py = p.sum(1), p.sum(0), p.sum((0, 1))
    q = a[:, None, :] * b[None, :, :] / py  # a point of Delta_P
    prev = np.inf
    for _ in range(outer):
        q = q.sum(2, keepdims=True) * py  # r(x1, x2) p(y)
        for _ in range(inner):
            q *= np.divide(a, q.sum(1), out=np.zeros_like(a), where=q.sum(1) > 0)[:, None, :]
            q *= np.divide(b, q.sum(0), out=np.zeros_like(b), where=q.sum(0) > 0)[None, :, :]
        value = (entropy_bits(q.sum(2)) + entropy_bits(py) - entropy_bits(q))  # I = H(X1X2) + H(Y) - H(X1X2Y)
        if prev - value < tol:
            break
        prev = value
    return value


# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------

def timed(fn, repeats: int = 1):
    """(best wall time, CPU time of that call, value) over ``repeats`` calls.

    The CPU time (this process, all threads) is reported too because the machine is shared: wall
    times grow with other people's load, CPU times much less so.
    """
    best, cpu, value = math.inf, math.inf, None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        value = fn()
        wall = time.perf_counter() - t0
        if wall < best:
            best, cpu = wall, time.process_time() - c0
    return (best, cpu), value


def machine() -> str:
    model = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{model}, {os.cpu_count()} cores, load {load:.1f}; Python {platform.python_version()}, "
            f"numpy {np.__version__}, torch {torch.__version__}, torch threads {torch.get_num_threads()}; "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")


def bench_ksg(rows: list) -> None:
    rng = np.random.default_rng(0)
    n, d = 5000, 8
    x = rng.standard_normal((n, d))
    y = 0.6 * x + 0.8 * rng.standard_normal((n, d))
    t_ours, v_ours = timed(lambda: mutual_information(x, y, "ksg", marginals="none", jitter=0.0), 3)
    t_ref, v_ref = timed(lambda: ksg_reference(x, y))
    rows.append((f"KSG MI ({ksg_backend(n, 2 * d)})", f"n={n}, dx=dy={d}", t_ours, v_ours,
                 "brute-force NumPy loop", t_ref, v_ref))
    t_def, v_def = timed(lambda: mutual_information(x, y, "ksg"), 3)
    rows.append(("KSG MI default (copula, jitter)", f"n={n}, dx=dy={d}", t_def, v_def, "-", (math.nan,) * 2,
                 math.nan))
    other = "tree" if ksg_backend(n, 2 * d) == "torch" else "torch"
    t_alt, v_alt = timed(lambda: mutual_information(x, y, "ksg", marginals="none", jitter=0.0, backend=other), 3)
    rows.append((f"KSG MI ({other} forced)", f"n={n}, dx=dy={d}", t_alt, v_alt, "brute-force NumPy loop",
                 t_ref, v_ref))


def ksg_crossover() -> None:
    """Wall time of both KSG backends over n and joint dimension: the data behind ``ksg_backend``."""
    rng = np.random.default_rng(3)
    warm = rng.standard_normal((200, 2))
    for b in ("tree", "torch"):  # imports and first-call set-up stay out of the table
        mutual_information(warm[:, :1], warm[:, 1:], "ksg", backend=b)
    print("| n | joint dim | tree s | torch s | faster | rule picks |")
    print("|---|---|---|---|---|---|")
    for joint in (4, 8, 10, 12, 16, 32):
        for n in (1000, 3000, 10000, 20000):
            x = rng.standard_normal((n, joint // 2))
            y = 0.6 * x + 0.8 * rng.standard_normal(x.shape)
            t = {b: timed(lambda: mutual_information(x, y, "ksg", marginals="none", jitter=0.0, backend=b))[0][0]
                 for b in ("tree", "torch")}
            print(f"| {n} | {joint} | {t['tree']:.3f} | {t['torch']:.3f} | {min(t, key=t.get)} "
                  f"| {ksg_backend(n, joint)} |", flush=True)


def bench_gaussian(rows: list) -> None:
    rng = np.random.default_rng(1)
    n, d = 100_000, 64
    x = rng.standard_normal((n, d))
    y = 0.3 * x @ rng.standard_normal((d, d)) / math.sqrt(d) + rng.standard_normal((n, d))
    t_ours, v_ours = timed(lambda: mutual_information(x, y, "gaussian"), 3)
    t_ref, v_ref = timed(lambda: gaussian_mi_reference(x, y), 3)
    rows.append(("Gaussian MI (bias-corrected)", f"n={n}, dx=dy={d}", t_ours, v_ours, "np.cov + slogdet", t_ref, v_ref))
    t_gc, v_gc = timed(lambda: mutual_information(x, y, "gcmi"))
    rows.append(("GCMI", f"n={n}, dx=dy={d}", t_gc, v_gc, "np.cov + slogdet", t_ref, v_ref))


def bench_broja(rows: list) -> None:
    rng = np.random.default_rng(2)
    for conc in (1.0, 0.1):
        p = rng.dirichlet(np.full(512, conc)).reshape(8, 8, 8)
        t_ours, res = timed(lambda: pid_from_table(p), 3)
        v_ours = res.redundancy + res.unique_1 + res.unique_2  # min_Q I_Q(Y; X1, X2)
        t_ref, v_ref = timed(lambda: broja_union_reference(p))
        rows.append((f"BROJA min I_Q (Dirichlet {conc})", "8x8x8", t_ours, v_ours,
                     "alternating minimisation + IPF", t_ref, v_ref))


def main() -> None:
    print(machine())
    if "--crossover" in sys.argv:
        ksg_crossover()
        return
    rows: list = []
    bench_ksg(rows)
    bench_gaussian(rows)
    bench_broja(rows)
    head = (f"| {'estimator':32} | {'size':18} | {'ours wall s':>11} | {'ours cpu s':>10} | {'value (bits)':>12} "
            f"| {'reference':30} | {'ref wall s':>10} | {'ref cpu s':>9} | {'ref value':>10} | {'|diff|':>7} "
            f"| {'wall ratio':>10} | {'cpu ratio':>9} |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for name, size, (t, c), v, ref, (tr, cr), vr in rows:
        diff = abs(v - vr) if not math.isnan(vr) else math.nan
        print(f"| {name:32} | {size:18} | {t:11.3f} | {c:10.3f} | {v:12.6f} | {ref:30} | {tr:10.3f} | {cr:9.3f} "
              f"| {vr:10.6f} | {diff:7.1e} | {tr / t:9.1f}x | {cr / c:8.1f}x |")


if __name__ == "__main__":
    main()
