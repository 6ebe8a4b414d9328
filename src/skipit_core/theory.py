"""The theorems of docs/THEORY.md as functions: measured quantities in, numeric bounds out.

One function per theorem (T1-T5). Each returns a :class:`Bound`: the value, the theorem's name,
the constants it used and the statement it instantiates, so a chapter can print exactly what was
assumed. Exact companions (:func:`bayes_error`, :func:`attention_removal_change`, ...) compute the
quantity a bound controls, so tests and chapters can put the two side by side.

Also here: :func:`lipschitz_estimate` (empirical Lipschitz constants alpha, beta of a downstream
map, so T1/T2 give numbers for a real model), and what T1/T2 need on a real VLM: the measured
functional gap of a skip plan (:func:`functional_gap`, from :func:`answer_logprob`), the per-sample
per-token cosine distances of the vision tokens across every layer (:func:`vision_cos_dists`) and the
Lipschitz constants of the answer's log-probability in the normalised vision block at a layer's
output, along the direction that skipping the layer moves it (:func:`skip_lipschitz`). The finite-sample certificates for tail probabilities
and accuracies (:func:`hoeffding_upper`, :func:`hoeffding_mean_upper`, :func:`clopper_pearson`,
:func:`wilson_interval`) live in :mod:`skipit_core.stats` and are re-exported here.

Units: information in bits; cosine distances ``d(a, b) = 1 - <a, b> / (|a| |b|)`` in [0, 2].
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from scipy import optimize
from torch import nn

from .errors import InputError, NumericalError
from .forward import BatchLayout, iter_batches, last_logprobs, run_forward
from .information import conditional_entropy_from_table
from .models import Backbone
from .skip import SkipPlan, skipping
from .stats import clopper_pearson, hoeffding_mean_upper, hoeffding_upper, wilson_interval
from .utils import as_int, as_numpy, check_finite

__all__ = [
    "Bound",
    "geometric_gap_bound",
    "geometric_gap_bound_expected",
    "band_gap_bound",
    "proximal_gap_bound",
    "bayes_gap_bound",
    "bayes_error",
    "conditional_entropy_from_table",
    "fano_bound",
    "attention_removal_bound",
    "attention_removal_change",
    "layer_attention_removal_bound",
    "layer_attention_removal_change",
    "output_projection_norms",
    "LipschitzEstimate",
    "lipschitz_estimate",
    "answer_logprob",
    "functional_gap",
    "vision_cos_dists",
    "skip_lipschitz",
    "hoeffding_upper",
    "hoeffding_mean_upper",
    "clopper_pearson",
    "wilson_interval",
]


@dataclass(frozen=True)
class Bound:
    """A theorem instantiated on measured quantities.

    ``value`` is the bound (a float, or an array for vectorised inputs); it holds with probability at
    least ``probability`` (1 for deterministic bounds). ``constants`` lists every number the bound
    used; ``statement`` is the inequality in words.
    """

    value: float | np.ndarray
    name: str
    constants: dict = field(default_factory=dict)
    statement: str = ""
    probability: float = 1.0

    def __float__(self) -> float:
        return float(self.value)

    def __repr__(self) -> str:
        val = np.asarray(self.value)
        shown = (f"{float(val):.6g}" if val.ndim == 0 else
                 f"array{val.shape} in [{val.min():.4g}, {val.max():.4g}]")
        consts = ", ".join(f"{k}={_short(v)}" for k, v in self.constants.items())
        prob = f", with probability >= {self.probability:.4g}" if self.probability < 1 else ""
        return f"Bound[{self.name}] = {shown}{prob} ({consts}): {self.statement}"


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, np.ndarray) and v.size > 4:
        return f"array{v.shape}"
    return repr(v)


def _real(value, name: str, what: str = "a finite number") -> float:
    """``value`` as a float: a real number (Python, NumPy or 0-d tensor), not a bool or a string."""
    if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
        raise InputError(f"{name} must be {what}; got {value!r}.")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be {what}; got {value!r} of type {type(value).__name__}.") from None


def _nonneg(value, name: str) -> float:
    v = _real(value, name, "a finite number >= 0")
    if not math.isfinite(v) or v < 0:
        raise InputError(f"{name} must be a finite number >= 0; got {value!r}.")
    return v


def _prob(value, name: str) -> float:
    v = _real(value, name, "a probability in [0, 1]")
    if not 0.0 <= v <= 1.0:
        raise InputError(f"{name} must be a probability in [0, 1]; got {value!r}.")
    return v


def _cos_dists(d, name: str) -> np.ndarray:
    if d is None:
        raise InputError(f"{name} is None; pass one cosine distance per token.")
    arr = check_finite(as_numpy(d, name), name)
    if arr.size == 0:
        raise InputError(f"{name} is empty; pass one cosine distance per token.")
    if np.any(arr < -1e-9) or np.any(arr > 2 + 1e-9):
        raise InputError(f"{name} must hold cosine distances 1 - cos in [0, 2]; got values in "
                         f"[{arr.min():.4g}, {arr.max():.4g}]. Pass distances, not similarities.")
    return np.clip(arr, 0.0, 2.0)


# ----------------------------------------------------------------------------------------------
# T1, T2: geometric / proximal redundancy => functional redundancy
# ----------------------------------------------------------------------------------------------

_T1 = ("|h(skip) - h| <= alpha ||x_hat_l - x_hat_(l-1)||_F = alpha sqrt(2 sum_(i in V) d_i) "
       "(+ beta sqrt(2 sum_(j in T) d_j) when text is skipped too); unit vectors: |a-b|^2 = 2 d(a, b)")


def geometric_gap_bound(alpha: float, cos_dists, beta: float | None = None, text_cos_dists=None) -> Bound:
    """T1 for one input: ``alpha sqrt(2 sum_{i in V} d_i) [+ beta sqrt(2 sum_{j in T} d_j)]``.

    ``cos_dists`` are the per-token cosine distances ``d(x_{l-1}^(i), x_l^(i))`` of the skipped vision
    tokens; ``alpha`` (``beta``) is the Lipschitz constant of the downstream score in the normalised
    vision (text) block, Frobenius norm. Proof: ``|h(X_hat') - h(X_hat)| <= alpha ||X_hat' - X_hat||_F``
    and ``||a_hat - b_hat||^2 = 2 d(a, b)`` for unit vectors.
    """
    a = _nonneg(alpha, "alpha")
    d = _cos_dists(cos_dists, "cos_dists")
    value = a * math.sqrt(2.0 * d.sum())
    consts = {"alpha": a, "sum_d_vision": float(d.sum()), "n_vision": int(d.size)}
    if (beta is None) != (text_cos_dists is None):
        raise InputError("pass both beta and text_cos_dists (text tokens skipped too) or neither.")
    if beta is not None:
        b = _nonneg(beta, "beta")
        dt = _cos_dists(text_cos_dists, "text_cos_dists")
        value += b * math.sqrt(2.0 * dt.sum())
        consts.update(beta=b, sum_d_text=float(dt.sum()), n_text=int(dt.size))
    return Bound(value, "T1 geometric -> functional", consts, _T1)


def geometric_gap_bound_expected(alpha: float, n_tokens: int, eps: float, beta: float | None = None,
                                 n_text_tokens: int | None = None, text_eps: float | None = None) -> Bound:
    """T1 in expectation: ``E|h(skip) - h| <= alpha sqrt(2 |V| eps) [+ beta sqrt(2 |T| eps_T)]``.

    Under eps-geometric redundancy ``E d_i <= eps``; Jensen (sqrt is concave) gives
    ``E sqrt(2 sum_i d_i) <= sqrt(2 sum_i E d_i) <= sqrt(2 |V| eps)``.
    """
    a, e = _nonneg(alpha, "alpha"), _nonneg(eps, "eps")
    nv = _count(n_tokens, "n_tokens")
    value = a * math.sqrt(2.0 * nv * e)
    consts = {"alpha": a, "n_vision": nv, "eps": e}
    if beta is not None:
        if n_text_tokens is None or text_eps is None:
            raise InputError("with beta also pass n_text_tokens and text_eps (the text block's eps).")
        b, et, nt = _nonneg(beta, "beta"), _nonneg(text_eps, "text_eps"), _count(n_text_tokens, "n_text_tokens")
        value += b * math.sqrt(2.0 * nt * et)
        consts.update(beta=b, n_text=nt, text_eps=et)
    return Bound(value, "T1 (expectation)", consts,
                 "E|h(skip) - h| <= alpha sqrt(2 |V| eps) by Jensen under E d_i <= eps")


def band_gap_bound(alpha: float, band_cos_dists, beta: float | None = None, text_band_cos_dists=None) -> Bound:
    """T1 for a band ``[a, b]``: ``alpha sum_{l=a}^{b} sqrt(2 sum_{i in V} d_{l,i})`` (+ beta term).

    ``band_cos_dists[l, i]`` is token i's cosine distance across layer ``a + l``. Skipping the band
    replaces ``x_hat_b`` by ``x_hat_(a-1)``; the triangle inequality over the band's layers bounds
    ``||x_hat_b - x_hat_(a-1)||_F`` by the sum of the per-layer drifts ``sqrt(2 sum_i d_{l,i})``.
    """
    a = _nonneg(alpha, "alpha")
    if (beta is None) != (text_band_cos_dists is None):
        raise InputError("pass both beta and text_band_cos_dists (text tokens skipped too) or neither.")
    d = _cos_dists(band_cos_dists, "band_cos_dists")
    if d.ndim != 2:
        raise InputError(f"band_cos_dists must have shape (n_layers_in_band, n_tokens); got {d.shape}.")
    per_layer = np.sqrt(2.0 * d.sum(1))
    value = a * float(per_layer.sum())
    consts = {"alpha": a, "n_layers": int(d.shape[0]), "per_layer_drift": per_layer}
    if beta is not None:
        dt = _cos_dists(text_band_cos_dists, "text_band_cos_dists")
        if dt.ndim < 2 or dt.shape[0] != d.shape[0]:
            raise InputError(f"text_band_cos_dists must have shape (n_layers_in_band, n_text_tokens) with the "
                             f"same {d.shape[0]} layers as band_cos_dists; got {dt.shape}.")
        b = _nonneg(beta, "beta")
        value += b * float(np.sqrt(2.0 * dt.reshape(dt.shape[0], -1).sum(1)).sum())
        consts["beta"] = b
    return Bound(value, "T1 (band)", consts,
                 "|h(skip band) - h| <= alpha sum_l sqrt(2 sum_i d_(l,i)) (triangle inequality)")


def proximal_gap_bound(alpha: float, n_tokens: int, eps: float, delta: float,
                       value_range: float | None = None) -> Bound:
    """T2: with probability ``>= 1 - |S| delta``, ``|h(skip) - h| <= alpha sqrt(2 |S| eps)``.

    Under (eps, delta)-proximal redundancy each token has ``P(d_i > eps) <= delta``; by the union
    bound all ``|S|`` tokens have ``d_i <= eps`` with probability ``>= 1 - |S| delta``, and then T1
    gives the value. (With a per-sample statistic such as ``max_i d_i`` the probability is
    ``1 - delta``: call with ``n_tokens=1`` for the probability and scale eps yourself.)
    If ``h`` has range ``B`` (``value_range``), the expectation form
    ``E|h(skip) - h| <= alpha sqrt(2 |S| eps) + |S| delta B`` is in ``constants['expected_bound']``.
    """
    a, e, dl = _nonneg(alpha, "alpha"), _nonneg(eps, "eps"), _prob(delta, "delta")
    ns = _count(n_tokens, "n_tokens")
    value = a * math.sqrt(2.0 * ns * e)
    consts = {"alpha": a, "n_tokens": ns, "eps": e, "delta": dl}
    if value_range is not None:
        rng = _nonneg(value_range, "value_range")
        consts.update(value_range=rng, expected_bound=value + ns * dl * rng)
    return Bound(value, "T2 proximal -> functional", consts,
                 "P(|h(skip) - h| <= alpha sqrt(2|S| eps)) >= 1 - |S| delta (union bound); "
                 "E|h(skip) - h| <= alpha sqrt(2|S| eps) + |S| delta B", probability=max(0.0, 1.0 - ns * dl))


def _count(n, name: str) -> int:
    return as_int(n, name, minimum=1)


# ----------------------------------------------------------------------------------------------
# T3, T4: informational redundancy
# ----------------------------------------------------------------------------------------------

def bayes_gap_bound(cond_entropy_bits: float) -> Bound:
    """T3: ``e*(Z|X_{l-1}) - e*(Z|X_l) <= 1 - 2^{-H(X_l|X_{l-1})}`` for any task Z.

    Using the X_l-optimal rule on ``g(X_{l-1})`` with ``g`` the MAP guess of X_l costs at most
    ``P(g(X_{l-1}) != X_l) <= 1 - E 2^{-H(X_l|X_{l-1}=x)} <= 1 - 2^{-H(X_l|X_{l-1})}``
    (``max_x p(x|y) >= 2^{-H(X|Y=y)}``, then Jensen). ``cond_entropy_bits`` = ``H(X_l | X_{l-1})``.
    """
    h = _real(cond_entropy_bits, "cond_entropy_bits", "a conditional entropy in bits (a number >= 0)")
    if not math.isfinite(h) or h < -1e-9:
        raise InputError(f"cond_entropy_bits must be a finite conditional entropy >= 0; got {h!r}.")
    h = max(h, 0.0)
    return Bound(1.0 - 2.0 ** (-h), "T3 informational -> Bayes gap", {"H(X_l|X_l-1)": h},
                 "e*(Z|X_(l-1)) <= e*(Z|X_l) + 1 - 2^(-H(X_l|X_(l-1)))")


def bayes_error(p_zx) -> float:
    """Exact Bayes error ``e*(Z|X) = 1 - sum_x max_z p(z, x)`` of a joint table ``p[z, x]``.

    The same formula with ``p[x_l, x_{l-1}]`` gives the error of the MAP replacement of a layer,
    ``min_g P(g(X_{l-1}) != X_l)``.
    """
    p = check_finite(as_numpy(p_zx, "p_zx"), "p_zx")
    if p.ndim != 2 or np.any(p < 0) or p.sum() <= 0:
        raise InputError(f"p_zx must be a non-negative 2-D table p[z, x] with a positive sum; got shape "
                         f"{p.shape}. Reshape multi-axis variables into one axis.")
    p = p / p.sum()
    return float(max(0.0, 1.0 - p.max(0).sum()))


def _binary_entropy(pe: float) -> float:
    return 0.0 if pe <= 0 or pe >= 1 else -pe * math.log2(pe) - (1 - pe) * math.log2(1 - pe)


def fano_bound(cond_entropy_bits: float, alphabet_size: int, form: str = "weak") -> Bound:
    """T4 (Fano): any replacement ``g`` of layer l errs with ``P(g(X_{l-1}) != X_l) >= bound``.

    ``form="weak"`` (THEORY.md): ``(H(X_l|X_{l-1}) - 1) / log2(|X_l| - 1)``, clipped at 0, from
    ``H <= h_b(P_e) + P_e log2(|X| - 1)`` and ``h_b <= 1``. For ``|X_l| = 2`` the weak form divides
    by ``log2 1 = 0``; there the exact binary Fano ``P_e >= h_b^{-1}(H)`` (inverse on [0, 1/2]) is
    used and ``constants['form']`` says so. ``form="exact"`` inverts the full Fano inequality
    numerically for any alphabet (tighter). ``|X_l| = 1`` gives 0.
    """
    h = _real(cond_entropy_bits, "cond_entropy_bits", "a conditional entropy in bits (a number >= 0)")
    k = _count(alphabet_size, "alphabet_size")
    if not math.isfinite(h) or h < -1e-9 or h > math.log2(k) + 1e-9:
        raise InputError(f"cond_entropy_bits={h!r} is impossible for an alphabet of {k} values: it must lie "
                         f"in [0, log2({k})] = [0, {math.log2(k):.4g}]. Check alphabet_size (count all values "
                         "X_l can take).")
    if not isinstance(form, str) or form not in ("weak", "exact"):
        raise InputError(f"form must be 'weak' or 'exact'; got {form!r}.")
    h = min(max(h, 0.0), math.log2(k))
    used = form if k > 2 else "exact (binary)"
    if k == 1:
        value = 0.0
    elif used == "weak":
        value = max(0.0, (h - 1.0) / math.log2(k - 1))
    else:
        value = _invert_fano(h, k)
    return Bound(value, "T4 Fano", {"H(X_l|X_l-1)": h, "alphabet_size": k, "form": used},
                 "P(g(X_(l-1)) != X_l) >= (H(X_l|X_(l-1)) - 1) / log2(|X_l| - 1) for every g")


def _invert_fano(h: float, k: int) -> float:
    """Smallest ``P_e`` in ``[0, 1 - 1/k]`` with ``h_b(P_e) + P_e log2(k - 1) >= h`` (increasing there)."""
    top = 1.0 - 1.0 / k
    fano = lambda pe: _binary_entropy(pe) + pe * math.log2(k - 1) - h  # noqa: E731
    if h <= 0:
        return 0.0
    if fano(top) <= 0:
        return top
    return float(optimize.brentq(fano, 0.0, top, xtol=1e-14))


# ----------------------------------------------------------------------------------------------
# T5: cross-modal attention condition
# ----------------------------------------------------------------------------------------------

def _attention_inputs(attn, values, vision_mask):
    v = check_finite(as_numpy(values, "values"), "values")
    a = check_finite(as_numpy(attn, "attn"), "attn")
    raw_mask = as_numpy(vision_mask, "vision_mask", dtype=None)
    if raw_mask.ndim != 1 or not np.isin(raw_mask, (0, 1)).all():
        raise InputError(f"vision_mask must be a 1-D boolean mask over the keys (True = vision key); got "
                         f"shape {raw_mask.shape}, values {np.unique(raw_mask)[:5].tolist()}. Build it as "
                         "input_ids == image_token_id.")
    mask = raw_mask.astype(bool)
    if v.ndim < 2:
        raise InputError(f"values must have shape (..., n_keys, d_v); got {v.shape}.")
    if mask.shape[-1] != v.shape[-2]:
        raise InputError(f"vision_mask has {mask.shape[-1]} keys but values has {v.shape[-2]}; "
                         "build the mask from input_ids == image_token_id for the same key positions.")
    if not mask.any() or mask.all():
        raise InputError("vision_mask must mark at least one vision key and leave at least one text key.")
    if a.ndim == v.ndim - 1:
        _check_softmax_rows(a, v.shape[:-1])
    return a, v, mask


def _check_softmax_rows(a: np.ndarray, shape: tuple) -> None:
    """Attention rows must be softmax outputs over the same keys as ``values``: shape, range, sum 1."""
    if a.shape != tuple(shape):
        raise InputError(f"attention rows have shape {a.shape}; with these values they must have shape "
                         f"{tuple(shape)} (values without d_v: one weight per key).")
    sums = a.sum(-1)
    if np.any(a < -1e-6) or np.any(np.abs(sums - 1.0) > 1e-3):
        raise InputError(f"attention rows must be softmax probabilities (>= 0, each row summing to 1); got "
                         f"entries in [{a.min():.3g}, {a.max():.3g}] and row sums in [{sums.min():.4g}, "
                         f"{sums.max():.4g}]. Pass softmax(scores), not the scores; renormalise rows "
                         "restricted to real keys (rows / rows.sum(-1, keepdims=True)).")


def attention_removal_bound(attn_row_or_tau, values, vision_mask) -> Bound:
    """T5 per head: ``|o_t - o_t'| <= tau_t (max_{j in V} |v_j| + max_{j in T} |v_j|)``.

    ``o_t = sum_j A[t, j] v_j``; ``o_t'`` attends to text keys only, renormalised:
    ``o_t' = sum_{j in T} A[t, j] v_j / (1 - tau_t)`` with ``tau_t = sum_{j in V} A[t, j]``. Then
    ``o_t - o_t' = sum_V A v - tau/(1 - tau) sum_T A v``; the triangle inequality gives the bound.
    Inputs: ``values`` (..., n_keys, d_v); ``attn_row_or_tau`` either attention rows (..., n_keys)
    (softmax outputs) or the vision masses tau (...); ``vision_mask`` (n_keys,) bool.
    Vectorised: ``value`` has the leading shape (...).
    """
    a, v, mask = _attention_inputs(attn_row_or_tau, values, vision_mask)
    if a.ndim == v.ndim - 1:
        tau = (a * mask).sum(-1)
    elif a.ndim == v.ndim - 2:
        if a.shape != v.shape[:-2]:
            raise InputError(f"tau has shape {a.shape}; with values {v.shape} pass one tau per query, "
                             f"shape {v.shape[:-2]}.")
        tau = a
    else:
        raise InputError(f"attn_row_or_tau has shape {a.shape}; with values {v.shape} pass rows "
                         f"{v.shape[:-1]} or taus {v.shape[:-2]}.")
    if np.any(tau < -1e-12) or np.any(tau > 1 + 1e-12):
        raise InputError("tau (attention mass on vision keys) must lie in [0, 1]; pass softmax rows.")
    norms = np.linalg.norm(v, axis=-1)
    mv = np.where(mask, norms, -np.inf).max(-1)
    mt = np.where(mask, -np.inf, norms).max(-1)
    value = tau * (mv + mt)
    return Bound(value if np.ndim(value) else float(value), "T5 cross-modal (head)",
                 {"tau": tau, "max_norm_vision": mv, "max_norm_text": mt},
                 "|o_t - o_t(text only)| <= tau_t (max_V |v_j| + max_T |v_j|) <= 2 tau_t max_j |v_j|")


def attention_removal_change(attn_row, values, vision_mask) -> np.ndarray | float:
    """Exact ``|o_t - o_t'|`` when the vision keys are removed and the text-only softmax renormalised.

    Shapes as in :func:`attention_removal_bound` (rows only). Raises :class:`NumericalError` where
    the text keys hold no attention mass (the renormalisation is undefined).
    """
    a, v, mask = _attention_inputs(attn_row, values, vision_mask)
    if a.shape != v.shape[:-1]:
        raise InputError(f"attn_row must have shape {v.shape[:-1]} (values without d_v); got {a.shape}.")
    text_mass = (a * ~mask).sum(-1, keepdims=True)
    if np.any(text_mass <= 0):
        raise NumericalError("a text query puts zero attention on text keys, so the text-only softmax is "
                             "undefined; pass the raw rows (not masked) or drop that query.")
    full = (a[..., None] * v).sum(-2)
    text_only = ((a * ~mask / text_mass)[..., None] * v).sum(-2)
    out = np.linalg.norm(full - text_only, axis=-1)
    return out if out.ndim else float(out)


def _w_o(w_o, n_heads: int, d_head: int) -> np.ndarray:
    w = check_finite(as_numpy(w_o, "w_o"), "w_o")
    if w.ndim != 2 or w.size == 0 or w.shape[1] != n_heads * d_head:
        raise InputError(f"w_o must be the output projection weight (d_model, n_heads * d_head) = "
                         f"(*, {n_heads * d_head}) as in torch's nn.Linear.weight; got {w.shape}.")
    return w


def _spectral_norm(w: np.ndarray) -> float:
    """Largest singular value (torch's LAPACK: fast and robust on a loaded CPU)."""
    return float(torch.linalg.svdvals(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64)))[0])


