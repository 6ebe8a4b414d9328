"""Information-theoretic estimators, in bits: entropy, mutual information, conditional MI and PID.

Every estimator takes NumPy arrays or torch tensors of shape ``(n,)`` or ``(n, d)`` (rows are
samples) and returns bits. Four methods, chosen with ``method=``:

``"discrete"``
    Plug-in estimate with the Miller-Madow bias correction (Miller 1955): for a sample of ``n``
    symbols with ``m`` distinct observed values, ``H_MM = -sum_s p_s log2 p_s + (m - 1) / (2 n ln 2)``.
    The rows of an ``(n, d)`` array are joint symbols. MI and CMI are sums of corrected entropies.
``"gaussian"``
    Closed form for jointly Gaussian variables, ``I(X;Y) = 1/2 log2(det S_x det S_y / det S)``, from
    the plug-in covariance ``S`` with the analytic bias correction of every log-determinant
    (Ince et al. 2017; see :func:`gaussian_logdet_bias`): unbiased for Gaussian data.
``"gcmi"``
    Gaussian-copula MI (Ince et al. 2017): each column is replaced by ``Phi^{-1}(rank / (n + 1))``,
    then the bias-corrected Gaussian formula is applied. Invariant under strictly monotone maps of
    each column; a lower bound on the true MI when the dependence is not a Gaussian copula.
``"ksg"``
    k-nearest-neighbour estimators in the max-norm: Kraskov, Stoegbauer & Grassberger (2004)
    algorithm 1 for MI, Frenzel & Pompe (2007) for CMI, Kozachenko & Leonenko (1987) for entropy;
    by default on copula-normalised columns, so also invariant under monotone maps.

Each docstring states the estimator's measured bias; ``tests/test_information.py`` checks it.

Input rules, the same for every estimator (each violation raises :class:`InputError` or
:class:`NumericalError` saying what to do): rows are samples, so a 2-D input to an entropy, MI,
CMI or PID estimator with more columns than rows (e.g. 5 x 500) is taken to be transposed and
rejected (pass ``x.T``; to estimate from fewer samples than dimensions, reduce the dimension
first, e.g. with PCA, or for discrete codes pass one symbol per row,
``np.unique(x, axis=0, return_inverse=True)[1]``). :func:`quantize`, :func:`copula_normalize`,
:func:`ledoit_wolf_covariance` and the resampling helpers, well defined for ``d > n``, accept it. Paired inputs need the
same number of rows, at least 2. Floats must be finite. Counts such as ``k``, ``n_codes``,
``n_boot`` and ``n_shuffles`` must be integer-like (``int``, ``np.int64``, a 0-d integer tensor;
not ``True``, not ``3.0``). Torch tensors keep their precision (float64 stays float64; float16 and
bfloat16 are upcast to float32, exactly); integer and bool inputs to the continuous estimators are
read as floats.

Quantisation (:func:`quantize`) turns hidden states into k-means codes so that the discrete
theorems (T3, T4 of docs/THEORY.md) apply; :func:`shuffle_baseline` (``scipy.stats.permutation_test``)
and :func:`bootstrap_ci` (``scipy.stats.bootstrap``) put any estimator next to a permutation null
and a bootstrap interval. :func:`pid` and
:func:`pid_from_table` give partial information decompositions (Williams & Beer 2010):
BROJA (Bertschinger, Rauh, Olbrich, Jost & Ay 2014), MMI, and Gaussian MMI (Barrett 2015).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from scipy import linalg as sla
from scipy import sparse
from scipy import stats as sps
from scipy.special import digamma, ndtri
from scipy.stats import rankdata
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.covariance import ledoit_wolf
from sklearn.neighbors import KDTree

from .errors import InputError, NumericalError
from .utils import as_int, as_numpy, as_probability_level, check_finite

__all__ = [
    "METHODS",
    "KSG_MARGINALS",
    "entropy",
    "conditional_entropy",
    "mutual_information",
    "conditional_mutual_information",
    "entropy_from_pmf",
    "mutual_information_from_table",
    "conditional_entropy_from_table",
    "ledoit_wolf_covariance",
    "gaussian_logdet_bias",
    "copula_normalize",
    "ksg_backend",
    "quantize",
    "ShuffleResult",
    "shuffle_baseline",
    "BootstrapCI",
    "bootstrap_ci",
    "PIDResult",
    "pid",
    "pid_from_table",
]

METHODS = ("discrete", "gaussian", "gcmi", "ksg")
LN2 = math.log(2.0)

# KSG backend rule (measured 2026-12-01 on a 2-core AMD EPYC, n = 1000-20000, joint dimension 4-32, see
# benchmarks/README.md): a Chebyshev KD-tree (scikit-learn, which counts neighbours within a radius
# without listing them) wins up to a joint dimension of 8 at every n >= 3000 (n = 10000: 0.81 s vs
# 0.92 s at dimension 8); the two tie at 10; from 12 on, blocked torch distances win at every n
# (n = 5000, dimension 16: 0.27 s vs 0.91 s; n = 10000, dimension 32: 1.9 s vs 8.2 s).
KSG_TREE_MAX_DIM = 10
_TORCH_BLOCK_ELEMS = 640_000  # rows per block = this // n: 5 MB per float64 distance buffer (fits L3)


# ----------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------

def _samples(x, name: str, discrete: bool = False, estimate: bool = True) -> np.ndarray:
    """Return ``x`` as a 2-D array ``(n, d)`` of samples in rows; floats are checked for NaN/inf.

    With ``estimate`` (the entropy / MI / CMI / PID estimators) a 2-D input with more columns than
    rows is rejected as (probably) transposed: an information estimate needs more samples than
    dimensions (the Gaussian ones are undefined otherwise, KSG and the plug-in say nothing), and a
    5 x 500 array is far more often 500 samples given as columns. Transforms and fits that are
    well defined for ``d > n`` (:func:`quantize`, :func:`copula_normalize`,
    :func:`ledoit_wolf_covariance`, made for ``d > n``) pass ``estimate=False``.
    """
    arr = as_numpy(x, name, dtype=None if discrete else np.float64)
    if arr.dtype.kind in "fc":
        check_finite(arr, name)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise InputError(f"{name} must have shape (n,) or (n, d); got shape {arr.shape}. "
                         "Flatten the feature axes first, e.g. x.reshape(n, -1).")
    if arr.shape[0] < 2 or arr.shape[1] < 1:
        raise InputError(f"{name} has shape {arr.shape}; need at least 2 samples (rows) and 1 column.")
    if estimate and arr.shape[1] > arr.shape[0]:
        raise InputError(f"{name} has shape {arr.shape}: more columns than rows. Rows must be samples; if "
                         f"these are {arr.shape[1]} samples of dimension {arr.shape[0]}, pass {name}.T. "
                         "With fewer samples than dimensions, reduce the dimension first (e.g. PCA), or "
                         "for discrete codes pass one symbol per row: np.unique(x, axis=0, return_inverse=True)[1].")
    if discrete and arr.dtype.kind not in "biuf":
        raise InputError(f"{name} must hold numeric symbols (got dtype {arr.dtype}); "
                         "encode labels as integers first, e.g. with np.unique(..., return_inverse=True).")
    return arr


def _paired_rows(arrays: Sequence, names: Sequence[str]) -> tuple[list[np.ndarray], int]:
    """Arrays (any dtype and shape, first axis = samples) for the resampling helpers, and their common length.

    No orientation rule here: a custom estimator may well take 40 states of width 4096; the
    estimators of this module check their own inputs when the estimator calls them.
    """
    arrs = [as_numpy(a, nm, dtype=None, numeric=False) for a, nm in zip(arrays, names)]
    for a, nm in zip(arrs, names):
        if a.ndim == 0:
            raise InputError(f"{nm} is a scalar; pass one value (or row) per sample.")
        if a.dtype.kind in "fc":
            check_finite(a, nm)
    n = _same_length(**dict(zip(names, arrs)))
    if n < 2:
        raise InputError(f"need at least 2 samples (rows) to resample; got {n}.")
    return arrs, n


def _same_length(**arrays: np.ndarray) -> int:
    lengths = {k: a.shape[0] for k, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise InputError(f"the inputs must have the same number of samples (rows); got {lengths}. "
                         "Pair the samples row by row before estimating.")
    return next(iter(lengths.values()))


def _check_method(method: str) -> None:
    if not isinstance(method, str) or method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {METHODS}.")


def _check_flag(value, name: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be True or False; got {value!r}.")


def _check_k(k) -> int:
    return as_int(k, "k", minimum=1, what="number of nearest neighbours")


def _check_jitter(jitter) -> float:
    j = float(jitter) if isinstance(jitter, (int, float, np.floating, np.integer)) and not isinstance(
        jitter, (bool, np.bool_)) else None
    if j is None or not math.isfinite(j) or j < 0:
        raise InputError(f"jitter must be a finite number >= 0 (the tie-breaking noise in column standard "
                         f"deviations, default 1e-10; 0 turns it off); got {jitter!r}.")
    return j


def _check_not_constant(arr: np.ndarray, name: str) -> None:
    const = np.flatnonzero(np.ptp(arr, axis=0) == 0)
    if const.size:
        raise InputError(f"{name} has constant column(s) {const.tolist()[:10]}: they carry no information "
                         "and make the covariance / neighbour distances degenerate. Drop them "
                         "(e.g. x[:, x.std(0) > 0]) or use method='discrete'.")


def _standardize(arr: np.ndarray) -> np.ndarray:
    return (arr - arr.mean(0)) / arr.std(0)


# ----------------------------------------------------------------------------------------------
# discrete (plug-in + Miller-Madow)
# ----------------------------------------------------------------------------------------------

def _symbols(*arrays: np.ndarray) -> np.ndarray:
    """Integer code per row of the column-wise concatenation of ``arrays`` (rows = joint symbols)."""
    return np.unique(np.concatenate(arrays, axis=1), axis=0, return_inverse=True)[1].ravel()


def _entropy_of_codes(codes: np.ndarray, miller_madow: bool) -> float:
    counts = np.bincount(codes)
    counts = counts[counts > 0]
    n = counts.sum()
    p = counts / n
    h = float(-(p * np.log2(p)).sum())
    if miller_madow:
        h += (counts.size - 1) / (2.0 * n * LN2)
    return h


def _require_two_values(arr: np.ndarray, name: str) -> None:
    if np.unique(arr, axis=0).shape[0] < 2:
        raise InputError(f"{name} takes a single distinct value, so any mutual information with it is 0 "
                         "and the estimate says nothing; check the quantisation (use more codes) or "
                         "drop this variable.")


def entropy_from_pmf(p) -> float:
    """Shannon entropy ``H(p) = -sum_s p_s log2 p_s`` (bits) of a probability table of any shape.

    ``p`` must be non-negative; it is normalised to sum to 1 (zero cells contribute 0).
    """
    arr = _pmf(p, "p")
    nz = arr[arr > 0]
    return float(-(nz * np.log2(nz)).sum())


def _pmf(p, name: str) -> np.ndarray:
    arr = check_finite(as_numpy(p, name), name)
    if np.any(arr < 0):
        raise InputError(f"{name} has negative entries; a probability table must be non-negative.")
    total = arr.sum()
    if total <= 0:
        raise InputError(f"{name} sums to {total}; pass counts or probabilities with a positive total.")
    return arr / total


def mutual_information_from_table(p_xy) -> float:
    """Exact ``I(X;Y) = H(X) + H(Y) - H(X,Y)`` (bits) of a 2-D joint table ``p[x, y]``."""
    p = _pmf(p_xy, "p_xy")
    if p.ndim != 2:
        raise InputError(f"p_xy must be a 2-D table p[x, y]; got shape {p.shape}. "
                         "Reshape multi-axis variables into one axis first.")
    return entropy_from_pmf(p.sum(1)) + entropy_from_pmf(p.sum(0)) - entropy_from_pmf(p)


def conditional_entropy_from_table(p_ab) -> float:
    """Exact ``H(A|B) = H(A,B) - H(B)`` (bits) of a 2-D joint table ``p[a, b]`` (first axis given second)."""
    p = _pmf(p_ab, "p_ab")
    if p.ndim != 2:
        raise InputError(f"p_ab must be a 2-D table p[a, b]; got shape {p.shape}.")
    return entropy_from_pmf(p) - entropy_from_pmf(p.sum(0))


# ----------------------------------------------------------------------------------------------
# Gaussian and Gaussian copula
# ----------------------------------------------------------------------------------------------

def ledoit_wolf_covariance(x) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf shrinkage covariance of the rows of ``x`` (Ledoit & Wolf 2004, J. Multivariate Anal.).

    With centred data ``X`` (n x p), ``S = X^T X / n``, ``mu = tr(S) / p``, the estimate is
    ``(1 - s) S + s mu I`` with shrinkage ``s = min(1, b^2 / d^2)``, ``d^2 = ||S - mu I||_F^2`` and
    ``b^2 = (1/n^2) sum_i ||x_i x_i^T - S||_F^2``. Returns ``(covariance, s)``, computed by
    ``sklearn.covariance.ledoit_wolf``. The estimators of this module no longer use it (see
    :func:`gaussian_logdet_bias` for why); it stays for callers who want a well-conditioned covariance.
    """
    cov, shrink = ledoit_wolf(_samples(x, "x", estimate=False))
    return np.asarray(cov, dtype=np.float64), float(shrink)


