"""Why stats.clopper_pearson / stats.wilson_interval stay closed forms instead of scipy's binomtest.

Run:  .venv/bin/python benchmarks/intervals.py

``scipy.stats.binomtest(k, n).proportion_ci(method="exact" | "wilson")`` gives the same intervals
(tests/test_stats.py checks every k at several n to 1e-9) but takes one scalar count per call.
skipit_core calls these intervals on arrays: ``band._tail_uppers`` bounds every (layer, eps) cell of a
profile at once, ``[L, E]`` = 32 x 26 for a 32-layer model on the default grid. This script times one
such array through the closed forms (``scipy.stats.beta.ppf`` / ``scipy.stats.norm.ppf``, vectorised)
and through a loop of ``binomtest`` calls, and checks that the numbers agree.
"""

from __future__ import annotations

import datetime
import platform
import time

import numpy as np
import scipy
from scipy import stats

from skipit_core.stats import clopper_pearson, wilson_interval


def _best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    rng = np.random.default_rng(0)
    n = np.full((32, 26), 500)
    k = rng.integers(0, 501, n.shape)
    conf = 0.95

    def loop(method: str, alternative: str):
        out = np.empty(k.shape + (2,))
        for idx in np.ndindex(k.shape):
            ci = stats.binomtest(int(k[idx]), int(n[idx]), alternative=alternative).proportion_ci(conf, method=method)
            out[idx] = ci.low, ci.high
        return out

    rows = []
    for label, ours, ref in [
        ("Clopper-Pearson, upper (band)", lambda: clopper_pearson(k, n, conf, side="upper"),
         lambda: loop("exact", "less")),
        ("Clopper-Pearson, two-sided", lambda: clopper_pearson(k, n, conf), lambda: loop("exact", "two-sided")),
        ("Wilson, two-sided", lambda: wilson_interval(k, n, conf), lambda: loop("wilson", "two-sided")),
    ]:
        t_ours, t_ref = _best(ours), _best(ref, repeats=1)
        diff = np.abs(np.stack(ours(), -1) - ref()).max()
        rows.append((label, t_ours, t_ref, diff))
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"scipy {scipy.__version__}; k, n arrays of shape {k.shape}")
    print(f"{'interval':32s} {'closed form (s)':>16s} {'binomtest loop (s)':>19s} {'ratio':>8s} {'max |diff|':>11s}")
    for label, t_ours, t_ref, diff in rows:
        print(f"{label:32s} {t_ours:16.5f} {t_ref:19.3f} {t_ref / t_ours:8.0f} {diff:11.1e}")


if __name__ == "__main__":
    main()
