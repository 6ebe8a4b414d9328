"""Applying a :class:`SkipPlan` to a live model: layer wrappers, per-forward row sets, KV-cache ledger.

How it works (one context = one :class:`Session`):

* every decoder layer whose mode is not FULL is swapped, in ``backbone.layers``, for a thin
  :class:`SkipLayer` that keeps the original layer as its child ``layer``; on exit the originals are put
  back (same objects), so the model is exactly as before;
* a forward pre-hook on the VLM (the module that receives ``input_ids``) records the vision positions;
  a pre-hook on the text model turns them, once per forward, into a :class:`Step` holding the kept-row
  indices of every sample, padded to the batch maximum (padding slots are flagged invalid and their
  outputs discarded);
* a TEXT layer gathers the kept rows of ``hidden_states``, of the rotary ``(cos, sin)`` (M-RoPE
  included: they are per-position tensors) and of the attention mask (rows and key columns), calls the
  real layer on them and scatters its output back: the removed rows keep their states and are simply
  not computed. A SKIP layer returns its input. A FREEZE layer runs the layer's own modules with queries
  and MLP for text rows only and keys/values for all rows;
* each KV cache met under a plan gets a :class:`Ledger` recording the number of positions fed so far
  (its *global length*) and, for layers whose cache holds a subset of them, the global position of every
  cached column. The cache's ``get_seq_length`` / ``get_mask_sizes`` / ``get_query_offset`` are patched
  on the instance, for the duration of the context, to report the global length, so transformers computes
  positions and masks for the whole sequence even when layer 0 holds text only or nothing. Masks for
  TEXT layers are gathered from that full mask with the ledger's columns.

Host synchronisation: the per-layer path has none. Sizing the gathered tensors needs the largest
number of kept rows in the batch: that is read once per forward with more than one new token (one
``.tolist()`` of two integers per prefill); one-token decode steps need no sync at all.
"""

from __future__ import annotations

import copy
import types
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InputError, PlanError, SkipitError
from ..models import Backbone
from .plan import LayerMode, SkipPlan

__all__ = ["skipping", "Session", "SkipLayer", "active_session", "LEDGER_CACHE_LAYERS"]