def gaussian_logdet_bias(n: int, d: int) -> float:
    """``E[ln det S] - ln det Sigma`` (nats) for the unbiased sample covariance ``S`` of ``n`` Gaussian rows in ``R^d``.

    ``(n - 1) S`` is Wishart with ``n - 1`` degrees of freedom and scale ``Sigma``, whose expected
    log-determinant is ``ln det Sigma + d ln 2 + sum_{j=1}^{d} psi((n - j) / 2)`` (e.g. Bishop 2006,
    *Pattern Recognition and Machine Learning*, appendix B, Wishart). Dividing by ``n - 1``:

        ``E ln det S - ln det Sigma = sum_{j=1}^{d} psi((n - j) / 2) - d ln((n - 1) / 2)``  (< 0).

    Subtracting it from ``ln det S`` gives an unbiased estimate of ``ln det Sigma``; this is the
    bias correction of the Gaussian entropy in Ince et al. 2017 (Hum. Brain Mapp. 38:1541,
    "A statistical framework for neuroimaging data analysis based on mutual information estimated
    via a Gaussian copula"), ``H = 1/2 ln det(2 pi e S) - 1/2 sum_j psi((n - j)/2) + d/2 ln((n - 1)/2)``.
    Every Gaussian entropy, MI and CMI here uses it, so their log-determinant terms are unbiased.
    Needs ``n > d``.
    """
    n, d = as_int(n, "n", minimum=2), as_int(d, "d", minimum=0)
    if n <= d:
        raise InputError(f"the covariance of n={n} samples in d={d} dimensions is singular; need n > d "
                         "(more samples, or reduce the dimension, e.g. with PCA).")
    j = np.arange(1, d + 1)
    return float(digamma((n - j) / 2.0).sum() - d * math.log((n - 1) / 2.0))


