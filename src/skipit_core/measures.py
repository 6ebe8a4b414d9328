"""The layer scores of popular skipping methods, computed on the same footing as the profile.

Every function here goes through the hook machinery of :mod:`skipit_core.capture` (one forward per
batch and ablation, hooks always removed, the model left as it was) and returns per-layer NumPy
arrays, 0-based: entry ``l`` scores decoder layer ``l`` (or, for block scores, the block starting at
layer ``l``).

=====================  ===========================================  ==================================
score                  what it measures                             paper
=====================  ===========================================  ==================================
block_influence        ``1 - E cos(x_in, x_out)`` over all tokens   ShortGPT, arXiv:2403.03853
angular_distance       angle between last-token states n apart      Gromov et al., arXiv:2403.17887
layer_contribution     KL when vision rows skip layer l             ShortV, arXiv:2504.00502
vtw_kl                 KL when text stops seeing vision from k on   VTW, arXiv:2405.13800
fastv_scores           attention received by each vision token      FastV, arXiv:2403.06764
=====================  ===========================================  ==================================

KL divergences are in nats, between next-token distributions at each sample's last non-padding
position, averaged over samples (log-softmax and sums in float64).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import theory
from .capture import LayerProfile
from .forward import BatchLayout, iter_batches, last_logprobs, run_forward
from .errors import InputError, UnsupportedModelError
from .models import Backbone, TokenKind, allowed_keys

__all__ = ["block_influence", "angular_distance", "layer_contribution", "vtw_kl", "fastv_scores",
           "FastVScores", "AttentionRemoval", "attention_removal"]

Batches = Iterable[Mapping[str, Any]] | Mapping[str, Any]


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(P || Q) = sum_v p_v (log p_v - log q_v)`` per row, float64 ``[B]``."""
    return F.kl_div(logq.double(), logp.double(), log_target=True, reduction="none").sum(-1)


def _mean(total: torch.Tensor, n: torch.Tensor, what: str) -> np.ndarray:
    if float(n) == 0:
        raise InputError(f"no sample had {what}; pass batches with images.")
    return (total / n).cpu().numpy()


# ----------------------------------------------------------------------------------- ShortGPT
def block_influence(profile: LayerProfile, modality: str = "all") -> np.ndarray:
    """ShortGPT block influence ``BI_l = 1 - E_{x,t}[ <x_in^t, x_out^t> / (|x_in^t| |x_out^t|) ]``.

    Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect",
    arXiv:2403.03853. The expectation runs over all tokens (``modality="all"``: text, vision and the
    sink; padding never counts), so ``BI_l`` is the profile's mean cosine distance of layer ``l``
    (range [0, 2]); a low BI marks a layer ShortGPT would remove. ``modality`` restricts the tokens.
    """
    return profile.mean_cos_dist(modality)


# ------------------------------------------------------------------------------ Gromov et al.
def angular_distance(model: nn.Module, batches: Batches, n: int = 1, *, per_sample: bool = False) -> np.ndarray:
    """Angular distance of blocks of ``n`` layers, ``[n_layers - n + 1]`` (``per_sample=True``: one row per
    sample, ``[n_samples, n_layers - n + 1]``, in the order of the batches; their mean is the default).

    Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers", arXiv:2403.17887:
    ``d(x^l, x^{l+n}) = (1/pi) arccos( <x_l^T, x_{l+n}^T> / (|x_l^T| |x_{l+n}^T|) )``, in [0, 1], where
    ``x_l^T`` is the last token's state at the *input* of layer ``l`` and ``x_{l+n}^T`` the *output* of
    layer ``l + n - 1`` (read by a hook, before the final norm), averaged over samples. Entry ``l``
    scores the block of layers ``[l, l + n)``; Gromov et al. prune the block with the smallest value.
    The angle is computed as ``2 atan2(|a_hat - b_hat|, |a_hat + b_hat|)`` in float64 (stable near 0).
    """
    bb = Backbone.of(model)
    L = bb.n_layers
    if not 1 <= n <= L:
        raise InputError(f"block size n must be in [1, {L}]; got {n}.")
    total, count, rows_out = torch.zeros(L - n + 1, dtype=torch.float64), 0, []
    for inputs, layout in iter_batches(bb, batches):
        rows = torch.arange(layout.batch, device=layout.kinds.device)
        states: dict[int, torch.Tensor] = {}

        def post(l, x_in, x_out, kwargs, layout, rows=rows, states=states):
            states[l] = x_in[rows, layout.last_pos].double()
            if l == L - 1:
                states[L] = x_out[rows, layout.last_pos].double()

        run_forward(bb, inputs, layout, post=post)
        x = F.normalize(torch.stack([states[l] for l in range(L + 1)], 1), dim=-1)  # [B, L+1, d]
        a, b = x[:, : L - n + 1], x[:, n:]
        angle = 2 * torch.atan2((a - b).norm(dim=-1), (a + b).norm(dim=-1)) / math.pi
        total += angle.sum(0).cpu()
        count += layout.batch
        rows_out.append(angle.cpu())
    return torch.cat(rows_out).numpy() if per_sample else (total / count).numpy()