def output_projection_norms(w_o, n_heads: int) -> tuple[float, np.ndarray]:
    """``(|W_O|_2, [|W_O^(h)|_2 for each head])`` of an output projection weight ``(d_model, H d_head)``:
    the constants :func:`layer_attention_removal_bound` needs, to compute once per layer."""
    n_heads = _count(n_heads, "n_heads")
    w = check_finite(as_numpy(w_o, "w_o"), "w_o")
    if w.ndim != 2 or w.size == 0 or w.shape[1] % n_heads:
        raise InputError(f"w_o must be (d_model, n_heads * d_head) with n_heads = {n_heads}; got {w.shape}.")
    d_head = w.shape[1] // n_heads
    heads = np.array([_spectral_norm(w[:, h * d_head:(h + 1) * d_head]) for h in range(n_heads)])
    return _spectral_norm(w), heads


def layer_attention_removal_bound(attn_rows, values, vision_mask, w_o, form: str = "spectral",
                                  w_o_norm: float | None = None, head_norms=None) -> Bound:
    """T5 for a layer: ``|W_O (o - o')| <= |W_O|_2 sum_h tau_{t,h} (max_V |v_j^h| + max_T |v_j^h|)``.

    ``attn_rows`` (..., H, n_keys), ``values`` (..., H, n_keys, d_head), ``w_o`` (d_model, H d_head),
    the output projection weight as stored by ``nn.Linear``. ``|W_O c| <= |W_O|_2 |c|_2`` and
    ``|c|_2 <= sum_h |c_h|`` for the concatenation ``c`` of the heads' changes (``form="spectral"``,
    THEORY.md). ``form="per_head"`` gives the tighter ``sum_h |W_O^(h)|_2 b_h`` (``W_O^(h)`` the
    head's column block), which is also much cheaper for a large ``d_model``: the full spectral norm
    of a 4096 x 4096 matrix takes seconds, so pass ``w_o_norm`` (and ``head_norms``, the ``H`` values
    ``|W_O^(h)|_2``) when you call this repeatedly with the same ``w_o``.
    """
    if not isinstance(form, str) or form not in ("spectral", "per_head"):
        raise InputError(f"form must be 'spectral' or 'per_head'; got {form!r}.")
    a, v, mask = _attention_inputs(attn_rows, values, vision_mask)
    n_heads, d_head = v.shape[-3], v.shape[-1]
    w = _w_o(w_o, n_heads, d_head)
    heads = np.asarray(attention_removal_bound(a, v, mask).value)
    per_head_norms = (np.array([_spectral_norm(w[:, h * d_head:(h + 1) * d_head]) for h in range(n_heads)])
                      if head_norms is None else check_finite(as_numpy(head_norms, "head_norms"), "head_norms"))
    if np.any(per_head_norms < 0):
        raise InputError("head_norms must be spectral norms (>= 0), e.g. from output_projection_norms(w_o, n_heads).")
    if per_head_norms.shape != (n_heads,):
        raise InputError(f"head_norms must hold one norm per head ({n_heads}); got shape {per_head_norms.shape}.")
    consts = {"head_bounds": heads, "per_head_norms": per_head_norms, "form": form}
    if form == "spectral":
        spec = _nonneg(w_o_norm, "w_o_norm") if w_o_norm is not None else _spectral_norm(w)
        value = spec * heads.sum(-1)
        consts["W_O_spectral_norm"] = spec
        statement = "|W_O(o - o')| <= |W_O|_2 sum_h tau_h (max_V |v| + max_T |v|)"
    else:
        value = (heads * per_head_norms).sum(-1)
        statement = "|W_O(o - o')| <= sum_h |W_O^(h)|_2 tau_h (max_V |v| + max_T |v|)"
    return Bound(value if np.ndim(value) else float(value), "T5 cross-modal (layer)", consts, statement)