def copula_normalize(x) -> np.ndarray:
    """Gaussian-copula transform per column: ``Phi^{-1}(r / (n + 1))`` with ``r`` the (average) rank.

    The result has standard-normal marginals and the same copula as ``x`` (Ince et al. 2017).
    """
    cols = np.ascontiguousarray(_samples(x, "x", estimate=False).T)  # one contiguous row per column: fast sorts
    n = cols.shape[1]
    order = np.argsort(cols, axis=1)
    ranks = np.empty(cols.shape)
    np.put_along_axis(ranks, order, np.arange(1.0, n + 1.0)[None, :], axis=1)
    tied = np.flatnonzero((np.diff(np.take_along_axis(cols, order, axis=1), axis=1) == 0).any(axis=1))
    if tied.size:  # average ranks where values repeat (ordinal ranks would depend on row order)
        ranks[tied] = rankdata(cols[tied], axis=1, method="average")
    return ndtri(ranks / (n + 1.0)).T


def _logdet(cov: np.ndarray) -> float:
    try:
        with _single_thread_blas():  # small matrix: BLAS threads only add contention
            chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError as exc:
        raise NumericalError("covariance is not positive definite (collinear columns?); drop duplicated "
                             "or linearly dependent columns, or reduce with PCA first.") from exc
    return 2.0 * float(np.log(np.diag(chol)).sum())


def _gaussian_info(cov: np.ndarray, n: int, *blocks: Sequence[int]) -> float:
    """Bias-corrected Gaussian total correlation between index blocks, bits:

    ``1/2 (sum_b [ln det S_b - beta(n, |b|)] - [ln det S_all - beta(n, sum_b |b|)]) / ln 2`` with
    ``beta`` = :func:`gaussian_logdet_bias`; ``cov`` is the plug-in correlation matrix of the samples.
    """
    idx = np.concatenate([np.asarray(b, dtype=int) for b in blocks])
    parts = sum(_logdet(cov[np.ix_(b, b)]) - gaussian_logdet_bias(n, len(b)) for b in blocks)
    joint = _logdet(cov[np.ix_(idx, idx)]) - gaussian_logdet_bias(n, idx.size)
    return 0.5 * (parts - joint) / LN2


def _centred_tensor(arr: np.ndarray) -> torch.Tensor:
    """Column-centred float64 tensor. The data-sized products below run in torch: its BLAS keeps its
    speed when other processes load the CPU, where a multi-threaded OpenBLAS can slow down 30x."""
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))
    return t - t.mean(0)


def _check_gaussian_size(n: int, dim: int) -> None:
    if n <= dim:
        raise InputError(f"the Gaussian estimators need more samples than joint dimensions; got n={n} samples "
                         f"for {dim} dimensions. Use more samples or reduce the dimension (e.g. PCA).")


