"""One streaming forward pass per batch that reduces hidden states into per-layer statistics.

:func:`profile` hooks every decoder layer of a supported VLM, reads each layer's input ``x_in``
(``args[0]``) and output ``x_out`` (the returned tensor) and reduces them on the fly, in float32 on
the model's device, into the mergeable sums of a :class:`LayerProfile`:

* per layer and modality (``"text"``, ``"vision"``, ``"sink"``; ``"all"`` pools the three; padding is
  ignored): count, mean and variance of the cosine distance
  ``d(x_in, x_out) = 1 - <a, b> / (|a| |b|)`` (range [0, 2]), a fixed-bin histogram of ``d``, exact
  token counts of ``d > eps`` on a fixed grid of ``eps``, running min/max and the mean norm ratio
  ``|x_out| / |x_in|``;
* per layer and modality, per-sample aggregates (a *sample* is one row of a batch) so that tail
  probabilities come with confidence bounds over independent samples, not over tokens of one image;
* per layer the vision attention ratio VAR (attention mass text queries put on vision keys) from
  the layer's own queries and keys (:meth:`Backbone.project_qk`) and the mask it received
  (:func:`allowed_keys`); no ``output_attentions``, any attention implementation;
* optionally (``keep=K``) pooled states of the first ``K`` samples for the information chapters.

Memory does not grow with the number of samples (beyond ``keep``): every statistic is a sum, a count,
a min/max or a histogram, so ``a.merge(b)`` of two shards equals one pass over both.

Forward-pass plumbing (batch layout, hooks, running a forward) lives in :mod:`skipit_core.forward`;
this module holds the statistics only. Hooks never synchronise with the host (no ``.item()``, no
branching on tensor values); the one synchronisation per batch is the NaN/inf check after the forward.

Every statistic is stored under a name (:data:`TOKEN_STATS`, :data:`SAMPLE_STATS`, ``var_sum.<variant>``
...); profiles saved by skipit 0.1.0 before the names existed (positional ``tok``/``samp``/``var``
arrays) load through :meth:`LayerProfile.load` unchanged, their VAR under the ``*_all`` variants.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .errors import InputError, NumericalError, UnsupportedModelError
from .forward import BatchLayout, iter_batches, model_device_dtype, run_forward
from .models import Backbone, TokenKind
from .stats import hoeffding_mean_upper, hoeffding_upper

__all__ = [
    "profile", "LayerProfile", "MODALITIES", "DEFAULT_EPS", "N_BINS", "VAR_VARIANTS",
]

MODALITIES = ("text", "vision", "sink")  # index = TokenKind code; "all" pools the three
_QUERY_MODALITIES = (*MODALITIES, "all")
N_BINS = 2000
#: default eps grid of the exact tail counts: {1, 1.5, 2, 3, 5, 7} x 10^k for k = -4..-1, then 1, 1.5
DEFAULT_EPS: tuple[float, ...] = tuple(
    sorted({round(m * 10.0**k, 10) for k in range(-4, 0) for m in (1, 1.5, 2, 3, 5, 7)} | {1.0, 1.5})
)
#: VAR variants (see :meth:`LayerProfile.vision_attention`): over the text queries that may attend a
#: vision key ("mean", "uniform"), the last text token ("last"), over every text query ("*_all")
VAR_VARIANTS = ("mean", "last", "uniform", "mean_all", "uniform_all")
#: per-token sums, ``[n_layers, 3]`` over MODALITIES: tokens, sum d, sum d^2, sum |x_out|/|x_in|
TOKEN_STATS = ("token_count", "sum_d", "sum_d2", "sum_norm_ratio")
#: per-sample sums, ``[n_layers, 4, n_eps]`` over MODALITIES + "all": sum of F_eps(x) (the sample's
#: fraction of tokens with d > eps), sum of F_eps(x)^2, samples with some token above eps
SAMPLE_STATS = ("sample_frac_sum", "sample_frac_sumsq", "sample_any")


def _cos_dist(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Row-wise ``d = 1 - <a,b>/(|a||b|)`` in [0, 2], computed as ``|a_hat - b_hat|^2 / 2`` (accurate for
    small d, exactly 0 for equal rows). Returns ``d``, the chord ``|a_hat - b_hat| = sqrt(2 d)`` and both
    norms. A zero row has no direction: ``cos := 0``, ``d = 1`` (torch's ``cosine_similarity`` convention)."""
    na, nb = torch.linalg.vector_norm(a, dim=-1), torch.linalg.vector_norm(b, dim=-1)
    diff = a / na.clamp_min(1e-30)[..., None] - b / nb.clamp_min(1e-30)[..., None]
    d = (0.5 * diff.square().sum(-1)).clamp(0.0, 2.0).masked_fill((na == 0) | (nb == 0), 1.0)
    return d, (2.0 * d).sqrt(), na, nb