def layer_attention_removal_change(attn_rows, values, vision_mask, w_o) -> np.ndarray | float:
    """Exact change ``|W_O concat_h(o_h - o_h')|`` of the layer's attention output (see above)."""
    a, v, mask = _attention_inputs(attn_rows, values, vision_mask)
    n_heads, d_head = v.shape[-3], v.shape[-1]
    w = _w_o(w_o, n_heads, d_head)
    text_mass = (a * ~mask).sum(-1, keepdims=True)
    if np.any(text_mass <= 0):
        raise NumericalError("a head puts zero attention on text keys, so the text-only softmax is undefined.")
    diff = ((a - a * ~mask / text_mass)[..., None] * v).sum(-2)  # (..., H, d_head)
    out = np.linalg.norm(diff.reshape(*diff.shape[:-2], n_heads * d_head) @ w.T, axis=-1)
    return out if out.ndim else float(out)


# ----------------------------------------------------------------------------------------------
# empirical Lipschitz constants
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LipschitzEstimate:
    """Finite-difference Lipschitz ratios ``|fn(x + h u) - fn(x - h u)| / (2h)`` for unit ``u``.

    ``ratios[i, j]``: sample i, direction j (given directions first, then power-iteration, then
    random). ``per_sample`` = max over directions; ``max`` and ``quantile`` are over samples.
    """

    max: float
    quantile: float
    level: float
    along_given: float | None
    per_sample: np.ndarray = field(repr=False)
    ratios: np.ndarray = field(repr=False)