# -------------------------------------------------------------------------------------- ShortV

def _kl_per_variant(bb: Backbone, batches, variants: list[dict], per_sample: bool = False) -> np.ndarray:
    """``E KL(P_full || P_variant)`` of the last-token distribution for each variant (a dict of
    ``pre=``/``post=`` hooks for :func:`last_logprobs`), averaged over samples holding vision tokens; nats.
    ``per_sample=True``: the KLs themselves, ``[n_samples with vision tokens, len(variants)]``."""
    total, n = torch.zeros(len(variants), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    rows: list[torch.Tensor] = []
    for inputs, layout in iter_batches(bb, batches):
        if not layout.has_vision:
            continue
        has = (layout.n_vision > 0).double()
        base = last_logprobs(bb, inputs, layout)
        kls = torch.stack([_kl(base, last_logprobs(bb, inputs, layout, **hooks)) for hooks in variants], -1)
        total += (kls * has.to(base.device)[:, None]).sum(0).cpu()
        n += has.sum().cpu()
        rows.append(kls[(layout.n_vision > 0).to(kls.device)].cpu())
    if per_sample:
        _mean(total, n, "vision tokens")  # the same error when no sample holds vision tokens
        return torch.cat(rows).numpy()
    return _mean(total, n, "vision tokens")

def layer_contribution(model: nn.Module, batches: Batches, layers: Sequence[int] | None = None, *,
                       per_sample: bool = False) -> np.ndarray:
    """ShortV layer contribution ``LC_l = E_x KL(P_full(. | x) || P_l(. | x))``, ``[len(layers)]``.

    Yuan et al. 2025, "ShortV: Efficient Multimodal Large Language Models by Freezing Visual Tokens in
    Ineffective Layers", arXiv:2504.00502. ``P_l`` is the next-token distribution at the last position
    when the vision tokens skip layer ``l`` (a forward hook restores the vision rows of layer ``l``'s
    output to its input; text rows are updated as usual). Averaged over samples holding vision tokens;
    in nats. ShortV freezes vision tokens in the layers with the smallest LC. The last layer's LC is 0
    by construction (no later layer reads its vision rows). One extra forward per layer and batch.
    ``per_sample=True``: the KL of each sample holding vision tokens, ``[n_samples, len(layers)]`` (batch
    order; its mean over samples is the default).
    """
    bb = Backbone.of(model)
    layers = list(range(bb.n_layers)) if layers is None else [int(l) for l in layers]
    def freeze(target):
        def hook(l, x_in, x_out, kwargs, layout):
            return torch.where(layout.vision[..., None], x_in, x_out) if l == target else None
        return {"post": hook}

    return _kl_per_variant(bb, batches, [freeze(t) for t in layers], per_sample)


# ----------------------------------------------------------------------------------------- VTW
def _mask_like(allowed: torch.Tensor, original: torch.Tensor | None) -> torch.Tensor:
    """``allowed [B, 1, q, kv]`` in the format of the mask the layer was given (bool or additive)."""
    if original is None or original.dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=original.dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(original.dtype).min)


def _withdraw_vision(kwargs: dict, layout: BatchLayout) -> dict:
    """``kwargs`` with an attention mask in which text and sink queries cannot see vision keys."""
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        raise UnsupportedModelError("vtw_kl edits the 4-D attention mask; flash attention gets none. Use "
                                    "model.set_attn_implementation('sdpa') or 'eager'.")
    B, N = layout.batch, layout.seq
    allowed = allowed_keys(mask, B, N, N, layout.kinds.device)
    queries = (layout.kinds == TokenKind.TEXT) | (layout.kinds == TokenKind.SINK)
    cut = queries[:, None, :, None] & layout.vision[:, None, None, :]
    return dict(kwargs, attention_mask=_mask_like(allowed & ~cut, mask))