# ---------------------------------------------------------------------------------------------------
# the accumulator (device tensors) behind profile()
# ---------------------------------------------------------------------------------------------------
class _Accumulator:
    """Running sums on the model's device; one slice per layer, updated by the post hook."""

    def __init__(self, bb: Backbone, device: torch.device, n_bins: int, eps: Sequence[float],
                 attention: bool, keep: int):
        L, E, f64 = bb.n_layers, len(eps), torch.float64
        self.bb, self.device, self.n_bins, self.attention, self.keep = bb, device, n_bins, attention, keep
        self.eps = torch.tensor(eps, dtype=torch.float32, device=device)
        self.tok = torch.zeros(L, 4, len(TOKEN_STATS), dtype=f64, device=device)  # slots x TOKEN_STATS
        self.hist = torch.zeros(L, 4 * n_bins, dtype=torch.int64, device=device)
        self.dmin = torch.full((L, 4), math.inf, dtype=f64, device=device)
        self.dmax = torch.full((L, 4), -math.inf, dtype=f64, device=device)
        self.gt = torch.zeros(L, 4, E, dtype=f64, device=device)
        self.samp = torch.zeros(L, 4, E, len(SAMPLE_STATS), dtype=f64, device=device)  # .. x SAMPLE_STATS
        self.samp_n = torch.zeros(L, 4, dtype=f64, device=device)
        V = len(VAR_VARIANTS)
        self.var = torch.zeros(L, V, 2, dtype=f64, device=device)  # VAR_VARIANTS x (sum, sum of squares)
        self.var_n = torch.zeros(L, V, dtype=f64, device=device)  # samples counted per variant
        self.bad = torch.zeros(L, 4, dtype=f64, device=device)
        self.n_samples = 0
        self.pooled: dict[str, list[np.ndarray]] = {k: [] for k in _POOLED}
        self._buf: dict[str, torch.Tensor] = {}

    # -- per batch -------------------------------------------------------------------------------
    def begin(self, layout: BatchLayout) -> None:
        self.layout = layout
        self.bad.zero_()
        m = max(0, min(layout.batch, self.keep - self.n_samples))
        L, d = self.bb.n_layers, self.bb.hidden_size
        self._buf = {k: torch.full((m, L, d), math.nan, device=self.device) for k in _POOLED} if m else {}

    def end(self, layout: BatchLayout) -> None:
        if bool(self.bad.any()):  # the one host sync per batch
            bad = self.bad.cpu().numpy()
            layer = int(np.nonzero(bad.any(1))[0][0])
            kinds = [_QUERY_MODALITIES[k] for k in range(3) if bad[layer, k] > 0]
            raise NumericalError(
                f"the output of layer {layer} holds NaN/inf for {', '.join(kinds)} tokens (batch starting at "
                f"sample {self.n_samples}). Run the model in float32 or bfloat16 (float16 overflows in many "
                "VLMs) and check the inputs (pixel_values normalised, no NaN).")
        for key, buf in self._buf.items():
            self.pooled[key].append(buf.cpu().numpy())
        self.n_samples += layout.batch

    # -- the hook ----------------------------------------------------------------------------------
    def post(self, l: int, x_in: torch.Tensor, x_out: torch.Tensor, kwargs: dict, layout: BatchLayout) -> None:
        if x_in.shape[:2] != layout.kinds.shape:
            raise UnsupportedModelError(
                f"layer {l} sees {tuple(x_in.shape[:2])} positions but input_ids has {tuple(layout.kinds.shape)}; "
                "this class changes the sequence inside the model, which capture does not support.")
        a, b = x_in.float(), x_out.float()
        d, chord, na, nb = _cos_dist(a, b)
        self._token_sums(l, d, chord, nb / na, nb, layout)
        self._sample_sums(l, d, layout)
        if self.attention and layout.has_vision and layout.n_text_max > 0:
            self._vision_attention(l, x_in, kwargs, layout)
        if self._buf:
            self._pool(l, a, b, layout)

    def _token_sums(self, l, d, chord, ratio, nb, layout) -> None:
        slot = layout.slot.reshape(-1)
        d64 = d.reshape(-1).double()
        vals = torch.stack([torch.ones_like(d64), d64, d64 * d64, ratio.reshape(-1).double()], -1)
        self.tok[l] += torch.zeros(4, 4, dtype=torch.float64, device=d.device).index_add_(0, slot, vals).to(self.device)
        bins = (chord.reshape(-1) * (self.n_bins / 2)).long().clamp_(0, self.n_bins - 1) + slot * self.n_bins
        hist = torch.zeros(4 * self.n_bins, dtype=torch.int64, device=d.device)
        self.hist[l] += hist.index_add_(0, bins, torch.ones_like(bins)).to(self.device)
        for acc, how in ((self.dmin, "amin"), (self.dmax, "amax")):
            acc[l] = acc[l].scatter_reduce(0, slot.to(self.device), d64.to(self.device), how)
        bad = (~torch.isfinite(nb)).reshape(-1).double()
        self.bad[l] += torch.zeros(4, dtype=torch.float64, device=d.device).index_add_(0, slot, bad).to(self.device)

    def _sample_sums(self, l, d, layout) -> None:
        kinds = layout.kinds
        onehot = torch.stack([kinds == TokenKind.TEXT, kinds == TokenKind.VISION, kinds == TokenKind.SINK,
                              kinds != TokenKind.PAD], -1).float()  # [B, N, 4]
        above = (d[..., None] > self.eps.to(d.device)).float()  # [B, N, E]
        counts = torch.einsum("bnk,bne->bke", onehot, above).double()  # [B, 4, E] exact integers
        n_tok = onehot.sum(1).double()  # [B, 4]
        frac = counts / n_tok.clamp_min(1)[..., None]
        stats = torch.stack([frac, frac * frac, (counts > 0).double()], -1).sum(0)  # [4, E, 3]
        self.gt[l] += counts.sum(0).to(self.device)
        self.samp[l] += stats.to(self.device)
        self.samp_n[l] += (n_tok > 0).sum(0).to(self.device)

    def _vision_attention(self, l, x_in, kwargs, layout) -> None:
        """Per-sample VAR of every variant, from the layer's own attention over text queries ``t``:
        ``mass_t = mean_h sum_{j in V} A_h[t, j]`` and ``uniform_t = |V_t| / |K_t|``; "seeing" queries are
        those whose allowed keys include a vision key (removing vision changes nothing for the others)."""
        probs, allowed = self.bb.attention_probs(l, x_in, kwargs, layout.text_idx)  # [B,H,T,N], [B,T,N]
        vision = layout.vision.float()
        mass = torch.einsum("bhtn,bn->bt", probs, vision) / probs.shape[1]  # mean over heads
        n_allowed = (allowed & (layout.kinds != TokenKind.PAD)[:, None]).sum(-1).clamp_min(1)
        n_vision_seen = allowed.float() @ vision[..., None]  # [B, T, 1]
        uniform = n_vision_seen[..., 0] / n_allowed
        valid = layout.text_valid.float()
        seeing = valid * (n_vision_seen[..., 0] > 0).float()
        last_col = (layout.n_text - 1).clamp_min(0)[:, None]
        has_vision = layout.n_vision > 0
        means, counted = [], []
        for variant in VAR_VARIANTS:
            if variant == "last":
                means.append(mass.gather(1, last_col)[:, 0])
                counted.append(has_vision & (layout.n_text > 0))
                continue
            weights = valid if variant.endswith("_all") else seeing
            n = weights.sum(1)
            values = mass if variant.startswith("mean") else uniform
            means.append((values * weights).sum(1) / n.clamp_min(1))
            counted.append(has_vision & (n > 0))
        mask = torch.stack(counted, -1).double()  # [B, V]
        per_sample = torch.stack(means, -1).double() * mask
        self.var[l] += torch.stack([per_sample.sum(0), (per_sample * per_sample).sum(0)], -1).to(self.device)
        self.var_n[l] += mask.sum(0).to(self.device)

    def _pool(self, l, a, b, layout) -> None:
        m = next(iter(self._buf.values())).shape[0]
        vis = layout.vision[:m].float()
        rows = torch.arange(m, device=a.device)
        has_text = (layout.n_text[:m] > 0)[:, None]
        for name, x in (("in", a[:m]), ("out", b[:m])):
            self._buf[f"vision_{name}"][:, l] = (torch.einsum("bn,bnd->bd", vis, x) / vis.sum(1)[:, None]).to(self.device)
            last = x[rows, layout.last_text[:m]].masked_fill(~has_text, math.nan)
            self._buf[f"text_{name}"][:, l] = last.to(self.device)

    # -- result ------------------------------------------------------------------------------------
    def result(self, meta: dict) -> "LayerProfile":
        L, nb = self.bb.n_layers, self.n_bins
        np64 = lambda t: t.cpu().numpy()  # noqa: E731
        arrays = {name: np64(self.tok[:, :3, i]) for i, name in enumerate(TOKEN_STATS)}
        arrays.update({name: np64(self.samp[..., i]) for i, name in enumerate(SAMPLE_STATS)})
        arrays["token_count"] = arrays["token_count"].round().astype(np.int64)
        arrays["sample_any"] = arrays["sample_any"].round().astype(np.int64)
        arrays.update({
            "hist": np64(self.hist.view(L, 4, nb)[:, :3]),
            "min_d": np64(self.dmin[:, :3]), "max_d": np64(self.dmax[:, :3]),
            "n_above": np64(self.gt[:, :3]).round().astype(np.int64),
            "sample_n": np64(self.samp_n).round().astype(np.int64),
            "n_samples": np.array(self.n_samples, dtype=np.int64),
        })
        for i, variant in enumerate(VAR_VARIANTS):
            arrays[f"var_sum.{variant}"] = np64(self.var[:, i, 0])
            arrays[f"var_sumsq.{variant}"] = np64(self.var[:, i, 1])
            arrays[f"var_n.{variant}"] = np64(self.var_n[:, i]).round().astype(np.int64)
        pooled = {k: np.concatenate(v, 0) for k, v in self.pooled.items() if v}
        return LayerProfile(meta, arrays, pooled)