def _unit(u: torch.Tensor) -> torch.Tensor:
    norms = u.flatten(1).norm(dim=1)
    if torch.any(norms == 0):
        raise InputError("a direction has zero norm (e.g. a token that did not move); drop those samples.")
    return u / norms.view(-1, *([1] * (u.dim() - 1)))


def _fd_ratio(fn, x: torch.Tensor, u: torch.Tensor, step: float) -> torch.Tensor:
    diff = fn(x + step * u) - fn(x - step * u)
    return diff.reshape(x.shape[0], -1).norm(dim=1) / (2.0 * step)


def _power_direction(fn, x: torch.Tensor, u: torch.Tensor, iters: int, step: float) -> torch.Tensor:
    """Per-sample top right-singular direction of the Jacobian: ``u <- J^T J u`` (J u by central
    differences, J^T by autograd). Assumes sample i's output depends only on sample i."""
    for _ in range(iters):
        ju = (fn(x + step * u) - fn(x - step * u)) / (2.0 * step)
        xr = x.detach().requires_grad_(True)
        with torch.enable_grad():
            (jtju,) = torch.autograd.grad(fn(xr), xr, grad_outputs=ju.detach())
        u = _unit(jtju.detach())
    return u


def lipschitz_estimate(fn: Callable[[torch.Tensor], torch.Tensor], x, directions=None, n_random: int = 16,
                       step: float = 1e-3, quantile: float = 0.95, seed: int = 0,
                       power_iters: int = 0) -> LipschitzEstimate:
    """Empirical Lipschitz constant of ``fn`` around the samples ``x`` (a lower estimate of the true one).

    ``fn`` maps a batch ``(n, ...)`` to ``(n,)`` or ``(n, ...)``, sample by sample. For each sample and
    each unit direction ``u`` the ratio ``|fn(x + h u) - fn(x - h u)|_2 / (2 h)`` (central differences,
    exact for linear maps) is recorded. Directions: ``directions`` (a tensor shaped like ``x`` or like
    one sample, or a list of them; e.g. the actual skip direction ``x_l - x_{l-1}``), ``power_iters``
    steps of power iteration on ``J^T J`` (needs ``fn`` differentiable; finds the worst direction), and
    ``n_random`` Gaussian directions (seeded). Use float64 inputs: in float32 take ``step`` ~ 1e-2.
    Report ``max`` (over samples and directions) and the ``quantile`` over samples of the per-sample max.
    """
    xt = torch.as_tensor(x) if isinstance(x, torch.Tensor) else torch.as_tensor(as_numpy(x, "x"))
    if not xt.is_floating_point() or xt.dim() < 2 or xt.shape[0] < 1 or xt.numel() == 0:
        raise InputError(f"x must be a float tensor (n, ...) of n >= 1 samples, each at least 1-D; got {xt.dtype} "
                         f"{tuple(xt.shape)}. For scalar samples pass x[:, None].")
    if not torch.isfinite(xt).all():
        raise NumericalError("x holds NaN/inf; drop or impute those samples first.")
    step, quantile = _real(step, "step"), _real(quantile, "quantile")
    if not (math.isfinite(step) and step > 0) or not 0 < quantile <= 1:
        raise InputError(f"need a finite step > 0 and quantile in (0, 1]; got step={step}, quantile={quantile}.")
    n_random = as_int(n_random, "n_random", minimum=0, what="number of random directions")
    power_iters = as_int(power_iters, "power_iters", minimum=0)
    seed = as_int(seed, "seed", minimum=0)
    dirs = _given_directions(directions, xt)
    n_given = len(dirs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if power_iters > 0:
            start = _unit(torch.randn(xt.shape, generator=gen, dtype=xt.dtype))
            dirs.append(_power_direction(fn, xt, start, power_iters, step))
        dirs += [_unit(torch.randn(xt.shape, generator=gen, dtype=xt.dtype)) for _ in range(n_random)]
        if not dirs:
            raise InputError("no directions: pass directions, n_random > 0 or power_iters > 0.")
        ratios = torch.stack([_fd_ratio(fn, xt, u, step) for u in dirs], dim=1).double().numpy()
    if not np.all(np.isfinite(ratios)):
        raise NumericalError("fn returned NaN/inf near x; reduce step or check fn.")
    per_sample = ratios.max(1)
    return LipschitzEstimate(max=float(per_sample.max()), quantile=float(np.quantile(per_sample, quantile)),
                             level=quantile, along_given=float(ratios[:, :n_given].max()) if n_given else None,
                             per_sample=per_sample, ratios=ratios)


def _given_directions(directions, xt: torch.Tensor) -> list[torch.Tensor]:
    if directions is None:
        return []
    items = directions if isinstance(directions, (list, tuple)) else [directions]
    out = []
    for d in items:
        try:
            dt = torch.as_tensor(d, dtype=xt.dtype)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"a direction must be a tensor or array of numbers; got {type(d).__name__} ({exc}).") from exc
        if dt.shape == xt.shape[1:]:
            dt = dt.expand_as(xt)
        if dt.shape != xt.shape:
            raise InputError(f"a direction has shape {tuple(dt.shape)}; expected {tuple(xt.shape)} (one per "
                             f"sample) or {tuple(xt.shape[1:])} (shared).")
        out.append(_unit(dt.clone()))
    return out