def vtw_kl(model: nn.Module, batches: Batches, ks: Sequence[int] | None = None, *,
           per_sample: bool = False) -> np.ndarray:
    """Visual-token-withdrawal KL ``E_x KL(P_full || P_k)`` for each withdrawal layer ``k`` in ``ks``
    (default ``0..n_layers``; ``k = n_layers`` withdraws nothing, so its KL is 0).

    Lin et al., "Boosting Multimodal Large Language Models with Visual Tokens Withdrawal for Rapid
    Inference", arXiv:2405.13800 (AAAI 2025). ``P_k`` is the last-position next-token distribution when
    vision tokens are withdrawn from layer ``k`` on: a pre-hook on every layer ``l >= k`` edits the
    attention mask it receives so text (and sink) queries cannot attend vision keys. This is a
    *measurement*: the vision rows are still computed, so nothing is faster; the skip engine
    (:mod:`skipit_core.skip`) removes the rows. Averaged over samples holding vision tokens; nats.
    VTW withdraws from the smallest ``k`` whose KL is below a threshold. ``per_sample=True``: the KL of
    each sample holding vision tokens, ``[n_samples, len(ks)]`` (batch order; its mean is the default).
    """
    bb = Backbone.of(model)
    ks = list(range(bb.n_layers + 1)) if ks is None else [int(k) for k in ks]
    def withdraw(k):
        def hook(l, x_in, kwargs, layout):
            return _withdraw_vision(kwargs, layout) if l >= k else None
        return {"pre": hook}

    return _kl_per_variant(bb, batches, [withdraw(k) for k in ks], per_sample)


# --------------------------------------------------------------------------------------- FastV
@dataclass
class FastVScores:
    """Attention each vision token receives in one layer, per sample.

    ``scores[i]`` (float64, one entry per vision token of sample ``i``, in sequence order) and
    ``positions[i]`` (their sequence positions in the padded batch ``i`` came from).
    """

    layer: int
    query: str
    scores: list[np.ndarray]
    positions: list[np.ndarray]

    @property
    def mass(self) -> np.ndarray:
        """``[n_samples]``: per sample, the attention the vision tokens receive in this layer, summed over them,
        ``sum_j s_j`` (with ``query="all"``: the mean over queries of the attention mass on vision keys)."""
        return np.array([float(s.sum()) for s in self.scores])

    @property
    def ranking(self) -> list[np.ndarray]:
        """Per sample, indices into ``scores[i]`` from most to least attended (stable for ties)."""
        return [np.argsort(-s, kind="stable") for s in self.scores]

    def keep(self, ratio: float) -> list[np.ndarray]:
        """Per sample, the positions FastV keeps when it prunes a fraction ``1 - ratio`` of vision tokens."""
        if not 0 <= ratio <= 1:
            raise InputError(f"ratio must be in [0, 1]; got {ratio}.")
        return [np.sort(p[r[: math.ceil(ratio * len(r))]]) for p, r in zip(self.positions, self.ranking)]


def fastv_scores(model: nn.Module, batches: Batches, layer: int, query: str = "all") -> FastVScores:
    """FastV attention scores of the vision tokens in decoder layer ``layer``.

    Chen et al. 2024, "An Image is Worth 1/2 Tokens After Layer 2", arXiv:2403.06764. The score of
    vision token ``j`` is ``s_j = (1/H) sum_h (1/|Q|) sum_{q in Q} A_h[q, j]`` with ``A_h`` the layer's
    attention probabilities (recomputed from its queries/keys, see
    :meth:`Backbone.attention_probs`) and ``Q`` all non-padding queries (``query="all"``, the
    paper's average attention received) or only the last position (``query="last"``, FastV's
    released code). FastV with ``K = 2`` ranks with layer index ``layer = 1`` and prunes the lowest-
    ranked tokens from layer 2 on. The forward stops after ``layer``.
    """
    bb = Backbone.of(model)
    if not 0 <= layer < bb.n_layers:
        raise InputError(f"layer must be in [0, {bb.n_layers - 1}]; got {layer}.")
    if query not in ("all", "last"):
        raise InputError(f"query must be 'all' or 'last'; got {query!r}.")
    scores, positions = [], []
    for inputs, layout in iter_batches(bb, batches):
        got: dict[str, torch.Tensor] = {}

        def post(l, x_in, x_out, kwargs, layout, got=got):
            if l != layer:
                return None
            idx = layout.last_pos[:, None] if query == "last" else None
            probs = bb.attention_probs(l, x_in, kwargs, idx)[0].mean(1)  # [B, Q, N]
            if query == "all":
                real = (layout.kinds != TokenKind.PAD).float()
                probs = (probs * real[..., None]).sum(1) / real.sum(1, keepdim=True)
            got["s"] = probs.reshape(layout.batch, layout.seq)
            return None

        run_forward(bb, inputs, layout, post=post, stop_after=layer)
        s, vision = got["s"].double().cpu().numpy(), layout.vision.cpu().numpy()
        for b in range(layout.batch):
            pos = np.nonzero(vision[b])[0]
            scores.append(s[b, pos])
            positions.append(pos)
    return FastVScores(layer, query, scores, positions)