_POOLED = ("vision_in", "vision_out", "text_in", "text_out")


def profile(model: nn.Module, batches: Iterable[Mapping[str, Any]] | Mapping[str, Any], *,
            attention: bool = True, keep: int = 0, n_bins: int = N_BINS,
            eps_grid: Sequence[float] = DEFAULT_EPS) -> "LayerProfile":
    """Profile every decoder layer of ``model`` over ``batches`` in one streaming pass.

    Parameters
    ----------
    model : a supported transformers VLM (see :class:`Backbone`), in any dtype/device.
    batches : iterable of dicts of model inputs exactly as the processor returns them (a single dict
        counts as one batch). Each is checked with :meth:`Backbone.check_inputs` and run once under
        ``torch.no_grad`` with ``use_cache=False``.
    attention : compute the vision attention ratio (VAR) per layer (costs the layer's q/k projections
        again plus ``T x N`` scores per head).
    keep : pooled states (vision-token mean and last text token, input and output of every layer,
        float32 on CPU) of the first ``keep`` samples, in :attr:`LayerProfile.pooled`.
    n_bins : histogram bins; edges are uniform in the chord ``c = |a_hat - b_hat| = sqrt(2 d)`` over
        [0, 2], i.e. ``d`` edges ``2 (j / n_bins)^2`` over [0, 2]: bin width in ``d`` is about
        ``2 sqrt(2 d) / n_bins`` (2.8e-5 at d = 1e-4, 2.8e-4 at d = 0.01, 2.8e-3 at d = 1 for 2000 bins).
    eps_grid : thresholds with exact token counts of ``d > eps`` and per-sample fractions (tail
        probabilities with confidence bounds are available on this grid only).

    Raises
    ------
    UnsupportedModelError for classes :class:`Backbone` does not know; InputError for an empty
    ``batches`` or inputs the class would mishandle; NumericalError when a layer's output holds
    NaN/inf (naming the layer and modality).
    """
    bb = Backbone.of(model)
    if keep < 0 or n_bins < 1:
        raise InputError(f"keep must be >= 0 and n_bins >= 1; got keep={keep}, n_bins={n_bins}.")
    eps = sorted(float(e) for e in eps_grid)
    if not eps or eps[0] < 0 or eps[-1] > 2:
        raise InputError(f"eps_grid must be non-empty values in [0, 2]; got {eps_grid!r}.")
    device, dtype = model_device_dtype(model)
    acc = _Accumulator(bb, device, n_bins, eps, attention, keep)
    for inputs, layout in iter_batches(bb, batches):
        acc.begin(layout)
        run_forward(bb, inputs, layout, post=acc.post)
        acc.end(layout)
    meta = {"model_class": type(model).__name__, "family": bb.family.name, "n_layers": bb.n_layers,
            "hidden_size": bb.hidden_size, "dtype": str(dtype).replace("torch.", ""), "n_bins": n_bins,
            "eps_grid": eps, "keep": keep, "attention": attention, "image_token_id": bb.image_token_id,
            "format": PROFILE_FORMAT}
    return acc.result(meta)