def _correlation(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plug-in correlation matrix ``R`` of the columns and their unbiased variances (``S = D^1/2 R D^1/2``).

    Working with ``R`` keeps the Cholesky factorisations well scaled; every log-determinant of ``S``
    is ``ln det R + sum ln var``, and in MI and CMI the variances cancel.
    """
    xc = _centred_tensor(arr)
    cov = (xc.T @ xc).numpy() / (arr.shape[0] - 1)
    var = np.diag(cov).copy()
    scale = 1.0 / np.sqrt(var)
    return cov * scale[:, None] * scale[None, :], var


def _gaussianized(arrays: Sequence[np.ndarray], names: Sequence[str], method: str) -> tuple[np.ndarray, list, int]:
    """Plug-in joint correlation matrix of the variables, their index blocks and ``n``.

    Each column is copula-normalised (``gcmi``; ``gaussian`` uses the columns as they are). No
    shrinkage: the analytic correction of :func:`gaussian_logdet_bias` removes the plug-in bias
    exactly for Gaussian data, while shrinking the cross-covariances (Ledoit-Wolf, used before)
    shrinks every canonical correlation and biases the MI down at strong dependence (11.21 bits
    instead of 11.98 at d = 10, n = 1000, rho = 0.9). The estimate is invariant under invertible
    linear maps of each variable (log-determinants of block-linear maps cancel).
    """
    for a, nm in zip(arrays, names):
        _check_not_constant(a, nm)
    n = arrays[0].shape[0]
    bounds = np.cumsum([0] + [a.shape[1] for a in arrays])
    _check_gaussian_size(n, int(bounds[-1]))
    if method == "gcmi":
        arrays = [copula_normalize(a) for a in arrays]
    blocks = [list(range(bounds[i], bounds[i + 1])) for i in range(len(arrays))]
    corr, _ = _correlation(np.concatenate(arrays, axis=1))
    return corr, blocks, n


def _gaussian_entropy(arr: np.ndarray, method: str) -> float:
    """``1/2 [d ln(2 pi e) + ln det S - beta(n, d)] / ln 2`` bits (:func:`gaussian_logdet_bias`)."""
    _check_not_constant(arr, "x")
    n, d = arr.shape
    _check_gaussian_size(n, d)
    data = copula_normalize(arr) if method == "gcmi" else arr
    corr, var = _correlation(data)
    logdet = _logdet(corr) + float(np.log(var).sum())
    return 0.5 * (d * math.log(2 * math.pi * math.e) + logdet - gaussian_logdet_bias(n, d)) / LN2


# ----------------------------------------------------------------------------------------------
# KSG (k nearest neighbours, max-norm)
# ----------------------------------------------------------------------------------------------

def ksg_backend(n: int, joint_dim: int) -> str:
    """The neighbour-search backend the KSG estimators use: ``"tree"`` or ``"torch"``.

    Rule (measured, see ``benchmarks/estimators.py``): a Chebyshev KD-tree
    (``sklearn.neighbors.KDTree``: k-NN query, then radius counts) when the joint dimension is at
    most ``KSG_TREE_MAX_DIM`` = 10, where it prunes well; otherwise blocked all-pairs max-norm
    distances in torch (one coordinate at a time, in place: O(n^2 d) time, O(n) memory per row of a
    block, no tree whose pruning fails in high dimension). Both give identical values.
    ``n`` is accepted for future rules; it does not change the choice today.
    """
    as_int(n, "n", minimum=1, what="number of samples")
    return "tree" if as_int(joint_dim, "joint_dim", minimum=1) <= KSG_TREE_MAX_DIM else "torch"


def _jitter(arrays: Sequence[np.ndarray], scale: float, seed: int) -> list[np.ndarray]:
    """Add ``scale * std(column) * N(0, 1)`` noise (seeded) to break ties, as Kraskov et al. suggest."""
    if scale == 0:
        return list(arrays)
    rng = np.random.default_rng(seed)
    out = []
    for a in arrays:
        sd = a.std(0)
        sd = np.where(sd > 0, sd, 1.0)
        out.append(a + scale * sd * rng.standard_normal(a.shape))
    return out


def _knn_tree(blocks: Sequence[np.ndarray], spaces: Sequence[Sequence[int]], k: int):
    joint = np.concatenate(blocks, axis=1)
    eps = KDTree(joint, metric="chebyshev").query(joint, k=k + 1)[0][:, -1]
    radius = np.nextafter(eps, 0)  # query_radius counts d <= r; we need d < eps
    counts = []
    for sp in spaces:
        sub = np.concatenate([blocks[b] for b in sp], axis=1)
        counts.append(np.asarray(KDTree(sub, metric="chebyshev").query_radius(sub, radius, count_only=True)))
    return eps, counts


def _chebyshev_rows(rows: torch.Tensor, cols_t: torch.Tensor, out: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """``out[i, j] = max_c |rows[i, c] - cols_t[c, j]|``: max-norm distances, one coordinate at a time.

    Working coordinate by coordinate on contiguous (rows x n) buffers, in place, keeps every pass
    vectorised and cache-friendly; it is several times faster than ``torch.cdist(p=inf)``.
    """
    torch.sub(rows[:, :1], cols_t[0], out=out).abs_()
    for c in range(1, cols_t.shape[0]):
        torch.maximum(out, torch.sub(rows[:, c:c + 1], cols_t[c], out=tmp).abs_(), out=out)
    return out


def _knn_torch(blocks: Sequence[np.ndarray], spaces: Sequence[Sequence[int]], k: int):
    rows = [torch.from_numpy(np.ascontiguousarray(b, dtype=np.float64)) for b in blocks]
    cols = [r.T.contiguous() for r in rows]
    n = rows[0].shape[0]
    step = min(n, max(1, _TORCH_BLOCK_ELEMS // n))
    dist = [torch.empty(step, n, dtype=torch.float64) for _ in rows]
    joint, tmp = torch.empty(step, n, dtype=torch.float64), torch.empty(step, n, dtype=torch.float64)
    inside = torch.empty(step, n, dtype=torch.bool)
    eps = np.empty(n)
    counts = [np.empty(n, dtype=np.int64) for _ in spaces]
    for s in range(0, n, step):
        b = min(step, n - s)
        d = [_chebyshev_rows(r[s:s + b], c, buf[:b], tmp[:b]) for r, c, buf in zip(rows, cols, dist)]
        joint_b = d[0] if len(d) == 1 else _max_of(d, joint[:b])
        e = joint_b.topk(k + 1, dim=1, largest=False).values[:, -1:]  # column 0 is the point itself
        eps[s:s + b] = e[:, 0].numpy()
        for c, sp in zip(counts, spaces):
            sub = d[sp[0]] if len(sp) == 1 else _max_of([d[i] for i in sp], tmp[:b])
            c[s:s + b] = torch.lt(sub, e, out=inside[:b]).sum(1, dtype=torch.int32).numpy()
    return eps, counts


def _max_of(tensors: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of several tensors into ``out`` (the max-norm of a product space)."""
    torch.maximum(tensors[0], tensors[1], out=out)
    for t in tensors[2:]:
        torch.maximum(out, t, out=out)
    return out


def _knn(blocks, spaces, k: int, backend: str):
    n = blocks[0].shape[0]
    k = _check_k(k)
    if n < k + 1:
        raise InputError(f"KSG with k={k} needs at least k + 1 = {k + 1} samples; got n={n}. "
                         "Use more samples or a smaller k.")
    dim = sum(b.shape[1] for b in blocks)
    chosen = ksg_backend(n, dim) if backend == "auto" else backend
    if not isinstance(chosen, str) or chosen not in ("tree", "torch"):
        raise InputError(f"backend must be 'auto', 'tree' or 'torch'; got {backend!r}.")
    eps, counts = (_knn_tree if chosen == "tree" else _knn_torch)(blocks, spaces, k)
    if np.any(eps <= 0):
        raise NumericalError(f"{int(np.sum(eps <= 0))} sample(s) have more than k={k} exact duplicates, so "
                             "the k-th neighbour distance is 0; keep the tie-breaking jitter on (jitter > 0) "
                             "or use method='discrete' for discrete data.")
    return eps, counts


KSG_MARGINALS = ("copula", "zscore", "none")


def _ksg_prepare(arrays, names, jitter: float, seed: int, marginals: str):
    """Per-column transform (``marginals``), then seeded tie-breaking jitter."""
    jitter = _check_jitter(jitter)
    seed = as_int(seed, "seed", minimum=0)
    if not isinstance(marginals, str) or marginals not in KSG_MARGINALS:
        raise InputError(f"marginals must be one of {KSG_MARGINALS}; got {marginals!r}.")
    for a, nm in zip(arrays, names):
        _check_not_constant(a, nm)
    if marginals == "copula":
        arrays = [copula_normalize(a) for a in arrays]
    elif marginals == "zscore":
        arrays = [_standardize(a) for a in arrays]
    return _jitter(arrays, jitter, seed)


def _ksg_mi(x, y, k, jitter, seed, backend, marginals) -> float:
    xs, ys = _ksg_prepare([x, y], ["x", "y"], jitter, seed, marginals)
    n = xs.shape[0]
    _, (cx, cy) = _knn([xs, ys], [[0], [1]], k, backend)
    # counts include the point itself: psi(n_x + 1) = psi(count)
    nats = digamma(k) + digamma(n) - np.mean(digamma(cx) + digamma(cy))
    return float(nats / LN2)


def _ksg_cmi(x, y, z, k, jitter, seed, backend, marginals) -> float:
    xs, ys, zs = _ksg_prepare([x, y, z], ["x", "y", "z"], jitter, seed, marginals)
    _, (cxz, cyz, cz) = _knn([xs, ys, zs], [[0, 2], [1, 2], [2]], k, backend)
    nats = digamma(k) - np.mean(digamma(cxz) + digamma(cyz) - digamma(cz))
    return float(nats / LN2)


def _kl_entropy(x, k, jitter, seed, backend) -> float:
    (xs,) = _ksg_prepare([x], ["x"], jitter, seed, marginals="none")
    n, d = xs.shape
    eps, _ = _knn([xs], [], k, backend)
    nats = digamma(n) - digamma(k) + d * np.mean(np.log(2.0 * eps))
    return float(nats / LN2)


# ----------------------------------------------------------------------------------------------
# public estimators
# ----------------------------------------------------------------------------------------------

def entropy(x, method: str = "discrete", *, k: int = 3, miller_madow: bool = True,
            jitter: float = 1e-10, seed: int = 0, backend: str = "auto") -> float:
    """Entropy of ``x`` in bits.

    - ``"discrete"``: ``-sum p log2 p + (m - 1) / (2 n ln 2)`` (Miller-Madow; off with
      ``miller_madow=False``); rows of a 2-D array are joint symbols.
    - ``"gaussian"``: differential entropy ``1/2 log2((2 pi e)^d det Sigma)`` of a Gaussian, with
      ``ln det Sigma`` estimated without bias as ``ln det S - beta(n, d)`` (``S`` the sample
      covariance of ``x``, ``beta`` from :func:`gaussian_logdet_bias`, Ince et al. 2017). Not
      standardised: entropy depends on scale. Needs ``n > d``.
    - ``"gcmi"``: the same formula on the copula-normalised columns, i.e. ``d/2 log2(2 pi e)`` minus
      the Gaussian-copula total correlation. Only differences of such entropies are meaningful.
    - ``"ksg"``: Kozachenko-Leonenko in the max-norm (Kraskov et al. 2004, eq. 20):
      ``psi(n) - psi(k) + d <log(2 eps_i)>`` nats, ``eps_i`` the distance to the k-th neighbour.
    """
    _check_method(method)
    _check_flag(miller_madow, "miller_madow")
    arr = _samples(x, "x", discrete=method == "discrete")
    if method == "discrete":
        return _entropy_of_codes(_symbols(arr), miller_madow)
    if method in ("gaussian", "gcmi"):
        return _gaussian_entropy(arr, method)
    return _kl_entropy(arr, k, jitter, seed, backend)


def conditional_entropy(x, y, *, miller_madow: bool = True) -> float:
    """Discrete conditional entropy ``H(X|Y) = H(X, Y) - H(Y)`` in bits from paired samples.

    ``x`` (n,) or (n, dx) and ``y`` (n,) or (n, dy) hold symbols (e.g. k-means codes from
    :func:`quantize`; rows of a 2-D array are joint symbols). Each entropy is the plug-in estimate,
    Miller-Madow corrected by default, so the corrected value is the plug-in ``H(X|Y)`` plus
    ``(m_XY - m_Y) / (2 n ln 2)`` (``m`` = observed distinct symbols). Unlike :func:`mutual_information`
    a constant ``x`` or ``y`` is allowed (``H(X|Y) = H(X)`` for constant ``y``, 0 for constant ``x``), so it
    is safe inside :func:`bootstrap_ci` and :func:`shuffle_baseline` on small samples. This is the
    quantity of informational redundancy and of theorems T3 / T4 (docs/THEORY.md) with
    ``x = Q(X_l)``, ``y = Q(X_(l-1))``; the plug-in (``miller_madow=False``) equals
    :func:`conditional_entropy_from_table` of the empirical joint table.
    """
    _check_flag(miller_madow, "miller_madow")
    xa, ya = _samples(x, "x", discrete=True), _samples(y, "y", discrete=True)
    _same_length(x=xa, y=ya)
    return _entropy_of_codes(_symbols(xa, ya), miller_madow) - _entropy_of_codes(_symbols(ya), miller_madow)


def mutual_information(x, y, method: str = "discrete", *, k: int = 3, miller_madow: bool = True,
                       jitter: float = 1e-10, seed: int = 0, backend: str = "auto",
                       marginals: str = "copula") -> float:
    """Mutual information ``I(X;Y)`` in bits between paired samples ``x`` (n, dx) and ``y`` (n, dy).

    - ``"discrete"``: ``H(X) + H(Y) - H(X,Y)`` with Miller-Madow corrected entropies, i.e. the
      plug-in MI plus ``(m_X + m_Y - m_XY - 1) / (2 n ln 2)``; may be slightly negative. Each variable
      needs at least two distinct values.
    - ``"gaussian"``: ``1/2 [ln det S_x + ln det S_y - ln det S - beta(n, dx) - beta(n, dy) +
      beta(n, dx + dy)] / ln 2`` with ``S`` the plug-in (sample) covariance of ``(x, y)`` and ``beta``
      the log-determinant bias of :func:`gaussian_logdet_bias` (Ince et al. 2017): each
      log-determinant is unbiased, so the estimate is **unbiased on Gaussian data** for every
      ``n > dx + dy``; it may be slightly negative when x and y are independent. Exactly invariant
      under invertible linear maps of x and of y; not under monotone non-linear maps (it does not
      claim to be). Measured (``tests/test_information.py`` sweeps the grid): over rho in [0, 0.99]
      for ``d`` canonical pairs, ``d`` = 1-20, n = 500-1e5, 100 seeds per point, every mean error lies
      within 2 standard errors of 0 (largest |mean| 0.025 bits at n = 500, d = 20). Standard deviation
      about ``sqrt(sum_i rho_i^2 / n + dx dy / (2 n^2)) / ln 2`` bits for canonical correlations
      ``rho_i``. (The Ledoit-Wolf shrinkage used before shrank every canonical correlation: 11.21
      instead of 11.98 bits at d = 10, n = 1000, rho = 0.9, and -23.5 bits at d = 20, n = 500,
      rho = 0.99; no shrinkage option is kept, since the corrected plug-in has no bias to trade
      against variance. Where n is close to the dimension, reduce the dimension first.)
    - ``"gcmi"``: the same bias-corrected formula on copula-normalised columns (Ince et al. 2017).
      Exactly invariant under strictly monotone maps of any column (the ranks do not change). Exact
      in the limit when the copula is Gaussian; otherwise a lower bound. On Gaussian data the rank
      transform adds noise to the normal scores, which lowers strong correlations: measured over the
      same grid, the bias is negative and within ``1.5 d rho^2 / (sqrt(1 - rho^2) n^0.8)`` bits
      (plus noise) for ``d`` canonical pairs of correlation ``rho``. Largest measured bias per n
      (all at d = 20, rho = 0.99, I = 56.5 bits): -1.09 bits at n = 500, -0.30 at 2000, -0.066 at
      1e4, none detectable at 1e5 (|mean| <= 0.006); for rho <= 0.6 at most -0.075 bits (n = 500,
      d = 20). With nearly collinear columns the rank noise is amplified further.
    - ``"ksg"``: Kraskov et al. (2004) algorithm 1 in the max-norm,
      ``psi(k) + psi(n) - <psi(n_x + 1) + psi(n_y + 1)>`` nats, with ``eps_i`` the distance to the
      k-th neighbour in the joint space and ``n_x`` the points strictly closer than ``eps_i`` in x.
      ``marginals`` sets the per-column transform applied first: ``"copula"`` (default, rank then
      probit, so the estimate is exactly invariant under strictly monotone maps of any column, like
      the MI itself, and heavy tails do no harm), ``"zscore"`` or ``"none"``. Ties are then broken by
      seeded Gaussian jitter of ``jitter * std`` per column (default 1e-10, as Kraskov et al.
      suggest; ``seed``). Error (bias plus noise) measured with k = 3 on Gaussian canonical pairs
      (tested): joint dimension <= 4, n >= 2000: ``|error| <= 0.05 bits + 5% of I``; joint dimension
      6: from -15% of I - 0.03 bits to +0.03 bits; joint dimension 10: -15% to -35% of I; 20: about
      -60%. The bias is negative and grows with dimension and MI (Kraskov et al. 2004; Gao, Ver Steeg
      & Galstyan 2015): compare KSG values only at equal n and dimension, or prefer gcmi in high d.
      Neighbour search: see :func:`ksg_backend`.
    """
    _check_method(method)
    _check_flag(miller_madow, "miller_madow")
    disc = method == "discrete"
    xa, ya = _samples(x, "x", disc), _samples(y, "y", disc)
    _same_length(x=xa, y=ya)
    if disc:
        _require_two_values(xa, "x")
        _require_two_values(ya, "y")
        hx = _entropy_of_codes(_symbols(xa), miller_madow)
        hy = _entropy_of_codes(_symbols(ya), miller_madow)
        return hx + hy - _entropy_of_codes(_symbols(xa, ya), miller_madow)
    if method in ("gaussian", "gcmi"):
        cov, (bx, by), n = _gaussianized([xa, ya], ["x", "y"], method)
        return _gaussian_info(cov, n, bx, by)
    return _ksg_mi(xa, ya, k, jitter, seed, backend, marginals)


def conditional_mutual_information(x, y, z, method: str = "discrete", *, k: int = 3,
                                   miller_madow: bool = True, jitter: float = 1e-10, seed: int = 0,
                                   backend: str = "auto", marginals: str = "copula") -> float:
    """Conditional mutual information ``I(X;Y|Z)`` in bits.

    - ``"discrete"``: ``H(X,Z) + H(Y,Z) - H(X,Y,Z) - H(Z)`` with Miller-Madow corrected entropies.
    - ``"gaussian"`` / ``"gcmi"``: ``1/2 log2(det S_xz det S_yz / (det S_xyz det S_z))`` from the
      plug-in covariance, each log-determinant corrected by :func:`gaussian_logdet_bias` as in
      :func:`mutual_information` (unbiased on Gaussian data), on the raw (resp. copula-normalised)
      columns. Needs ``n > dx + dy + dz``.
    - ``"ksg"``: Frenzel & Pompe (2007): ``psi(k) - <psi(n_xz + 1) + psi(n_yz + 1) - psi(n_z + 1)>``
      nats, with ``eps_i`` the max-norm distance to the k-th neighbour in the joint (x, y, z) space;
      ``marginals`` and jitter as in :func:`mutual_information`. Biased downward like KSG MI.
    """
    _check_method(method)
    _check_flag(miller_madow, "miller_madow")
    disc = method == "discrete"
    xa, ya, za = _samples(x, "x", disc), _samples(y, "y", disc), _samples(z, "z", disc)
    _same_length(x=xa, y=ya, z=za)
    if disc:
        _require_two_values(xa, "x")
        _require_two_values(ya, "y")
        h = lambda *arrs: _entropy_of_codes(_symbols(*arrs), miller_madow)  # noqa: E731
        return h(xa, za) + h(ya, za) - h(xa, ya, za) - h(za)
    if method in ("gaussian", "gcmi"):
        cov, (bx, by, bz), n = _gaussianized([xa, ya, za], ["x", "y", "z"], method)
        return _gaussian_info(cov, n, bx + bz, by) - _gaussian_info(cov, n, bz, by)
    return _ksg_cmi(xa, ya, za, k, jitter, seed, backend, marginals)


# ----------------------------------------------------------------------------------------------
# quantisation, permutation null, bootstrap
# ----------------------------------------------------------------------------------------------

def quantize(x, n_codes: int, seed: int = 0, *, minibatch_above: int = 20000) -> np.ndarray:
    """k-means codes (ints in ``[0, n_codes)``) of the rows of ``x``, deterministic given ``seed``.

    Uses ``sklearn.cluster.KMeans`` (4 restarts, one thread) up to ``minibatch_above`` rows and
    ``MiniBatchKMeans`` beyond. The codes make the discrete estimators and theorems T3/T4 applicable
    to hidden states; normalise the states first if the geometry of interest is cosine.
    """
    n_codes = as_int(n_codes, "n_codes", minimum=2, what="number of k-means codes")
    seed = as_int(seed, "seed", minimum=0, maximum=2**32 - 1)  # scikit-learn's random_state range
    minibatch_above = as_int(minibatch_above, "minibatch_above", minimum=1)
    arr = _samples(x, "x", estimate=False)  # k-means is defined for d > n (e.g. 64 states of width 4096)
    n_distinct = np.unique(arr, axis=0).shape[0]
    if n_distinct < n_codes:
        raise InputError(f"x has {n_distinct} distinct rows, fewer than n_codes={n_codes}; "
                         f"use n_codes <= {n_distinct}.")
    if arr.shape[0] > minibatch_above:
        model = MiniBatchKMeans(n_clusters=n_codes, random_state=seed, n_init=3, batch_size=4096)
        return model.fit_predict(arr).astype(np.int64)
    # one thread for the small problems of KMeans: its OpenMP threads only spin there (measured 2026-12-03 on
    # 2 shared cores, 280 x 128 states, 8 codes: 0.03 s of CPU with one thread, 0.6 s with two)
    with _single_thread():
        return KMeans(n_clusters=n_codes, random_state=seed, n_init=4).fit_predict(arr).astype(np.int64)


@dataclass(frozen=True)
class ShuffleResult:
    """A statistic next to its permutation null (y's rows shuffled, x fixed)."""

    observed: float
    null: np.ndarray = field(repr=False)
    null_mean: float
    null_std: float
    p_value: float

    @property
    def corrected(self) -> float:
        """``observed - null_mean``: the estimate with the shuffle bias removed."""
        return self.observed - self.null_mean


# Upper limit on n_shuffles / n_boot: 1e7 calls of even a 1 ms estimator take about 3 hours, and the
# Monte Carlo error of a p-value or percentile is already below 1e-3.5 there; larger is read as a typo.
MAX_RESAMPLES = 10**7


def _rng_kwarg(func: Callable, seed: int) -> dict:
    """``rng=`` for SciPy >= 1.15, ``random_state=`` before (both seeded with ``seed``)."""
    key = "rng" if "rng" in inspect.signature(func).parameters else "random_state"
    return {key: np.random.default_rng(seed)}


def _check_estimator(estimator) -> None:
    if not callable(estimator):
        raise InputError(f"estimator must be a function of the arrays returning a float (e.g. "
                         f"lambda a, b: mutual_information(a, b, 'gcmi')); got {type(estimator).__name__}.")


def _scalar_result(estimator: Callable[..., float], arrays: Sequence[np.ndarray]) -> float:
    """``estimator(*arrays)`` as a float; an estimator that returns an array or NaN is reported."""
    value = estimator(*arrays)
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InputError(f"estimator must return one number; got {type(value).__name__} "
                         f"{np.shape(value)}. Wrap it, e.g. lambda *a: float(f(*a).mean()).") from None
    return out


def _finite_resamples(values: np.ndarray, observed: float, what: str) -> np.ndarray:
    if not math.isfinite(observed):
        raise NumericalError(f"the estimator returned {observed} on the data itself; check its inputs "
                             "before resampling.")
    bad = np.count_nonzero(~np.isfinite(values))
    if bad:
        raise NumericalError(f"the estimator returned NaN/inf on {bad} of {values.size} {what} (e.g. a "
                             "resample with a constant column or too few distinct rows); use more samples "
                             "or an estimator that is defined on every resample.")
    return values


def _batch(n: int) -> int:
    """Resamples per batch so that one batch of row indices stays near 8 MB."""
    return max(1, 1_000_000 // n)


def shuffle_baseline(estimator: Callable[..., float], x, y, n_shuffles: int = 100,
                     seed: int = 0) -> ShuffleResult:
    """Permutation null of ``estimator(x, y)``: recompute it with the rows of ``y`` shuffled.

    Runs ``scipy.stats.permutation_test(permutation_type="pairings", alternative="greater")`` on the
    row indices of ``y`` (so ``x`` and ``y`` may be multivariate and of any dtype; ``x`` stays fixed).
    ``p_value = (1 + #{null >= observed}) / (1 + n_shuffles)`` (one-sided, valid for any estimator;
    Phipson & Smyth 2010); SciPy counts null values within ``100 eps |observed|`` of ``observed`` as
    ``>=``, so round-off cannot lower the p-value. When ``n_shuffles >= n!`` (n <= 5 rows) SciPy
    enumerates all ``n!`` pairings instead: ``null`` then has ``n!`` entries and the p-value is exact
    (no ``+1``). ``x`` and ``y`` may be arrays or tensors with the same first axis.
    """
    _check_estimator(estimator)
    n_shuffles = as_int(n_shuffles, "n_shuffles", minimum=1, what="number of permutations", maximum=MAX_RESAMPLES)
    seed = as_int(seed, "seed", minimum=0)
    (xa, ya), n = _paired_rows([x, y], ["x", "y"])
    observed = _scalar_result(estimator, [xa, ya])
    res = sps.permutation_test((np.arange(n),), lambda idx: _scalar_result(estimator, [xa, ya[idx]]),
                               permutation_type="pairings", vectorized=False, n_resamples=n_shuffles,
                               alternative="greater", batch=_batch(n), **_rng_kwarg(sps.permutation_test, seed))
    null = _finite_resamples(np.asarray(res.null_distribution, dtype=float), observed, "permutations")
    return ShuffleResult(observed, null, float(null.mean()), float(null.std(ddof=1)) if null.size > 1
                         else 0.0, float(res.pvalue))


@dataclass(frozen=True)
class BootstrapCI:
    """Percentile bootstrap interval of a statistic."""

    estimate: float
    low: float
    high: float
    level: float
    samples: np.ndarray = field(repr=False)


def bootstrap_ci(estimator: Callable[..., float], *arrays, n_boot: int = 200, level: float = 0.95,
                 seed: int = 0) -> BootstrapCI:
    """Percentile bootstrap CI of ``estimator(*arrays)``, resampling rows of all arrays jointly.

    Runs ``scipy.stats.bootstrap(method="percentile")`` on the row indices, so the arrays are
    resampled as pairs (row ``i`` of every array together) and may be multivariate: ``low`` and
    ``high`` are the ``(1 - level)/2`` and ``(1 + level)/2`` quantiles of the ``n_boot`` values of
    ``estimator(*[a[idx] for a in arrays])``, ``idx`` drawn with replacement (Efron & Tibshirani 1993).

    Note: resampling duplicates rows, which biases nearest-neighbour (KSG) and plug-in estimators;
    read the interval as the estimator's sampling spread, not as an interval for the true value.
    """
    _check_estimator(estimator)
    if not arrays:
        raise InputError("bootstrap_ci needs at least one array to resample.")
    level = as_probability_level(level, "level")
    n_boot = as_int(n_boot, "n_boot", minimum=2, what="number of bootstrap resamples", maximum=MAX_RESAMPLES)
    seed = as_int(seed, "seed", minimum=0)
    arrs, n = _paired_rows(arrays, [f"arrays[{i}]" for i in range(len(arrays))])
    estimate = _scalar_result(estimator, arrs)
    if not math.isfinite(estimate):
        _finite_resamples(np.zeros(0), estimate, "resamples")
    res = sps.bootstrap((np.arange(n),), lambda idx: _scalar_result(estimator, [a[idx] for a in arrs]),
                        n_resamples=n_boot, batch=_batch(n), vectorized=False, confidence_level=level,
                        method="percentile", **_rng_kwarg(sps.bootstrap, seed))
    samples = _finite_resamples(np.asarray(res.bootstrap_distribution, dtype=float), estimate, "resamples")
    ci = res.confidence_interval
    return BootstrapCI(estimate, float(ci.low), float(ci.high), level, samples)


# ----------------------------------------------------------------------------------------------
# partial information decomposition
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PIDResult:
    """Partial information decomposition of ``I(Y; X1, X2)`` (Williams & Beer 2010), in bits.

    ``redundancy + unique_1 + unique_2 + synergy == joint``; ``redundancy + unique_i == I(Y; X_i)``.
    """

    redundancy: float
    unique_1: float
    unique_2: float
    synergy: float
    joint: float
    method: str

    def __repr__(self) -> str:
        return (f"PIDResult[{self.method}](I(Y;X1,X2)={self.joint:.4f} bits = redundancy {self.redundancy:.4f}"
                f" + unique_1 {self.unique_1:.4f} + unique_2 {self.unique_2:.4f} + synergy {self.synergy:.4f})")


def _atoms_from_union(i1: float, i2: float, i12: float, i_union: float, method: str) -> PIDResult:
    """Atoms from the "union information" ``I_cup = red + u1 + u2``, clipped to its valid range.

    ``I_cup`` always lies in ``[max(I1, I2), min(I12, I1 + I2)]`` for BROJA and MMI; clipping only
    removes solver round-off, and the atoms then sum to ``I12`` exactly and are non-negative.
    """
    lo, hi = max(i1, i2), min(i12, i1 + i2)
    u = min(max(i_union, lo), hi) if lo <= hi else lo
    return PIDResult(redundancy=i1 + i2 - u, unique_1=u - i2, unique_2=u - i1, synergy=i12 - u,
                     joint=i12, method=method)


def _table_infos(p: np.ndarray) -> tuple[float, float, float]:
    """``I(Y;X1), I(Y;X2), I(Y;X1,X2)`` of a table ``p[x1, x2, y]``."""
    n1, n2, ny = p.shape
    return (mutual_information_from_table(p.sum(1)), mutual_information_from_table(p.sum(0)),
            mutual_information_from_table(p.reshape(n1 * n2, ny)))


def pid_from_table(p, method: str = "broja") -> PIDResult:
    """PID of a joint probability table ``p[x1, x2, y]`` (bits; counts are normalised).

    - ``"broja"`` (Bertschinger, Rauh, Olbrich, Jost & Ay 2014, "Quantifying unique information"):
      ``UI_1 = min_{Q in Delta_P} I_Q(Y; X1 | X2)`` over ``Delta_P`` = tables with the same (x1, y)
      and (x2, y) marginals as ``p``. Equivalently ``I_cup = min_Q I_Q(Y; X1, X2)``, then
      ``UI_1 = I_cup - I(Y;X2)``, ``UI_2 = I_cup - I(Y;X1)``, ``SI = I(Y;X1) + I(Y;X2) - I_cup``,
      ``CI = I(Y;X1,X2) - I_cup``. Solved by a log-barrier Newton method (see :func:`_broja_union`),
      to a duality gap below 1e-9 nats.
    - ``"mmi"``: minimum mutual information, ``SI = min(I(Y;X1), I(Y;X2))`` (Barrett 2015).
    """
    arr = _pmf(p, "p")
    if arr.ndim != 3:
        raise InputError(f"p must be a 3-D table p[x1, x2, y]; got shape {arr.shape}.")
    if np.count_nonzero(arr.sum((0, 1)) > 0) < 2:
        raise InputError("the target y takes a single value, so I(Y; X1, X2) = 0 and there is nothing to "
                         "decompose; check that the target varies (e.g. more than one answer).")
    i1, i2, i12 = _table_infos(arr)
    if method == "mmi":
        return _atoms_from_union(i1, i2, i12, max(i1, i2), "mmi")
    if method == "broja":
        with _single_thread_blas():  # small dense solves: BLAS threads only add contention
            union = _broja_union(arr)
        return _atoms_from_union(i1, i2, i12, union, "broja")
    raise InputError(f"unknown PID method {method!r} for a table; choose 'broja' or 'mmi'.")


_THREAD_CONTROLLER: list = []  # one threadpoolctl.ThreadpoolController, made on first use


def _single_thread(user_api: str | None = None):
    """Context limiting the thread pools of ``user_api`` (``"blas"``, ``"openmp"``; ``None``: all) to one
    thread (threadpoolctl ships with scikit-learn); no-op without it.

    The controller that finds the loaded libraries is built once: ``threadpool_limits(...)`` rescans every
    loaded shared library on each call (about 15 ms with torch and scikit-learn loaded, most of the time
    of a Gaussian PID), while ``controller.limit(...)`` only sets the thread counts.
    """
    if not _THREAD_CONTROLLER:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover
            return contextlib.nullcontext()
        _THREAD_CONTROLLER.append(ThreadpoolController())
    return _THREAD_CONTROLLER[0].limit(limits=1, user_api=user_api)


def _single_thread_blas():
    """:func:`_single_thread` for BLAS only (small dense linear algebra)."""
    return _single_thread("blas")


def _broja_union(p: np.ndarray, gap_nats: float = 1e-8) -> float:
    """``min_{Q in Delta_P} I_Q(Y; X1, X2)`` in bits, by a feasible log-barrier Newton method.

    Minimises ``f(q) = sum q log(q / q(x1, x2))`` (= ``-H_Q(Y|X1,X2)``, convex) over the entries
    allowed by the marginals (``P(x1,y) > 0`` and ``P(x2,y) > 0``) subject to ``A q = b`` (the two
    marginals). For each ``t`` Newton centres ``t f(q) - sum log q``; the Hessian is diagonal plus
    one rank-one block per (x1, x2), inverted by Sherman-Morrison, and the equality constraints are
    handled with the Schur complement ``A H^{-1} A^T``. On the central path the duality gap is
    ``m / t`` (m = number of entries; Boyd & Vandenberghe 2004, ch. 11), so ``t`` grows until
    ``m / t < gap_nats``. Start: ``q0 = P(x1|y) P(x2|y) P(y)``, strictly inside ``Delta_P``. The
    Newton systems grow ill-conditioned as ``t`` grows; a final iterative-proportional-fitting pass
    (:func:`_rescale_to_marginals`) removes the resulting ~1e-10 drift off ``Delta_P``.
    """
    a, b, py = p.sum(1), p.sum(0), p.sum((0, 1))
    allowed = (a[:, None, :] > 0) & (b[None, :, :] > 0)
    i1, i2, iy = np.nonzero(allowed)
    q = a[i1, iy] * b[i2, iy] / py[iy]
    blk = np.unique(i1 * p.shape[1] + i2, return_inverse=True)[1].ravel()
    blocks = sparse.csr_matrix((np.ones(q.size), (blk, np.arange(q.size))))  # B: block indicator
    A = _broja_constraints(i1, i2, iy, p.shape)
    rhs = A @ q
    t = 1.0
    while True:
        q = _broja_center(q, blk, blocks, A, rhs, t)
        if q.size / t < gap_nats:
            break
        t *= 10.0
    q = _rescale_to_marginals(q, (i1, i2, iy), a, b)
    s = np.bincount(blk, q)
    cond_ent_nats = -float(np.sum(q * np.log(q / s[blk])))
    return entropy_from_pmf(py) - cond_ent_nats / LN2


def _rescale_to_marginals(q: np.ndarray, index, a: np.ndarray, b: np.ndarray, iters: int = 200) -> np.ndarray:
    """Iterative proportional fitting (Deming & Stephan 1940) of ``q`` onto the (x1,y), (x2,y) marginals."""
    i1, i2, iy = index
    table = np.zeros(a.shape[:1] + b.shape)
    table[i1, i2, iy] = q
    for _ in range(iters):
        rows = table.sum(1)
        table *= np.divide(a, rows, out=np.zeros_like(a), where=rows > 0)[:, None, :]
        cols = table.sum(0)
        table *= np.divide(b, cols, out=np.zeros_like(b), where=cols > 0)[None, :, :]
        if np.abs(table.sum(1) - a).max() < 1e-16:
            break
    return table[i1, i2, iy]


def _broja_constraints(i1: np.ndarray, i2: np.ndarray, iy: np.ndarray, shape) -> sparse.csr_matrix:
    """Sparse 0/1 matrix of the (x1,y) and (x2,y) marginal constraints on the allowed entries.

    For each y the (x2, y) row of the largest allowed x2 is dropped: it equals the sum of the
    (x1, y) rows minus the other (x2, y) rows, and keeping it would make ``A`` rank deficient.
    """
    ny = shape[2]
    key1, key2 = i1 * ny + iy, i2 * ny + iy
    r1 = np.unique(key1, return_inverse=True)[1].ravel()
    last = np.zeros(ny, dtype=np.int64) - 1
    np.maximum.at(last, iy, i2)
    keep = i2 != last[iy]
    r2 = np.unique(key2[keep], return_inverse=True)[1].ravel() + r1.max() + 1
    cols = np.arange(i1.size)
    n_rows = int(r2.max()) + 1 if keep.any() else int(r1.max()) + 1
    rows = np.concatenate([r1, r2])
    return sparse.csr_matrix((np.ones(rows.size), (rows, np.concatenate([cols, cols[keep]]))),
                             shape=(n_rows, i1.size))


def _broja_center(q: np.ndarray, blk: np.ndarray, blocks: sparse.csr_matrix, A: sparse.csr_matrix,
                  b: np.ndarray, t: float, max_iter: int = 100) -> np.ndarray:
    """Newton centring of ``t f(q) - sum log q`` on ``{A q = b, q > 0}`` from a feasible ``q``.

    ``H = diag(t/q + 1/q^2) - blockdiag((t/s) 1 1^T)``; with ``D = diag(q^2 / (tq + 1))`` and the block
    indicator ``B``, Sherman-Morrison gives ``H^{-1} = D + D B^T diag(c) B D``. The Schur complement
    ``M = A H^{-1} A^T = A D A^T + W diag(c) W^T`` with ``W = A D B^T`` is assembled from sparse
    products, so the cost per step grows with (number of constraints)^2 x (number of blocks).
    """
    nb = blocks.shape[0]

    def phi(v: np.ndarray) -> float:
        s = np.bincount(blk, v, minlength=nb)
        return t * float(np.sum(v * np.log(v / s[blk]))) - float(np.sum(np.log(v)))

    for _ in range(max_iter):
        s = np.bincount(blk, q, minlength=nb)
        grad = t * np.log(q / s[blk]) - 1.0 / q
        dinv = q * q / (t * q + 1.0)  # inverse of the diagonal part t/q + 1/q^2 of the Hessian
        # Sherman-Morrison coefficient (t/s) / (1 - (t/s) sum dinv) per block, with the denominator
        # rewritten without cancellation: 1 - (t/s) sum q^2/(tq+1) = (1/s) sum q/(tq+1).
        coef = t / np.bincount(blk, q / (t * q + 1.0), minlength=nb)

        def hinv(v: np.ndarray) -> np.ndarray:
            dv = dinv * v
            return dv + dinv * (blocks.T @ (coef * (blocks @ dv)))

        ad = A.multiply(dinv[None, :]).tocsr()  # A D
        w_mat = (ad @ blocks.T).toarray()  # W = A D B^T
        schur = (ad @ A.T).toarray() + (w_mat * coef) @ w_mat.T
        hg = hinv(grad)
        rhs = -(A @ hg) - (b - A @ q)  # the residual term keeps round-off from drifting off Delta_P
        w = _solve_psd(schur, rhs)
        step = -(hg + hinv(A.T @ w))
        dec = -float(grad @ step)  # Newton decrement squared
        if dec / 2.0 < 1e-12:
            break
        neg = step < 0
        size = min(1.0, 0.99 * float(np.min(-q[neg] / step[neg]))) if neg.any() else 1.0
        f0 = phi(q)
        while size > 1e-14 and phi(q + size * step) > f0 - 0.25 * size * dec:
            size *= 0.5
        q = q + size * step
    return q


def _solve_psd(mat: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve ``mat w = rhs`` for a symmetric positive (semi)definite ``mat`` after Jacobi scaling."""
    scale = 1.0 / np.sqrt(np.maximum(np.diag(mat), np.finfo(float).tiny))
    scaled = mat * scale[:, None] * scale[None, :]
    try:
        return scale * sla.cho_solve(sla.cho_factor(scaled), scale * rhs)
    except np.linalg.LinAlgError:
        return scale * np.linalg.lstsq(scaled, scale * rhs, rcond=None)[0]


def pid(x1, x2, y, method: str = "broja") -> PIDResult:
    """PID of ``I(Y; X1, X2)`` from paired samples (Williams & Beer 2010), bits.

    - ``"broja"`` / ``"mmi"``: discrete samples (rows of 2-D arrays are joint symbols, e.g. k-means
      codes from :func:`quantize`); the empirical joint table goes to :func:`pid_from_table`
      (plug-in: no bias correction; compare with :func:`shuffle_baseline`).
    - ``"gaussian"``: MMI PID for jointly Gaussian variables (Barrett 2015, "Exploration of
      synergistic and redundant information sharing in static and dynamical Gaussian systems"):
      ``I(Y;X1)``, ``I(Y;X2)``, ``I(Y;X1,X2)`` from one plug-in correlation matrix of
      ``[x1, x2, y]`` with the bias correction of :func:`gaussian_logdet_bias` (as in
      :func:`mutual_information`), then ``SI = min(I(Y;X1), I(Y;X2))``. ``x1``, ``x2``, ``y`` may be multivariate.
      For hidden states apply it to PCA-reduced pooled states (e.g. the top 8-16 components per
      modality), since the covariance must be well estimated.
    """
    if method not in ("broja", "mmi", "gaussian"):
        raise InputError(f"unknown PID method {method!r}; choose 'broja', 'mmi' or 'gaussian'.")
    disc = method != "gaussian"
    a1, a2, ay = _samples(x1, "x1", disc), _samples(x2, "x2", disc), _samples(y, "y", disc)
    _same_length(x1=a1, x2=a2, y=ay)
    if np.unique(ay, axis=0).shape[0] < 2:
        raise InputError("the target y takes a single value, so I(Y; X1, X2) = 0 and there is nothing to "
                         "decompose; check that the target varies (e.g. more than one answer).")
    if disc:
        c1, c2, cy = _symbols(a1), _symbols(a2), _symbols(ay)
        table = np.zeros((c1.max() + 1, c2.max() + 1, cy.max() + 1))
        np.add.at(table, (c1, c2, cy), 1.0)
        return pid_from_table(table, method)
    cov, (b1, b2, by), n = _gaussianized([a1, a2, ay], ["x1", "x2", "y"], "gaussian")
    i1, i2 = _gaussian_info(cov, n, b1, by), _gaussian_info(cov, n, b2, by)
    i12 = _gaussian_info(cov, n, b1 + b2, by)
    return _atoms_from_union(i1, i2, i12, max(i1, i2), "gaussian")