# ----------------------------------------------------------------------------------------------
# T1/T2 on a real model: the functional gap of a plan, the drifts, the Lipschitz constants
# ----------------------------------------------------------------------------------------------

def _batch_list(batches) -> list:
    """``batches`` as a list (a single dict is one batch), so it can be run more than once."""
    return [batches] if isinstance(batches, Mapping) else list(batches)


def answer_logprob(model: nn.Module, batches: Iterable[Mapping] | Mapping, plan: SkipPlan | None = None,
                   targets=None) -> tuple[np.ndarray, np.ndarray]:
    """``log p(y_i)`` of the next token at each sample's last position, under ``plan`` (float64, nats).

    ``targets [n]``: the token id ``y_i`` of each sample (e.g. the encoded answer); ``None`` takes the
    model's own top token of this same forward (label-free, the score :func:`band.band_lipschitz` reads).
    Returns ``(logp [n], targets [n])``, samples in the order of ``batches``.
    """
    if plan is not None and not isinstance(plan, SkipPlan):
        raise InputError(f"plan must be a SkipPlan (sk.SkipPlan.vision_freeze(l), ...) or None; got {type(plan).__name__}.")
    want = None if targets is None else np.asarray(as_numpy(targets, "targets", dtype=np.int64), dtype=np.int64)
    logps, tops, seen = [], [], 0
    for inputs, layout in iter_batches(model, _batch_list(batches)):
        if plan is None:
            lp = last_logprobs(model, inputs, layout)
        else:
            with skipping(model, plan):
                lp = last_logprobs(model, inputs, layout)
        if want is None:
            y = lp.argmax(-1)
        else:
            if want.ndim != 1 or seen + layout.batch > want.size:
                raise InputError(f"targets must hold one token id per sample; got shape {want.shape} for at "
                                 f"least {seen + layout.batch} samples.")
            y = torch.as_tensor(want[seen:seen + layout.batch], device=lp.device)
            if bool(((y < 0) | (y >= lp.shape[-1])).any()):
                raise InputError(f"targets must be token ids in [0, {lp.shape[-1]}); got {y.tolist()}.")
        logps.append(lp.gather(1, y[:, None])[:, 0].cpu().numpy())
        tops.append(y.cpu().numpy())
        seen += layout.batch
    if want is not None and want.size != seen:
        raise InputError(f"targets holds {want.size} token ids for {seen} samples; pass one per sample.")
    return np.concatenate(logps), np.concatenate(tops).astype(np.int64)