# ---------------------------------------------------------------------------------------------------
# the result
# ---------------------------------------------------------------------------------------------------
PROFILE_FORMAT = 2  # named statistics; profiles without "format" in their meta are the positional format 1
_EXTREMES = {"min_d": np.minimum, "max_d": np.maximum}  # every other array is a sum: merge adds
_MERGE_META = ("model_class", "n_layers", "hidden_size", "n_bins", "eps_grid", "attention")


@dataclass(repr=False)
class LayerProfile:
    """Per-layer, per-modality statistics of one or more :func:`profile` passes (mergeable).

    Modalities: ``"text"``, ``"vision"``, ``"sink"`` (the first attended token of each sample,
    BOS/attention sink) and ``"all"`` (the three pooled; padding never counts). Layer ``l``'s
    statistics compare *its* input ``x_in`` with *its* output ``x_out`` (0-based layers).
    Arrays returned by the methods have shape ``[n_layers]``.
    """

    meta: dict
    arrays: dict[str, np.ndarray]
    pooled: dict[str, np.ndarray] = field(default_factory=dict)

    # -- metadata ----------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.meta["n_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.meta["hidden_size"])

    @property
    def model_class(self) -> str:
        return str(self.meta["model_class"])

    @property
    def n_samples(self) -> int:
        """Number of samples (batch rows) profiled."""
        return int(self.arrays["n_samples"])

    @property
    def eps_grid(self) -> np.ndarray:
        """The thresholds with exact tail counts and per-sample fractions."""
        return np.asarray(self.meta["eps_grid"], dtype=np.float64)

    @property
    def bin_edges(self) -> np.ndarray:
        """Histogram edges in ``d``: ``2 (j / n_bins)^2`` for j = 0..n_bins (uniform in sqrt(2 d))."""
        n = int(self.meta["n_bins"])
        return 2.0 * (np.arange(n + 1) / n) ** 2

    def __repr__(self) -> str:
        counts = ", ".join(f"{m} {int(self.count(m)[0])}" for m in MODALITIES)
        var = "VAR" if self._var_counted() else "no VAR"
        pooled = f", pooled {len(next(iter(self.pooled.values())))}" if self.pooled else ""
        return (f"LayerProfile({self.model_class}, {self.n_layers} layers, d={self.hidden_size}, "
                f"{self.n_samples} samples; tokens per layer: {counts}; {var}{pooled})")

    # -- helpers -----------------------------------------------------------------------------------
    def _index(self, modality: str, with_all: bool = True) -> list[int]:
        if modality == "all" and with_all:
            return [0, 1, 2]
        if modality in MODALITIES:
            return [MODALITIES.index(modality)]
        raise InputError(f"unknown modality {modality!r}; use one of {', '.join(_QUERY_MODALITIES)}.")

    def _require(self, modality: str) -> None:
        if self.count(modality).max(initial=0) == 0:
            if modality == "vision":
                raise InputError(
                    "this profile saw no image tokens, so vision statistics are undefined: pass images "
                    f"with the prompts and check the model's image_token_id ({self.meta.get('image_token_id')}) "
                    "matches the processor's image token.")
            raise InputError(f"this profile saw no {modality} tokens.")

    def _tok(self, modality: str) -> np.ndarray:
        idx = self._index(modality)
        return np.stack([self.arrays[name][:, idx].sum(1) for name in TOKEN_STATS], -1)  # [L, 4]

    def _var_counted(self) -> bool:
        return any(v.max(initial=0) > 0 for k, v in self.arrays.items() if k.startswith("var_n."))

    # -- geometric statistics ----------------------------------------------------------------------
    def count(self, modality: str = "all") -> np.ndarray:
        """Tokens seen per layer (``int64 [n_layers]``)."""
        return self._tok(modality)[:, 0].round().astype(np.int64)

    def mean_cos_dist(self, modality: str = "all") -> np.ndarray:
        """``E[d(x_in, x_out)]`` over the modality's tokens, per layer (range [0, 2])."""
        self._require(modality)
        t = self._tok(modality)
        return t[:, 1] / t[:, 0]

    def var_cos_dist(self, modality: str = "all") -> np.ndarray:
        """Population variance over tokens ``E[d^2] - E[d]^2`` (sums kept in float64)."""
        self._require(modality)
        t = self._tok(modality)
        return np.maximum(t[:, 2] / t[:, 0] - (t[:, 1] / t[:, 0]) ** 2, 0.0)

    def norm_ratio(self, modality: str = "all") -> np.ndarray:
        """Mean over tokens of ``|x_out| / |x_in|`` per layer."""
        self._require(modality)
        t = self._tok(modality)
        return t[:, 3] / t[:, 0]

    def histogram(self, modality: str = "all") -> np.ndarray:
        """Token counts ``int64 [n_layers, n_bins]`` over :attr:`bin_edges`."""
        return self.arrays["hist"][:, self._index(modality)].sum(1)

    def quantile(self, q: float | Sequence[float], modality: str = "all") -> np.ndarray:
        """Token quantiles of ``d`` per layer from the histogram (``[n_layers]``, or ``[len(q), n_layers]``).

        Linear interpolation in the chord ``sqrt(2 d)`` inside the bin, clipped to the exact running
        min/max; error at most one bin width (see :func:`profile`). q=0/1 give the exact min/max.
        """
        self._require(modality)
        qs = np.atleast_1d(np.asarray(q, dtype=np.float64))
        if np.any((qs < 0) | (qs > 1)):
            raise InputError(f"quantile levels must be in [0, 1]; got {q!r}.")
        hist, idx = self.histogram(modality).astype(np.float64), self._index(modality)
        lo, hi = self.arrays["min_d"][:, idx].min(1), self.arrays["max_d"][:, idx].max(1)
        n_bins = hist.shape[1]
        out = np.empty((len(qs), self.n_layers))
        for li in range(self.n_layers):
            cdf = np.cumsum(hist[li])
            target = np.maximum(qs * cdf[-1], 1e-12)
            j = np.minimum(np.searchsorted(cdf, target, side="left"), n_bins - 1)
            below = np.where(j > 0, cdf[np.maximum(j - 1, 0)], 0.0)
            chord = (j + (target - below) / np.maximum(hist[li][j], 1)) * 2.0 / n_bins
            out[:, li] = np.clip(0.5 * chord**2, lo[li], hi[li])
        out[qs == 0] = lo
        out[qs == 1] = hi
        return out[0] if np.ndim(q) == 0 else out

    # -- proximal statistics -----------------------------------------------------------------------
    def _grid_index(self, eps: float) -> int | None:
        hits = np.nonzero(np.isclose(self.eps_grid, eps, rtol=1e-9, atol=0.0))[0]
        return int(hits[0]) if len(hits) else None

    def tail_prob(self, eps: float, modality: str = "all", confidence: float | None = None
                  ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """``P(d > eps)`` per layer.

        Without ``confidence``: the pooled token-level estimate (tokens with ``d > eps`` / tokens),
        exact for ``eps`` on :attr:`eps_grid`, otherwise interpolated from the histogram (error at most
        the mass of one bin).

        With ``confidence`` (e.g. 0.95; ``eps`` must be on the grid): returns ``(estimate, upper)`` for
        the *per-sample* quantity ``p = E_x[F(x)]``, ``F(x) = |{i in S(x): d_i > eps}| / |S(x)|`` the
        fraction of the modality's tokens of sample ``x`` above ``eps`` (samples without such tokens
        are left out). ``estimate`` is the mean of the ``n`` per-sample fractions (it weights samples
        equally, so it differs from the pooled estimate when samples have different token counts) and
        ``upper`` the one-sided Hoeffding bound ``estimate + sqrt(ln(1/(1 - confidence)) / (2 n))``,
        valid when samples are independent draws from the input distribution.
        """
        self._require(modality)
        k = self._grid_index(eps)
        if confidence is None:
            if k is not None:
                return self.arrays["n_above"][:, self._index(modality), k].sum(1) / self.count(modality)
            return self._hist_tail(eps, modality)
        if k is None:
            raise InputError(f"confidence bounds need eps on the profile's grid {self.eps_grid.tolist()}; "
                             "pass eps_grid=[...] to profile() to choose it.")
        if not 0 < confidence < 1:
            raise InputError(f"confidence must be in (0, 1); got {confidence}.")
        m = _QUERY_MODALITIES.index(modality)
        total, n = self.arrays["sample_frac_sum"][:, m, k], self.arrays["sample_n"][:, m]
        return total / n, np.asarray(hoeffding_mean_upper(total, n, confidence), dtype=np.float64)

    def any_exceeds(self, eps: float, modality: str = "all", confidence: float | None = None
                    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Fraction of samples in which *some* token of the modality has ``d > eps`` (eps on the grid);
        with ``confidence``, ``(estimate, Hoeffding upper bound)`` over samples (T2's per-sample form)."""
        self._require(modality)
        k = self._grid_index(eps)
        if k is None:
            raise InputError(f"eps must be on the profile's grid {self.eps_grid.tolist()}.")
        m = _QUERY_MODALITIES.index(modality)
        total, n = self.arrays["sample_any"][:, m, k], self.arrays["sample_n"][:, m]
        if confidence is None:
            return total / n
        return total / n, np.asarray(hoeffding_upper(total, n, confidence), dtype=np.float64)

    def sample_count(self, modality: str = "all") -> int:
        """Samples holding at least one token of the modality (the ``n`` of the confidence bounds)."""
        return int(self.arrays["sample_n"][0, _QUERY_MODALITIES.index(modality)]) if self.n_layers else 0

    def _hist_tail(self, eps: float, modality: str) -> np.ndarray:
        hist = self.histogram(modality).astype(np.float64)
        n_bins = hist.shape[1]
        pos = math.sqrt(2.0 * min(max(eps, 0.0), 2.0)) * n_bins / 2.0  # eps in bin units of the chord
        j = min(int(pos), n_bins - 1)
        above = hist[:, j + 1:].sum(1) + hist[:, j] * (j + 1 - pos)
        return above / hist.sum(1)

    # -- cross-modal statistics --------------------------------------------------------------------
    def vision_attention(self, variant: str = "mean") -> np.ndarray:
        """Vision attention ratio VAR per layer, averaged over heads, then queries, then samples.

        A text query ``t`` (TEXT-kind position: BOS/sink and vision queries excluded) puts attention
        mass ``m_t = mean_h sum_{j in V} A_h[t, j]`` on the vision keys ``V``. Its *uniform share* is
        ``u_t = |V_t| / |K_t|``, the fraction of vision keys among the non-padding keys it may attend.

        * ``"mean"`` (default): ``m_t`` averaged over the text queries that may attend at least one vision
          key (``|V_t| > 0``: the queries for which removing the vision tokens changes anything; with the
          image first that is every text query after it, with a question before the image only the
          tokens after the image). Samples without such a query are left out.
        * ``"uniform"``: ``u_t`` over the same queries; ``"ratio"`` = mean / uniform (1 = attention
          spread as if vision keys were ordinary keys).
        * ``"last"``: ``m_t`` of the last text token only (the one predicting the answer).
        * ``"mean_all"``, ``"uniform_all"``, ``"ratio_all"``: the same over *every* text query (queries
          that cannot see the image count as 0, so these depend on the prompt layout).

        Per-sample values are averaged over samples (each sample weighs the same). Profiles saved by
        skipit 0.1.0 hold only ``"last"`` and the ``*_all`` variants (their ``"mean"`` was ``"mean_all"``).
        """
        for ratio, (num, den) in {"ratio": ("mean", "uniform"), "ratio_all": ("mean_all", "uniform_all")}.items():
            if variant == ratio:
                return self.vision_attention(num) / self.vision_attention(den)
        if variant not in VAR_VARIANTS:
            raise InputError(f"variant must be one of {VAR_VARIANTS + ('ratio', 'ratio_all')}; got {variant!r}.")
        if not self.meta.get("attention", True):
            raise InputError("this profile was made with attention=False; profile again with attention=True.")
        self._require("vision")
        if f"var_n.{variant}" not in self.arrays:
            raise InputError(f"this profile was saved by skipit 0.1.0, before VAR variant {variant!r} existed; "
                             "use variant='mean_all' / 'uniform_all' (its old 'mean' / 'uniform') or profile again.")
        n = self.arrays[f"var_n.{variant}"]
        if n.max(initial=0) == 0:
            raise InputError(f"no sample had both vision tokens and text queries for VAR {variant!r}; it is undefined.")
        return self.arrays[f"var_sum.{variant}"] / n

    # -- tidy frame --------------------------------------------------------------------------------
    @property
    def frame(self) -> pd.DataFrame:
        """Tidy table with columns ``layer, modality, statistic, value``.

        Statistics per modality present: ``count``, ``mean_cos_dist``, ``var_cos_dist``,
        ``norm_ratio``, ``q05``, ``q25``, ``q50``, ``q75``, ``q95`` and ``tail_prob@<eps>`` for every eps of
        the grid; plus (modality ``"text"``, the queries) ``vision_attention_mean|last|uniform``.
        """
        layers = np.arange(self.n_layers)
        parts = []

        def add(modality: str, stat: str, values: np.ndarray) -> None:
            parts.append(pd.DataFrame({"layer": layers, "modality": modality, "statistic": stat,
                                       "value": np.asarray(values, dtype=np.float64)}))

        for mod in _QUERY_MODALITIES:
            if self.count(mod).max(initial=0) == 0:
                continue
            add(mod, "count", self.count(mod))
            for name in ("mean_cos_dist", "var_cos_dist", "norm_ratio"):
                add(mod, name, getattr(self, name)(mod))
            for q, row in zip((5, 25, 50, 75, 95), self.quantile([0.05, 0.25, 0.5, 0.75, 0.95], mod)):
                add(mod, f"q{q:02d}", row)
            for e in self.eps_grid:
                add(mod, f"tail_prob@{e:g}", self.tail_prob(e, mod))
        if self.meta.get("attention", True) and self._var_counted():
            for variant in (v for v in VAR_VARIANTS if f"var_n.{v}" in self.arrays):
                add("text", f"vision_attention_{variant}", self.vision_attention(variant))
        return pd.concat(parts, ignore_index=True)

    # -- merge / save / load -----------------------------------------------------------------------
    def merge(self, other: "LayerProfile") -> "LayerProfile":
        """The profile of both passes (a new object): sums and counts add, min/max combine, pooled
        states concatenate up to ``keep``. Equal to one pass over both inputs (integer counters
        exactly, float sums up to float64 rounding)."""
        if not isinstance(other, LayerProfile):
            raise InputError(f"can only merge LayerProfile objects, got {type(other).__name__}.")
        for key in _MERGE_META:
            if self.meta.get(key) != other.meta.get(key):
                raise InputError(f"cannot merge profiles with different {key}: {self.meta.get(key)!r} vs "
                                 f"{other.meta.get(key)!r}; profile all shards with the same model and options.")
        if set(self.arrays) != set(other.arrays):
            raise InputError("cannot merge a profile saved before VAR was split by query set (skipit 0.1.0) "
                             "with a newer one; profile all shards with the same version.")
        arrays = {k: _EXTREMES.get(k, np.add)(v, other.arrays[k]) for k, v in self.arrays.items()}
        meta = dict(self.meta, keep=max(self.meta["keep"], other.meta["keep"]))
        pooled = {}
        for key in sorted(set(self.pooled) | set(other.pooled)):
            parts = [p.pooled[key] for p in (self, other) if key in p.pooled]
            pooled[key] = np.concatenate(parts, 0)[: meta["keep"]]
        return LayerProfile(meta, arrays, pooled)

    def save(self, path: str | Path) -> Path:
        """Write one ``.npz`` (arrays, pooled states and JSON metadata; loadable without pickle)."""
        path = Path(path)
        payload = {f"a__{k}": v for k, v in self.arrays.items()}
        payload.update({f"p__{k}": v for k, v in self.pooled.items()})
        payload["meta"] = np.array(json.dumps(self.meta))
        with open(path, "wb") as handle:
            np.savez_compressed(handle, **payload)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LayerProfile":
        """Read a profile written by :meth:`save` (either storage format)."""
        with np.load(Path(path), allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {k[3:]: data[k] for k in data.files if k.startswith("a__")}
            pooled = {k[3:]: data[k] for k in data.files if k.startswith("p__")}
        if "format" not in meta:
            arrays, meta = _from_format_1(arrays), dict(meta, format=PROFILE_FORMAT)
        return cls(meta, arrays, pooled)


def _from_format_1(old: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Name the positional arrays of a skipit 0.1.0 profile: ``tok [L, 3, 4]`` (TOKEN_STATS), ``samp
    [L, 4, E, 3]`` (SAMPLE_STATS), ``var [L, 3, 2]`` over (mean of all text queries, last, uniform share
    of all text queries) x (sum, sum of squares), ``var_n [L]``; ``gt``, ``dmin``, ``dmax``, ``samp_n``."""
    arrays = {name: old["tok"][..., i] for i, name in enumerate(TOKEN_STATS)}
    arrays["token_count"] = arrays["token_count"].round().astype(np.int64)
    arrays.update({name: old["samp"][..., i] for i, name in enumerate(SAMPLE_STATS)})
    arrays["sample_any"] = arrays["sample_any"].round().astype(np.int64)
    arrays.update(hist=old["hist"], min_d=old["dmin"], max_d=old["dmax"], n_above=old["gt"],
                  sample_n=old["samp_n"], n_samples=old["n_samples"])
    for i, variant in enumerate(("mean_all", "last", "uniform_all")):
        arrays[f"var_sum.{variant}"] = old["var"][:, i, 0]
        arrays[f"var_sumsq.{variant}"] = old["var"][:, i, 1]
        arrays[f"var_n.{variant}"] = old["var_n"]
    return arrays