_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, Session]" = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------- helpers
def _gather_rows(x: torch.Tensor, idx: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``x[b, idx[b, j], ...]`` along ``dim`` (1 for [B, N, ...] tensors); broadcasts a batch of 1."""
    shape = list(x.shape)
    shape[0] = idx.shape[0]
    x = x.expand(shape)
    index = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:])
    return x.gather(dim, index)


def _bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """A 4-D attention mask as booleans (True = may attend), whatever its encoding."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


#: attention implementations whose mask encoding skipit writes: SDPA takes booleans (True = may attend),
#: eager *adds* the mask to the scores (0 = may attend, the dtype's minimum = may not)
MASK_IMPLEMENTATIONS = ("sdpa", "eager")


def attention_implementation(backbone: Backbone) -> str:
    """The attention implementation the backbone's layers run (``config._attn_implementation``)."""
    config = getattr(backbone.attention(0), "config", backbone.text_config)
    return str(getattr(config, "_attn_implementation", None) or "sdpa")


def _encode_mask(allowed: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """``allowed [B, 1, Q, K]`` booleans in the encoding ``implementation`` expects."""
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    return allowed


def _cache_layer(cache: Any, layer_idx: int) -> Any:
    layers = getattr(cache, "layers", None)
    return layers[layer_idx] if layers is not None and layer_idx < len(layers) else None


def _stored_len(cache: Any, layer_idx: int) -> int:
    """Columns cached for ``layer_idx`` (a shape read, no sync)."""
    obj = _cache_layer(cache, layer_idx)
    keys = getattr(obj, "keys", None)
    if obj is None or not getattr(obj, "is_initialized", False) or not isinstance(keys, torch.Tensor):
        return 0
    return 0 if keys.numel() == 0 else keys.shape[-2]


def _window(cache: Any, layer_idx: int) -> int | None:
    """The sliding window of cache layer ``layer_idx`` if it truncates what it stores, else None."""
    obj = _cache_layer(cache, layer_idx)
    if obj is None or not getattr(obj, "is_sliding", False) or getattr(obj, "record_past", False):
        return None
    return getattr(obj, "sliding_window", None)


# ------------------------------------------------------------------------------------- KV ledger
@dataclass
class Ledger:
    """What a KV cache holds under a plan.

    ``total``: positions fed so far (the global length every position and mask is computed from);
    ``cols[l]``: ``LongTensor[B, C_l]``, the global position of each column cached by layer ``l``
    (-1 for padding slots), kept only for layers whose cache holds a subset of the positions. Layers
    without an entry hold every position (the last ``w-1`` for sliding-window layers), or nothing.
    """

    total: int
    plan: SkipPlan
    cols: dict[int, torch.Tensor] = field(default_factory=dict)


_PATCHED = ("get_seq_length", "get_mask_sizes", "get_query_offset", "reorder_cache",
            "batch_repeat_interleave", "batch_select_indices", "crop")


def _global_seq_length(self: Any, layer_idx: int = 0) -> int:
    return self._skipit_ledger.total


def _global_query_offset(self: Any, layer_idx: int = 0) -> int:
    return self._skipit_ledger.total


def _global_mask_sizes(self: Any, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
    total = self._skipit_ledger.total
    window = getattr(_cache_layer(self, layer_idx), "sliding_window", None)
    if window is not None and getattr(_cache_layer(self, layer_idx), "is_sliding", False) and total >= window:
        return window - 1 + query_length, total - window + 1
    return total + query_length, 0


def _reorder(self: Any, beam_idx: torch.LongTensor) -> None:
    type(self).reorder_cache(self, beam_idx)
    cols = self._skipit_ledger.cols
    for key in cols:
        cols[key] = cols[key].index_select(0, beam_idx.to(cols[key].device))


def _repeat(self: Any, repeats: int) -> None:
    type(self).batch_repeat_interleave(self, repeats)
    cols = self._skipit_ledger.cols
    for key in cols:
        cols[key] = cols[key].repeat_interleave(repeats, dim=0)


def _select(self: Any, indices: torch.Tensor) -> None:
    type(self).batch_select_indices(self, indices)
    cols = self._skipit_ledger.cols
    for key in cols:
        cols[key] = cols[key][indices]


def _crop(self: Any, tokens_to_remove: int) -> None:
    raise PlanError("cropping a KV cache filled under a skip plan is not supported (assisted / speculative "
                    "decoding); generate without an assistant inside `skipping`.")


def _patch_cache(cache: Any, ledger: Ledger) -> None:
    cache._skipit_ledger = ledger
    for name, fn in zip(_PATCHED, (_global_seq_length, _global_mask_sizes, _global_query_offset, _reorder,
                                   _repeat, _select, _crop)):
        setattr(cache, name, types.MethodType(fn, cache))


def _unpatch_cache(cache: Any) -> None:
    """On leaving the context: a cache filled under a plan holds fewer columns in some layers than its
    global length, so every later use outside a context with the same plan would be silently wrong.
    Its length queries raise instead (a new ``skipping`` with the same plan patches them again)."""
    plan = cache._skipit_ledger.plan

    def refuse(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise PlanError(f"this KV cache was filled inside `skipping(model, {plan})`; its layers hold different "
                        "positions, so it is only valid under that plan. Decode inside the same context (e.g. call "
                        "model.generate(...) within it), or start a new cache.")

    for name in _PATCHED:
        setattr(cache, name, types.MethodType(refuse, cache))


# --------------------------------------------------------------------------------- one forward
@dataclass
class Rows:
    """Kept (non-vision) rows of one forward: ``idx [B, K]`` indices into the N new rows, kept rows last and
    in order, padding slots (invalid, ``valid`` False) first; ``padded`` is False only when it is known
    without a sync that every slot is valid."""

    idx: torch.Tensor
    valid: torch.Tensor
    k: int
    padded: bool


class Step:
    """State of one forward of the text model: sizes, vision rows, the cache and its ledger, memos."""

    def __init__(self, session: "Session", batch: int, n_new: int, past: int,
                 vision: torch.Tensor | None, cache: Any, ledger: Ledger | None):
        self.session, self.batch, self.n_new, self.past = session, batch, n_new, past
        self.vision, self.cache, self.ledger = vision, cache, ledger
        self._rows: Rows | None = None
        self._memo: dict[Any, Any] = {}

    # ---- rows
    def rows(self) -> Rows:
        """Kept rows, computed once per forward (one host sync when more than one token is new)."""
        if self._rows is None:
            self._rows = self._compute_rows()
        return self._rows

    def _compute_rows(self) -> Rows:
        keep = ~self.vision
        if self.n_new == 1:  # decode step: K = 1, validity stays on the device
            return Rows(torch.zeros_like(keep, dtype=torch.long), keep, 1, True)
        counts = keep.sum(1)
        most, least = torch.stack([counts.max(), counts.min()]).tolist()  # the one sync per prefill
        if self.past == 0 and least == self.n_new:
            raise InputError(
                f"the plan {self.session.plan} acts on vision tokens, but these inputs hold none "
                f"(no input_ids == image_token_id {self.session.backbone.image_token_id}). Pass the images "
                "(the processor's whole output) or run text-only inputs outside `skipping`."
            )
        order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)  # removed rows first, kept rows last
        idx = order[:, self.n_new - most:]
        return Rows(idx, keep.gather(1, idx), most, most != least)

    def positions(self) -> torch.Tensor:
        """Global positions of the kept slots (-1 for padding slots)."""
        rows = self.rows()
        return torch.where(rows.valid, rows.idx + self.past, -1)

    # ---- cache
    def ensure_ledger(self, cache: Any) -> Ledger | None:
        """The ledger of ``cache``; adopts a cache transformers created inside this forward."""
        if cache is None:
            return None
        if self.ledger is None or self.cache is not cache:
            self.cache = cache
            self.ledger = self.session.ledger_for(cache, fresh=True)
        return self.ledger

    def past_columns(self, layer_idx: int) -> torch.Tensor:
        """Global positions of the columns layer ``layer_idx`` has cached before this forward, ``[B, C]``."""
        device = self.vision.device
        if self.cache is None:
            return torch.empty(self.batch, 0, dtype=torch.long, device=device)
        cols = self.ledger.cols.get(layer_idx)
        if cols is not None:
            return cols
        stored = _stored_len(self.cache, layer_idx)
        return torch.arange(self.past - stored, self.past, device=device).expand(self.batch, stored)

    def commit_columns(self, layer_idx: int, cols: torch.Tensor) -> None:
        """Record what layer ``layer_idx``'s cache holds after its update."""
        if self.cache is None:
            return
        window = _window(self.cache, layer_idx)
        if window is not None and cols.shape[1] > window - 1:
            cols = cols[:, cols.shape[1] - (window - 1):]
        self.ledger.cols[layer_idx] = cols

    # ---- gathered inputs
    def gather_rotary(self, pe: Any) -> Any:
        """Kept rows of the rotary ``(cos, sin)`` (``[B or 1, N, head_dim]``; M-RoPE already merged)."""
        if pe is None:
            return None
        key = ("pe", id(pe[0]))
        if key not in self._memo:
            if not (isinstance(pe, tuple) and len(pe) == 2 and pe[0].dim() == 3 and pe[0].shape[1] == self.n_new):
                raise SkipitError(f"unexpected position_embeddings layout {[tuple(p.shape) for p in pe]}; "
                                  "expected (cos, sin) of shape [batch, seq, head_dim].")
            self._memo[key] = tuple(_gather_rows(p, self.rows().idx) for p in pe)
        return self._memo[key]

    def gather_position_ids(self, position_ids: Any) -> Any:
        """Kept rows of ``position_ids`` given to layers (``[B, N]`` or ``[3, B, N]``); others pass through."""
        if not isinstance(position_ids, torch.Tensor) or position_ids.shape[-1] != self.n_new:
            return position_ids
        idx = self.rows().idx
        if position_ids.dim() == 2:
            return _gather_rows(position_ids, idx)
        if position_ids.dim() == 3:
            p = position_ids.expand(position_ids.shape[0], self.batch, self.n_new)
            return p.gather(2, idx.unsqueeze(0).expand(p.shape[0], *idx.shape))
        return position_ids

    def text_mask(self, layer_idx: int, hf_mask: torch.Tensor | None
                  ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Mask for a TEXT layer and the global positions of its key columns after this forward.

        Queries are the kept rows; keys are the layer's cached columns plus the kept rows. ``None`` (SDPA's
        own causal path) when that is exact: no mask from transformers, nothing cached, no padding slot.
        """
        rows = self.rows()
        past = self.past_columns(layer_idx)
        cols = torch.cat([past, self.positions()], dim=1)
        if hf_mask is None and past.shape[1] == 0 and not rows.padded and self.session.implementation == "sdpa":
            return None, cols
        own = past.shape[1] + torch.arange(rows.k, device=cols.device)
        if past.shape[1]:  # decode steps: per-layer columns, cheap to build
            return self._encoded(self._allowed(hf_mask, cols, own)), cols
        key = ("text", id(hf_mask))  # prefill: every TEXT layer shares it (hf_mask lives through the forward)
        if key not in self._memo:
            self._memo[key] = self._encoded(self._allowed(hf_mask, cols, own))
        return self._memo[key], cols

    def freeze_mask(self, hf_mask: torch.Tensor | None, kv_len: int) -> torch.Tensor:
        """Mask for a FREEZE layer: text queries over all ``kv_len`` columns (which hold every position)."""
        key = ("freeze", id(hf_mask), kv_len)
        if key not in self._memo:
            end = self.past + self.n_new
            cols = torch.arange(end - kv_len, end, device=self.vision.device).expand(self.batch, kv_len)
            own = self.rows().idx + self.past - (end - kv_len)
            self._memo[key] = self._encoded(self._allowed(hf_mask, cols, own=own))
        return self._memo[key]

    def _encoded(self, allowed: torch.Tensor) -> torch.Tensor:
        return _encode_mask(allowed, self.session.implementation, self.session.dtype)

    def _allowed(self, hf_mask: torch.Tensor | None, cols: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """``[B, 1, K, C]`` booleans: may kept query ``j`` attend column ``c`` (global position ``cols[b, c]``).

        Read from transformers' mask over the whole sequence (its last column is the last new position);
        plain causal order when it passed none. Padding slots attend to their own column ``own`` only, so
        no softmax row is empty.
        """
        rows = self.rows()
        qpos = rows.idx + self.past
        col_ok = cols >= 0
        if hf_mask is None:
            allowed = (cols[:, None, :] <= qpos[:, :, None]) & col_ok[:, None, :]
        else:
            full = _bool_mask(hf_mask)[:, 0, -self.n_new:, :]
            kv = full.shape[-1]
            rel = cols - (self.past + self.n_new - kv)
            col_ok = col_ok & (rel >= 0)
            picked = _gather_rows(full, rows.idx)  # [B, K, kv]
            index = rel.clamp(0, kv - 1)[:, None, :].expand(-1, rows.k, -1)
            allowed = picked.gather(2, index) & col_ok[:, None, :]
        if rows.padded:
            own = own.expand(self.batch, rows.k)[..., None]
            allowed = allowed.scatter(2, own, allowed.gather(2, own) | ~rows.valid[..., None])
        return allowed[:, None]


def _scatter_rows(x: torch.Tensor, rows: Rows, y: torch.Tensor, x_kept: torch.Tensor) -> torch.Tensor:
    """``x`` with the kept rows replaced by ``y`` (padding slots keep their input ``x_kept``)."""
    if rows.padded:
        y = torch.where(rows.valid[..., None], y, x_kept)
    return x.scatter(1, rows.idx[..., None].expand_as(y), y)


# ------------------------------------------------------------------------------- layer wrapper
class SkipLayer(nn.Module):
    """Stands in for decoder layer ``layer_index`` while a plan is active; ``layer`` is the original.

    Attribute reads it does not own (``attention_type``, ``layer_idx`` ...) go to the original layer.
    """

    wraps_decoder_layer = True  # :meth:`Backbone.decoder_layer` looks through it

    def __init__(self, layer: nn.Module, layer_index: int, mode: LayerMode, session: "Session"):
        super().__init__()
        self.layer = layer
        self.skip_index = layer_index
        self.skip_mode = mode
        self._session_ref = weakref.ref(session)
        # state_dict / load_state_dict / save_pretrained inside the context use the keys of the model
        # outside it (``layers.N.self_attn...``, not ``layers.N.layer.self_attn...``)
        self.register_state_dict_post_hook(_drop_wrapper_prefix)
        self.register_load_state_dict_pre_hook(_add_wrapper_prefix)

    def __deepcopy__(self, memo: dict) -> nn.Module:
        """A copy of the model made inside the context is one of the model outside it."""
        return copy.deepcopy(self.layer, memo)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "layer":
                raise
            return getattr(super().__getattr__("layer"), name)

    def extra_repr(self) -> str:
        return f"index={self.skip_index}, mode={self.skip_mode.value}"

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise SkipitError(f"{type(self.layer).__name__} was called with positional arguments after "
                              "hidden_states; skipit only knows transformers' keyword calling convention.")
        session = self._session_ref()
        step = session.current_step(hidden_states)
        step.ensure_ledger(kwargs.get("past_key_values"))
        if self.skip_mode is LayerMode.SKIP:
            return hidden_states
        if self.skip_mode is LayerMode.TEXT:
            return _run_text(self.layer, self.skip_index, step, hidden_states, kwargs)
        return _run_freeze(self.layer, self.skip_index, step, hidden_states, kwargs)


def _drop_wrapper_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    inner = prefix + "layer."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)
    for key in [k for k in getattr(state_dict, "_metadata", {}) if k.startswith(inner[:-1])]:
        state_dict._metadata[prefix + key[len(inner):]] = state_dict._metadata.pop(key)


def _add_wrapper_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    inner = prefix + "layer."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


class _Hook:
    """A session hook; a deep copy of the model made inside the context gets a no-op in its place."""

    def __init__(self, fn: Any):
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> Any:
        return _no_hook


def _no_hook(*args: Any, **kwargs: Any) -> None:
    return None


def _run_text(layer: nn.Module, index: int, step: Step, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The layer on the kept (text) rows only; removed rows keep their states and stay out of its cache."""
    rows = step.rows()
    if rows.k == 0:
        return x
    x_kept = _gather_rows(x, rows.idx)
    mask, cols = step.text_mask(index, kwargs.get("attention_mask"))
    call = dict(kwargs, attention_mask=mask,
                position_embeddings=step.gather_rotary(kwargs.get("position_embeddings")),
                position_ids=step.gather_position_ids(kwargs.get("position_ids")))
    y = layer(x_kept, **call)
    step.commit_columns(index, cols)
    return _scatter_rows(x, rows, y, x_kept)


def _run_freeze(layer: nn.Module, index: int, step: Step, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """ShortV-style layer: K/V from every row (all cached), query + MLP for text rows, vision rows unchanged."""
    bb, rows = step.session.backbone, step.rows()
    position_embeddings = kwargs["position_embeddings"]
    normed = bb.input_norm(index, x)
    q, k = bb.project_qk(index, normed, position_embeddings, _gather_rows(normed, rows.idx),
                         step.gather_rotary(position_embeddings))
    v = bb.project_values(index, normed)
    cache = kwargs.get("past_key_values")
    if cache is not None:
        k, v = cache.update(k, v, bb.attention(index).layer_idx)
    if rows.k == 0:
        return x
    out = bb.attend(index, q, k, v, step.freeze_mask(kwargs.get("attention_mask"), k.shape[-2]))
    x_kept = _gather_rows(x, rows.idx)
    return _scatter_rows(x, rows, bb.finish_layer(index, x_kept, out), x_kept)


# ---------------------------------------------------------------------------------- the session
class Session:
    """One active plan on one model: installs wrappers and hooks, tracks the current forward."""

    def __init__(self, backbone: Backbone, plan: SkipPlan):
        self.backbone, self.plan = backbone, plan
        self.modes = plan.modes(backbone.n_layers)
        self.implementation = attention_implementation(backbone)
        self.dtype = next(backbone.text_model.parameters()).dtype
        self.depth = 1
        self.step: Step | None = None
        self._pending_ids: torch.Tensor | None = None
        self._originals: dict[int, nn.Module] = {}
        self._handles: list[Any] = []
        self._caches: "weakref.WeakSet[Any]" = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"Session({self.plan}, {self.backbone})"

    # ---- install / uninstall
    def install(self) -> None:
        """Swap the non-FULL layers for wrappers and register the hooks (nothing for a no-op plan)."""
        if all(mode is LayerMode.FULL for mode in self.modes):
            return
        bb = self.backbone
        for index, mode in enumerate(self.modes):
            if mode is not LayerMode.FULL:
                self._originals[index] = bb.layers[index]
                bb.layers[index] = SkipLayer(bb.layers[index], index, mode, self)
        outer = getattr(bb.model, "model", bb.model)
        self._handles.append(outer.register_forward_pre_hook(_Hook(self._capture_ids), with_kwargs=True))
        self._handles.append(bb.text_model.register_forward_pre_hook(_Hook(self._begin), with_kwargs=True))
        self._handles.append(bb.text_model.register_forward_hook(_Hook(self._end)))

    def uninstall(self) -> None:
        """Put the original layers back, remove hooks, unpatch caches. Safe to call twice."""
        for index, layer in self._originals.items():
            self.backbone.layers[index] = layer
        self._originals.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for cache in list(self._caches):
            _unpatch_cache(cache)
        self.step, self._pending_ids = None, None

    # ---- hooks
    def _capture_ids(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Records the input ids and runs the same input check as :func:`skipit_core.profile`."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._pending_ids = ids if isinstance(ids, torch.Tensor) else None
        if self._pending_ids is not None:
            self.backbone.check_inputs(dict(kwargs, input_ids=ids))

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("inputs_embeds")
        x = x if x is not None else kwargs.get("input_ids", args[0] if args else None)
        batch, n_new = x.shape[0], x.shape[1]
        ids, self._pending_ids = self._pending_ids, None
        vision = self._vision(ids, batch, n_new, x.device)
        cache = kwargs.get("past_key_values")
        ledger = self.ledger_for(cache, fresh=False)
        self.step = Step(self, batch, n_new, ledger.total if ledger else 0, vision, cache, ledger)

    def _end(self, module: nn.Module, args: tuple, output: Any) -> None:
        step, self.step = self.step, None
        if step is not None and step.ledger is not None:
            step.ledger.total = step.past + step.n_new

    def _vision(self, ids: torch.Tensor | None, batch: int, n_new: int, device: torch.device) -> torch.Tensor:
        if not self.plan.needs_vision:
            return torch.zeros(batch, n_new, dtype=torch.bool, device=device)
        if ids is None or tuple(ids.shape[:2]) != (batch, n_new):
            raise InputError(
                f"the plan {self.plan} needs `input_ids` to find the vision tokens: call the VLM itself "
                "(model(**inputs) or model.generate(**inputs)) with input_ids, not inputs_embeds or its text model."
            )
        return self.backbone.vision_mask(ids).to(device)

    def current_step(self, hidden_states: torch.Tensor) -> Step:
        """The state of the running forward; raises if the text model was bypassed."""
        step = self.step
        if step is None or hidden_states.shape[0] != step.batch or hidden_states.shape[1] != step.n_new:
            raise SkipitError("a skipped layer ran outside its text model's forward (or with an unexpected "
                              "shape); call the model as a whole inside `skipping`.")
        return step

    # ---- caches
    def ledger_for(self, cache: Any, fresh: bool) -> Ledger | None:
        """The ledger of ``cache``, creating (and patching the cache) on first sight.

        ``fresh``: the cache was created by transformers inside this forward (global length 0). A cache
        handed in without a ledger is adopted only if every layer holds the same positions.
        """
        if cache is None or not hasattr(cache, "layers"):
            return None
        ledger = getattr(cache, "_skipit_ledger", None)
        if ledger is not None and ledger.plan != self.plan:
            raise PlanError(f"this KV cache was filled under plan {ledger.plan}; continue it under the same "
                            f"plan (now {self.plan}) or start a new cache.")
        if ledger is None:
            _check_cache_layers(cache, self.plan)
            total = 0 if fresh else self._adopt_length(cache)
            ledger = Ledger(total, self.plan)
        if cache not in self._caches:
            _patch_cache(cache, ledger)
            self._caches.add(cache)
        return ledger

    @staticmethod
    def _adopt_length(cache: Any) -> int:
        lengths = {type(obj).get_seq_length(obj) for obj in cache.layers
                   if hasattr(obj, "get_seq_length") and not getattr(obj, "is_sliding", False)}
        if len(lengths) > 1:
            raise PlanError(f"the KV cache passed in holds different lengths per layer {sorted(lengths)}: it was "
                            "filled under another plan. Start from an empty cache inside `skipping`.")
        return lengths.pop() if lengths else 0


#: KV-cache layer classes whose stored columns skipit can track (their keys grow by the columns fed)
LEDGER_CACHE_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


def _check_cache_layers(cache: Any, plan: SkipPlan) -> None:
    """A static (pre-allocated), quantized or other cache layer stores columns skipit cannot account for
    when a plan leaves rows out of some layers: refuse it rather than decode with wrong positions."""
    other = sorted({type(obj).__name__ for obj in cache.layers} - set(LEDGER_CACHE_LAYERS))
    if other:
        raise PlanError(
            f"the KV cache ({type(cache).__name__}, layers {', '.join(other)}) is not supported under the plan "
            f"{plan}: skipit tracks the columns of {' / '.join(LEDGER_CACHE_LAYERS)} only. Use the default "
            "dynamic cache: drop cache_implementation='static' (or pass cache_implementation='dynamic') in "
            "generate(), or pass a transformers.DynamicCache.")


def _check_implementation(backbone: Backbone, plan: SkipPlan) -> None:
    """Plans that run layers on a subset of rows pass those layers a mask skipit builds; it writes the
    encodings of :data:`MASK_IMPLEMENTATIONS` only (whole-layer skips build none and run under any)."""
    implementation = attention_implementation(backbone)
    rows = any(mode in (LayerMode.TEXT, LayerMode.FREEZE) for mode in plan.modes(backbone.n_layers))
    if rows and implementation not in MASK_IMPLEMENTATIONS:
        raise PlanError(
            f"the plan {plan} runs layers on the text rows with masks skipit builds, which it writes for "
            f"attn_implementation 'sdpa' and 'eager' only; this model uses {implementation!r}. Call "
            "model.set_attn_implementation('sdpa') (or load with attn_implementation='sdpa') first.")


def active_session(model: nn.Module) -> Session | None:
    """The session active on ``model`` (a VLM or its Backbone), if any."""
    return _ACTIVE.get(Backbone.of(model).text_model)


@contextmanager
def skipping(model: nn.Module, plan: SkipPlan) -> Iterator[Session]:
    """Apply ``plan`` to ``model`` (any class :meth:`Backbone.of` supports) inside the ``with`` block.

    On exit, normal or by exception, the model is exactly as before: the same layer objects, parameters
    and outputs. Nesting: a second ``skipping`` on the same model while one is active is allowed only with
    an identical plan (it is then a no-op); a different plan raises :class:`PlanError`.

    Vision plans raise :class:`InputError` at the first forward whose inputs hold no image token (found
    then, with the one host read a prefill needs anyway). A KV cache filled inside the context reports
    its global length only inside a context with the same plan.
    """
    backbone = Backbone.of(model)
    if not isinstance(plan, SkipPlan):
        raise PlanError(f"skipping() takes a SkipPlan, got {type(plan).__name__}; build one with SkipPlan.*.")
    plan.validate(backbone)
    _check_implementation(backbone, plan)
    active = _ACTIVE.get(backbone.text_model)
    if active is not None:
        if active.plan != plan:
            raise PlanError(f"a different plan ({active.plan}) is already active on this model; nested "
                            f"`skipping` needs the identical plan (got {plan}). Exit the outer context first.")
        active.depth += 1
        try:
            yield active
        finally:
            active.depth -= 1
        return
    session = Session(backbone, plan)
    _ACTIVE[backbone.text_model] = session
    try:
        session.install()
        yield session
    finally:
        session.uninstall()
        _ACTIVE.pop(backbone.text_model, None)