def functional_gap(model: nn.Module, batches: Iterable[Mapping] | Mapping, plan: SkipPlan,
                   targets=None, reference: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Per sample, ``h_i(plan) - h_i`` with ``h_i = log p(y_i)`` the answer's log-probability (nats).

    The functional gap of THEORY.md, definition 3, before the expectation: ``[n]`` signed changes;
    ``|mean|`` is the gap of the expectation, ``abs`` what T1/T2 bound per sample. ``targets`` as in
    :func:`answer_logprob` (``None``: the model's own top token *without* the plan, kept fixed under it).
    ``reference``: the ``(logp, targets)`` that ``answer_logprob(model, batches, None, targets)`` returned
    for the same batches, to reuse one unskipped forward for many plans. A plan that skips nothing gives
    exactly 0.
    """
    if not isinstance(plan, SkipPlan):
        raise InputError(f"plan must be a SkipPlan (sk.SkipPlan.vision_freeze(l), ...); got {type(plan).__name__}.")
    items = _batch_list(batches)
    if reference is None:
        base, y = answer_logprob(model, items, None, targets)
    else:
        try:
            base, y = (np.asarray(r) for r in reference)
        except (TypeError, ValueError):
            raise InputError("reference must be the (logp, targets) pair answer_logprob returned.") from None
        if base.shape != y.shape or base.ndim != 1:
            raise InputError(f"reference must be the (logp [n], targets [n]) pair answer_logprob returned; got "
                             f"shapes {base.shape} and {y.shape}.")
    skipped, _ = answer_logprob(model, items, plan, y)
    return skipped - base


def _vision_rows(layout: BatchLayout) -> torch.Tensor:
    """``[B, |V|]`` positions of the vision tokens; every sample must hold the same non-zero number."""
    counts = layout.n_vision
    if bool((counts != counts[0]).any()) or int(counts[0]) == 0:
        raise InputError("need the same, non-zero number of vision tokens in every sample of a batch (one image "
                         "size per batch, an image in every prompt).")
    return layout.vision.nonzero()[:, 1].view(layout.batch, int(counts[0]))


def _gather(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return x.gather(1, rows[..., None].expand(*rows.shape, x.shape[-1]))


def vision_cos_dists(model: nn.Module, batches: Iterable[Mapping] | Mapping) -> np.ndarray:
    """``d[n, l, i] = d(x_{l-1}^(i), x_l^(i))``: cosine distance (in [0, 2]) of vision token ``i`` of sample
    ``n`` across decoder layer ``l`` (input vs output), float64, ``[n, L, |V|]``.

    ``sqrt(2 d[n, l].sum())`` is the drift ``||X_hat_l - X_hat_(l-1)||_F`` of sample n's normalised vision
    block across layer ``l``, the quantity of T1 (:func:`geometric_gap_bound`); ``d[n, a:b+1]`` is what
    :func:`band_gap_bound` takes for the band ``[a, b]``. Computed as ``|a_hat - b_hat|^2 / 2``.
    """
    bb = Backbone.of(model)
    out = []
    for inputs, layout in iter_batches(bb, _batch_list(batches)):
        rows = _vision_rows(layout)
        per_layer: dict[int, torch.Tensor] = {}

        def grab(l, x_in, x_out, kwargs, lay):
            a, b = _gather(x_in, rows).double(), _gather(x_out, rows).double()
            diff = a / a.norm(dim=-1, keepdim=True) - b / b.norm(dim=-1, keepdim=True)
            per_layer[l] = (0.5 * diff.square().sum(-1)).clamp(0.0, 2.0)

        run_forward(bb, inputs, layout, post=grab)
        out.append(torch.stack([per_layer[l] for l in range(bb.n_layers)], 1).cpu().numpy())
    d = np.concatenate(out)
    if not np.all(np.isfinite(d)):
        raise NumericalError("a vision row has zero norm or NaN; the cosine distance is undefined there.")
    return d


def skip_lipschitz(model: nn.Module, batches: Iterable[Mapping] | Mapping, *, layers: Sequence[int] | None = None,
                   n_random: int = 2, step: float = 1e-2, seed: int = 0) -> list[LipschitzEstimate]:
    """Per layer ``l``: the empirical Lipschitz constant (T1's ``alpha``) of the answer's log-probability
    as a function of the normalised vision block at layer ``l``'s *output*, where skipping layer ``l``
    for the vision tokens (``SkipPlan.vision_freeze(l)``: ``x_l^(V) := x_(l-1)^(V)``) acts.

    Score: ``log p(y_hat)``, ``y_hat`` the model's own top token unperturbed (label-free). The block
    ``X_hat [|V|, d]`` holds the unit-normalised vision rows of layer ``l``'s output; ``X_hat + h u``
    replaces them as ``r_i (x_hat_i + h u_i)``, ``r_i`` the rows' norms there. Directions (unit in the
    Frobenius norm, central differences, :func:`lipschitz_estimate`): the skip direction
    ``X_hat_(l-1) - X_hat_l`` first (``ratios[:, 0]``, ``along_given``), then ``n_random`` Gaussian ones.
    Differs from :func:`band.band_lipschitz`, which perturbs layer ``l``'s *input* along ``X_hat_l -
    X_hat_(l-1)``. After the last layer only the final norm of the last (text) position is read, so the
    ratios there are 0. A lower estimate of the true constant. One estimate per layer, pooled over batches.
    """
    bb = Backbone.of(model)
    chosen = list(range(bb.n_layers)) if layers is None else [as_int(l, "layer", minimum=0) for l in layers]
    bad = [l for l in chosen if l >= bb.n_layers]
    if bad:
        raise InputError(f"layers {bad} do not exist: this backbone has layers 0..{bb.n_layers - 1}.")
    parts: dict[int, list[LipschitzEstimate]] = {l: [] for l in chosen}
    for inputs, layout in iter_batches(bb, _batch_list(batches)):
        rows = _vision_rows(layout)
        states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def grab(l, x_in, x_out, kwargs, lay):
            states[l] = (_gather(x_in, rows).float(), _gather(x_out, rows).float())

        top = run_forward(bb, inputs, layout, post=grab, logits=True).argmax(-1)
        for l in chosen:
            x_in, x_out = states[l]
            norms = x_out.norm(dim=-1, keepdim=True)
            x_hat = x_out / norms
            skip_dir = x_in / x_in.norm(dim=-1, keepdim=True) - x_hat

            def score(block: torch.Tensor, l=l, norms=norms) -> torch.Tensor:
                def put(idx, x_in_, x_out_, kwargs, lay):
                    if idx != l:
                        return None
                    pick = rows[..., None].expand(*rows.shape, x_out_.shape[-1])
                    return x_out_.scatter(1, pick, (block * norms).to(x_out_.dtype))
                logits = run_forward(bb, inputs, layout, post=put, logits=True)
                return torch.log_softmax(logits.double(), -1).gather(1, top[:, None])[:, 0]

            given = skip_dir if bool((skip_dir.flatten(1).norm(dim=1) > 0).all()) else None
            parts[l].append(lipschitz_estimate(score, x_hat, directions=given, n_random=n_random, step=step,
                                               seed=seed))
    return [pool_estimates(parts[l]) for l in chosen]


def pool_estimates(parts: list[LipschitzEstimate]) -> LipschitzEstimate:
    """One :class:`LipschitzEstimate` from the estimates of several batches (samples concatenated). A batch
    whose skip direction was left out (a vision row that did not move) gets NaN in the given column."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.ratios.shape[1] for p in parts)
    ratios = np.concatenate([np.pad(p.ratios, ((0, 0), (width - p.ratios.shape[1], 0)), constant_values=np.nan)
                             for p in parts])
    per_sample = np.concatenate([p.per_sample for p in parts])
    given = [p.along_given for p in parts if p.along_given is not None]
    return replace(parts[0], max=float(per_sample.max()), quantile=float(np.quantile(per_sample, parts[0].level)),
                   along_given=max(given) if given else None, per_sample=per_sample, ratios=ratios)


# the finite-sample certificates (hoeffding_upper, hoeffding_mean_upper, clopper_pearson,
# wilson_interval) are defined in skipit_core.stats and imported above, so theory.<name> keeps working.