@dataclass(frozen=True)
class AttentionRemoval:
    """T5 measured on a real layer, one entry per (sample, text query that sees a vision key).

    ``tau``: the query's attention mass on vision keys, averaged over heads; ``change``: the exact
    norm of the change of the layer's attention output (after ``W_O``) when the vision keys are
    removed and each head's softmax is renormalised over the text keys; ``bound``: the T5 bound on it
    (:func:`skipit_core.theory.layer_attention_removal_bound`, ``form`` as given); ``output_norm``: the
    norm of the attention output itself, the scale to read ``change`` against. ``n_left_out``: queries
    that see a vision key but were left out because some head's float32 softmax row holds no mass on
    any text key (every text probability underflowed to 0: the head attends to vision only, and the
    text-only softmax cannot be formed from the probabilities).
    """

    layer: int
    form: str
    tau: np.ndarray
    change: np.ndarray
    bound: np.ndarray
    output_norm: np.ndarray
    n_left_out: int = 0

    @property
    def n(self) -> int:
        return len(self.change)


def attention_removal(model: nn.Module, batches: Batches, layer: int, form: str = "per_head") -> AttentionRemoval:
    """T5 on real attention: how much removing the vision keys changes each text query's attention
    output in decoder ``layer``, next to the bound the theorem gives from the same attention rows.

    Attention rows are recomputed from the layer's queries and keys (:meth:`Backbone.attention_probs`),
    values from :meth:`Backbone.attention_values` (key-value heads repeated to the query heads), ``W_O`` is its ``o_proj``
    weight. Keys are each sample's own positions (padding left out). Text queries whose causal mask
    hides every vision key (``tau = 0``, e.g. a question placed before the image) are left out: their
    change is 0 and so is their bound. Queries with a head whose softmax row has no mass on text keys are left out and
    counted in ``n_left_out`` (see :class:`AttentionRemoval`). Memory per sample is ``T x H x N x head_dim`` floats; the norms
    of ``W_O`` are computed once. The forward stops after ``layer``.
    """
    bb = Backbone.of(model)
    if not 0 <= layer < bb.n_layers:
        raise InputError(f"layer must be in [0, {bb.n_layers - 1}]; got {layer}.")
    w_o = bb.attention(layer).o_proj.weight.detach().double().cpu().numpy()
    w_o_norm, head_norms = theory.output_projection_norms(w_o, w_o.shape[1] // bb.head_dim)
    taus, changes, bounds, norms, left_out = [], [], [], [], 0
    for inputs, layout in iter_batches(bb, batches):
        got: dict[str, torch.Tensor] = {}

        def post(l, x_in, x_out, kwargs, layout, got=got):
            if l != layer:
                return None
            got["probs"] = bb.attention_probs(l, x_in, kwargs, layout.text_idx)[0]  # [B, H, T, N]
            got["values"] = bb.attention_values(l, x_in)  # [B, H, N, hd]
            return None

        run_forward(bb, inputs, layout, post=post, stop_after=layer)
        probs, values = got["probs"].double().cpu().numpy(), got["values"].double().cpu().numpy()
        vision, valid = layout.vision.cpu().numpy(), layout.text_valid.cpu().numpy()
        real = (layout.kinds != TokenKind.PAD).cpu().numpy()
        for b in range(layout.batch):
            rows = probs[b].transpose(1, 0, 2)[valid[b]][..., real[b]]  # [T_b, H, N_b]: real keys only
            rows = rows / rows.sum(-1, keepdims=True)  # float32 softmax rows, renormalised in float64
            keys, vals = vision[b][real[b]], values[b][:, real[b]]
            tau = (rows * keys).sum(-1).mean(-1)
            text_mass = (rows * ~keys.astype(bool)).sum(-1).min(-1)  # [T_b]: the smallest over heads
            left_out += int(((tau > 0) & (text_mass <= 0)).sum())
            keep = (tau > 0) & (text_mass > 0)
            rows = rows[keep]
            if not len(rows):
                continue
            v = np.broadcast_to(vals, (len(rows), *vals.shape))
            taus.append(tau[keep])
            changes.append(np.atleast_1d(theory.layer_attention_removal_change(rows, v, keys, w_o)))
            bounds.append(np.atleast_1d(theory.layer_attention_removal_bound(
                rows, v, keys, w_o, form, w_o_norm=w_o_norm, head_norms=head_norms).value))
            heads = np.einsum("thn,hnd->thd", rows, vals).reshape(len(rows), -1)
            norms.append(np.linalg.norm(heads @ w_o.T, axis=-1))
    if not changes:
        raise InputError(f"no text query sees a vision key in layer {layer}: pass inputs with images and text "
                         "after them." + (f" ({left_out} that do were left out: a head of theirs puts no float32 "
                                          "mass on text keys.)" if left_out else ""))
    return AttentionRemoval(layer, form, *(np.concatenate(x) for x in (taus, changes, bounds, norms)), left_out)
