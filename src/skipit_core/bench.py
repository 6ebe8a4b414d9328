"""Timing and analytic FLOPs: how much a skip plan should save, and how much it does.

* :func:`flops` counts the FLOPs of the decoder layers of a backbone from its config shapes only, so it
  works on a model built on the meta device (``with torch.device("meta"): model = Cls(config)``): a
  reader gets the numbers of a 7B/13B model without its weights. A multiply-add counts as 2 FLOPs.
  Counted per layer and per token kind: the q/k/v/o projections, the attention score (``q k^T``) and
  value (``A v``) products with their quadratic term, the MLP (3 matmuls when gated). Not counted:
  norms, rotary embeddings, softmax, residual adds (elementwise, a fraction of a percent), the
  ``lm_head`` (reported apart as :attr:`FlopReport.head_per_position`) and the vision tower.
* :func:`ideal_speedup` is ``flops(no plan) / flops(plan)``; :func:`flop_saving` is ``1 - flops(plan) /
  flops(no plan)``, and :func:`plan_at_budget` turns a per-layer score into the plan a method would run
  at a FLOP budget (the layers it removes first, as many as the budget allows).
* :func:`time_prefill` / :func:`time_decode` time a forward with warm-up and repeats and report the
  median and inter-quartile range: CUDA events with synchronisation on a GPU, ``perf_counter`` on a CPU.
  A timing whose IQR exceeds :data:`NOISY_IQR_RATIO` (25 %) of its median is flagged
  :attr:`Timing.noisy` (its :attr:`Timing.warning` says so): the machine was too busy for the median
  to be read, and neither is a speedup computed from it. Inputs go to the model's execution device
  (also for an accelerate ``device_map``), floating inputs in its dtype.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .distributed import execution_device
from .errors import InputError
from .forward import move_inputs
from .models import Backbone
from .skip import LayerMode, SkipPlan, Work, skipping

__all__ = ["flops", "ideal_speedup", "flop_saving", "plan_at_budget", "BUDGET_KINDS", "prompt_tokens", "FlopReport", "LayerFlops", "Shapes", "time_prefill",
           "time_decode", "Timing", "NOISY_IQR_RATIO"]

#: a timing whose inter-quartile range is above this fraction of its median is too noisy to read
NOISY_IQR_RATIO = 0.25


# ----------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shapes:
    """The config numbers FLOPs depend on: hidden size ``d``, heads, KV heads, head dim, MLP width, depth."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    gated: bool
    n_layers: int
    vocab: int

    @classmethod
    def of(cls, model: Any) -> "Shapes":
        """Shapes of a VLM, its :class:`Backbone`, or already a :class:`Shapes` (meta-device models work)."""
        if isinstance(model, Shapes):
            return model
        bb = Backbone.of(model)
        tc = bb.text_config
        layer = bb.layers[0]
        mlp = getattr(getattr(layer, "layer", layer), "mlp", None)
        gated = mlp is None or hasattr(mlp, "gate_proj") or hasattr(mlp, "gate_up_proj")
        return cls(bb.hidden_size, bb.n_heads, bb.n_kv_heads, bb.head_dim, int(tc.intermediate_size), gated,
                   bb.n_layers, int(tc.vocab_size))


# ------------------------------------------------------------------------------------- the count
@dataclass(frozen=True)
class LayerFlops:
    """FLOPs of one decoder layer: ``proj`` (q/k/v/o), ``attention`` (scores + values), ``mlp``;
    ``text`` / ``vision``: the same total split by the token kind each piece of work belongs to (the
    query's kind for attention products, the row's kind for projections and MLP)."""

    layer: int
    mode: LayerMode
    proj: int
    attention: int
    mlp: int
    text: int
    vision: int

    @property
    def total(self) -> int:
        return self.proj + self.attention + self.mlp


@dataclass(frozen=True)
class FlopReport:
    """Result of :func:`flops`: ``total`` and the per-layer breakdown ``layers``."""

    plan: SkipPlan
    n_vision: int
    n_text: int
    decode: bool
    attention: str
    layers: tuple[LayerFlops, ...]
    head_per_position: int  # lm_head FLOPs for one position (not in the totals)

    @property
    def total(self) -> int:
        return sum(layer.total for layer in self.layers)

    @property
    def text(self) -> int:
        return sum(layer.text for layer in self.layers)

    @property
    def vision(self) -> int:
        return sum(layer.vision for layer in self.layers)

    def __str__(self) -> str:
        what = "decode step" if self.decode else "prefill"
        head = (f"{what} FLOPs of {len(self.layers)} decoder layers, {self.n_vision} vision + {self.n_text} text "
                f"tokens, plan {self.plan}: {self.total / 1e9:.3f} GFLOP (text {self.text / 1e9:.3f}, vision "
                f"{self.vision / 1e9:.3f}; attention {self.attention}; lm_head and vision tower excluded)")
        rows = [f"  layer {x.layer:>3} {x.mode.value:<6} {x.total / 1e9:9.4f} GFLOP" for x in self.layers]
        return "\n".join([head, *rows])


def _pairs(queries: list[tuple[int, int]], keys: list[tuple[int, int]], causal: bool) -> int:
    """(query, key) pairs between position ranges ``[start, stop)``; causal keeps key <= query.

    Closed form per (query range, key range): query ``q`` sees keys ``[k0, min(q + 1, k1))``.
    """
    total = 0
    for q0, q1 in queries:
        for k0, k1 in keys:
            if not causal:
                total += (q1 - q0) * (k1 - k0)
                continue
            # rows with k0 <= q < k1 see q+1-k0 keys; rows with q >= k1 see k1-k0 keys
            a, b = max(q0, k0), min(q1, k1)
            if b > a:
                total += (b - a) * (a + b - 1) // 2 + (b - a) * (1 - k0)
            if q1 > max(q0, k1):
                total += (q1 - max(q0, k1)) * (k1 - k0)
    return total


def flops(model: Any, n_vision: int, n_text: int, plan: SkipPlan | None = None, *, decode: bool = False,
          attention: str = "causal", text_before: int = 1) -> FlopReport:
    """Analytic FLOPs of the decoder layers for a prefill (or, ``decode=True``, one decode step).

    ``model``: a VLM (meta device fine), its :class:`Backbone`, or :class:`Shapes`. Prefill: a prompt of
    ``text_before`` text tokens, the ``n_vision`` vision tokens, then the remaining text tokens. Decode:
    one new text token whose layers' caches hold ``n_vision`` vision and ``n_text`` text positions
    (vision only where the plan keeps vision tokens in that layer's cache). ``attention``: ``"causal"``
    counts only allowed (query, key) pairs, ``"dense"`` every pair (what a dense kernel and
    ``FlopCounterMode`` count).
    """
    if attention not in ("causal", "dense"):
        raise InputError(f"attention must be 'causal' or 'dense', got {attention!r}.")
    if min(n_vision, n_text) < 0 or not 0 <= text_before <= n_text:
        raise InputError(f"need n_vision, n_text >= 0 and 0 <= text_before <= n_text; got {n_vision}, {n_text}, "
                         f"{text_before}.")
    s = Shapes.of(model)
    plan = (plan or SkipPlan.none()).validate(s.n_layers)
    layers = []
    for layer in range(s.n_layers):
        mode = plan.mode(layer, s.n_layers)
        count = _decode_layer if decode else _prefill_layer
        layers.append(count(s, layer, mode, n_vision, n_text, attention == "causal", text_before))
    head = 2 * s.hidden * s.vocab
    return FlopReport(plan, n_vision, n_text, decode, attention, tuple(layers), head)


def _row_costs(s: Shapes) -> tuple[int, int, int, int]:
    """Per-row FLOPs: q projection, k+v projections, o projection, MLP."""
    q = 2 * s.hidden * s.heads * s.head_dim
    kv = 2 * 2 * s.hidden * s.kv_heads * s.head_dim
    o = 2 * s.heads * s.head_dim * s.hidden
    mlp = (3 if s.gated else 2) * 2 * s.hidden * s.intermediate
    return q, kv, o, mlp


def _prefill_layer(s: Shapes, layer: int, mode: LayerMode, n_v: int, n_t: int, causal: bool,
                   before: int) -> LayerFlops:
    q, kv, o, mlp = _row_costs(s)
    work = {kind: mode.work(kind) for kind in ("text", "vision")}
    text_rows = [(0, before), (before + n_v, before + n_v + n_t - before)]
    vision_rows = [(before, before + n_v)]
    if work["vision"] is Work.NONE:  # text alone: positions close up only as far as pairs are concerned
        text_rows = [(0, n_t)]
        vision_rows = []
    n_rows = {"text": n_t if work["text"] is Work.ALL else 0,
              "vision": n_v if work["vision"] is Work.ALL else 0}
    kv_rows = {kind: (n_t if kind == "text" else n_v) if work[kind] is not Work.NONE else 0 for kind in work}
    keys = (text_rows if work["text"] is not Work.NONE else []) + \
        (vision_rows if work["vision"] is not Work.NONE else [])
    per_pair = 2 * 2 * s.heads * s.head_dim  # scores and values, one multiply-add each per head dim
    att = {"text": per_pair * _pairs(text_rows, keys, causal) if n_rows["text"] else 0,
           "vision": per_pair * _pairs(vision_rows, keys, causal) if n_rows["vision"] else 0}
    by_kind = {kind: n_rows[kind] * (q + o + mlp) + kv_rows[kind] * kv + att[kind] for kind in work}
    proj = sum(n_rows[k] * (q + o) + kv_rows[k] * kv for k in work)
    return LayerFlops(layer, mode, proj, att["text"] + att["vision"], (n_rows["text"] + n_rows["vision"]) * mlp,
                      by_kind["text"], by_kind["vision"])


def _decode_layer(s: Shapes, layer: int, mode: LayerMode, n_v: int, n_t: int, causal: bool,
                  before: int) -> LayerFlops:
    q, kv, o, mlp = _row_costs(s)
    if mode is LayerMode.SKIP:
        return LayerFlops(layer, mode, 0, 0, 0, 0, 0)
    cached = n_t + (n_v if mode.work("vision") is not Work.NONE else 0)
    att = 2 * 2 * s.heads * s.head_dim * (cached + 1)
    proj = q + kv + o
    return LayerFlops(layer, mode, proj, att, mlp, proj + att + mlp, 0)


def ideal_speedup(model: Any, n_vision: int, n_text: int, plan: SkipPlan, **kwargs: Any) -> float:
    """``flops(no plan) / flops(plan)``: the speedup if time were proportional to decoder FLOPs."""
    return flops(model, n_vision, n_text, None, **kwargs).total / flops(model, n_vision, n_text, plan, **kwargs).total


def flop_saving(model: Any, n_vision: int, n_text: int, plan: SkipPlan, **kwargs: Any) -> float:
    """``1 - flops(plan) / flops(no plan)``: the fraction of the decoder's FLOPs the plan removes (prefill by
    default; ``kwargs`` as :func:`flops`), in [0, 1]."""
    base = flops(model, n_vision, n_text, None, **kwargs).total
    return 1.0 - flops(model, n_vision, n_text, plan, **kwargs).total / base


#: the plan families :func:`plan_at_budget` builds, and the constructor of each
BUDGET_KINDS = {"whole": "SkipPlan.whole_layers", "freeze": "SkipPlan.vision_freeze",
                "early_exit": "SkipPlan.early_exit"}


def plan_at_budget(model: Any, scores: Any, budget: float, kind: str = "whole", *, n_vision: int, n_text: int,
                   threshold: float | None = None, text_before: int = 1, attention: str = "causal") -> SkipPlan:
    """The plan a score-driven method runs when it may remove at most a fraction ``budget`` of the decoder's
    prefill FLOPs.

    Write ``F(P)`` for :func:`flops` of plan ``P`` (prefill, ``n_vision`` vision and ``n_text`` text tokens,
    ``text_before`` of them before the image) and ``s(P) = 1 - F(P) / F(none)`` for its saving.

    * ``kind="whole"`` (ShortGPT, angular distance: ``SkipPlan.whole_layers``) or ``kind="freeze"`` (ShortV:
      ``SkipPlan.vision_freeze``): ``scores`` ``[n_layers]``, low = removed first. Order the layers by
      ascending score, ties by ascending layer index (``np.argsort(..., kind="stable")``), and return the
      longest prefix ``{l_1, ..., l_m}`` of that order with ``s <= budget``; so adding ``l_{m+1}`` would
      exceed the budget (or no layer is left). Every layer removed adds a non-negative saving, so ``s``
      grows along the order and the prefix is well defined.
    * ``kind="early_exit"`` (FastV with every vision token pruned, VTW: ``SkipPlan.early_exit(k)``, the
      vision tokens leave from layer ``k`` on): the smallest ``k`` in ``0..n_layers`` with ``s <= budget``
      and, when ``threshold`` is given, ``scores[k] <= threshold`` (``scores`` ``[n_layers + 1]``, indexed by
      the exit layer, e.g. :func:`skipit_core.measures.vtw_kl` with its default ``ks``: VTW's rule, exit at the
      first layer whose KL is small enough). Without ``threshold`` the budget alone fixes ``k`` and
      ``scores`` may be ``None``.

    A plan that removes nothing is returned as ``SkipPlan.none()`` (budget 0 always gives it). ``model``: a
    VLM (meta device fine), its :class:`Backbone`, or :class:`Shapes`.
    """
    if kind not in BUDGET_KINDS:
        raise InputError(f"kind must be one of {sorted(BUDGET_KINDS)}; got {kind!r}.")
    fraction = _number(budget, "budget")
    if not 0 <= fraction <= 1:
        raise InputError(f"budget is a fraction of the decoder's FLOPs in [0, 1]; got {budget!r}.")
    L = Shapes.of(model).n_layers
    count = dict(text_before=text_before, attention=attention)
    base = flops(model, n_vision, n_text, None, **count).total

    def fits(plan: SkipPlan) -> bool:
        return base - flops(model, n_vision, n_text, plan, **count).total <= fraction * base

    if kind == "early_exit":
        if threshold is not None:
            s = _scores(scores, L + 1, "scores (one per exit layer k = 0..n_layers)")
            threshold = _number(threshold, "threshold")
        for k in range(L + 1):
            plan = SkipPlan.early_exit(k) if k < L else SkipPlan.none()
            if fits(plan) and (threshold is None or s[k] <= threshold):
                return plan
        return SkipPlan.none()
    s = _scores(scores, L, "scores (one per layer)")
    make = SkipPlan.whole_layers if kind == "whole" else SkipPlan.vision_freeze
    chosen: list[int] = []
    for layer in np.argsort(s, kind="stable"):
        if not fits(make(chosen + [int(layer)])):
            break
        chosen.append(int(layer))
    return make(chosen) if chosen else SkipPlan.none()


def _number(x: Any, what: str) -> float:
    """``x`` as a finite float (ints, floats, NumPy scalars); bools, strings and NaN raise InputError."""
    if isinstance(x, (bool, np.bool_, str, bytes)):
        raise InputError(f"{what} must be a number; got {x!r}.")
    try:
        value = float(x)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number; got {x!r}.") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise InputError(f"{what} must be finite; got {x!r}.")
    return value


def _scores(scores: Any, length: int, what: str) -> np.ndarray:
    try:
        s = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{what}: need {length} numbers; got {type(scores).__name__}.") from None
    if s.shape != (length,) or not np.isfinite(s).all():
        raise InputError(f"{what}: need {length} finite numbers; got shape {s.shape}"
                         f"{'' if s.shape != (length,) else ' with a NaN or infinity'}.")
    return s


def prompt_tokens(model: Any, inputs: Mapping[str, Any]) -> tuple[int, int]:
    """``(n_vision, n_text)`` of the first prompt of a batch, the sizes :func:`flops` takes: image tokens,
    and the other positions its attention mask marks as real (padding left out)."""
    n_vision = int(Backbone.of(model).vision_mask(inputs["input_ids"])[0].sum())
    mask = inputs.get("attention_mask")
    n_real = int(mask[0].sum()) if mask is not None else inputs["input_ids"].shape[1]
    return n_vision, n_real - n_vision


# ----------------------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Timing:
    """Wall-clock times of ``n`` repeats in milliseconds: ``median``, inter-quartile range ``iqr``."""

    what: str
    samples_ms: tuple[float, ...]
    device: str

    @property
    def n(self) -> int:
        return len(self.samples_ms)

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def iqr(self) -> float:
        if self.n < 2:
            return 0.0
        q = statistics.quantiles(self.samples_ms, n=4, method="inclusive")
        return q[2] - q[0]

    @property
    def spread(self) -> float:
        """``iqr / median`` (0 for fewer than 2 samples; infinite for a zero median with some spread)."""
        if self.iqr == 0:
            return 0.0
        return self.iqr / self.median if self.median > 0 else float("inf")

    @property
    def noisy(self) -> bool:
        """True when :attr:`spread` is above :data:`NOISY_IQR_RATIO`: the median cannot be trusted."""
        return self.spread > NOISY_IQR_RATIO

    @property
    def warning(self) -> str | None:
        """A one-line warning when the timing is :attr:`noisy`, else ``None``."""
        if not self.noisy:
            return None
        return (f"{self.what}: IQR {self.iqr:.2f} ms is {100 * self.spread:.0f}% of the median {self.median:.2f} ms "
                f"(above {100 * NOISY_IQR_RATIO:.0f}%): too noisy to read; rerun on a quieter machine or with "
                "more repeats.")

    def __str__(self) -> str:
        flag = ", NOISY" if self.noisy else ""
        return f"{self.what}: {self.median:.2f} ms median (IQR {self.iqr:.2f} ms, n={self.n}, {self.device}{flag})"


def _clock(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (ms)."""
    if repeats < 1 or warmup < 0:
        raise InputError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}.")
    for _ in range(warmup):
        fn()
    out = []
    if device.type == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            out.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def _device(model: nn.Module) -> torch.device:
    return execution_device(model)


def _on_device(model: nn.Module, inputs: Mapping[str, Any], device: torch.device) -> dict:
    """``inputs`` on ``device``; floating tensors (pixels) in the model's dtype."""
    return move_inputs(inputs, device, getattr(model, "dtype", None))


def _prefill_kwargs(model: nn.Module) -> dict:
    """Prefill as generate() runs it: KV cache on, logits for the last position only when supported."""
    params = inspect.signature(model.forward).parameters
    return {"use_cache": True, **({"logits_to_keep": 1} if "logits_to_keep" in params else {})}


def time_prefill(model: nn.Module, inputs: Mapping[str, Any], plan: SkipPlan | None = None, *, warmup: int = 2,
                 repeats: int = 10, label: str | None = None) -> Timing:
    """Time ``model(**inputs)`` as a generation prefill (cache on, last-position logits) under ``plan``."""
    extra = _prefill_kwargs(model)
    device = _device(model)
    inputs = _on_device(model, inputs, device)

    def run() -> None:
        with torch.inference_mode():
            model(**inputs, **extra)
    with skipping(model, plan or SkipPlan.none()):
        samples = _clock(run, device, warmup, repeats)
    return Timing(label or f"prefill {plan or SkipPlan.none()}", tuple(samples), str(device))


def time_decode(model: nn.Module, inputs: Mapping[str, Any], plan: SkipPlan | None = None, *, warmup: int = 2,
                repeats: int = 10, label: str | None = None) -> Timing:
    """Time one decode step (one new token after the prompt ``inputs``) under ``plan``.

    Each repeat prefills afresh, untimed, so every timed step sees the same cache; the step gets the
    positions generate() would give it (text position from the attention mask; plus Qwen's rope deltas).
    """
    extra = _prefill_kwargs(model)
    device = _device(model)
    inputs = _on_device(model, inputs, device)
    samples: list[float] = []
    with skipping(model, plan or SkipPlan.none()), torch.inference_mode():
        for i in range(warmup + repeats):
            step = _decode_inputs(model, inputs, model(**inputs, **extra))
            if i < warmup:
                model(**step, **extra)
            else:
                samples += _clock(lambda: model(**step, **extra), device, 0, 1)
    return Timing(label or f"decode {plan or SkipPlan.none()}", tuple(samples), str(device))


def _decode_inputs(model: nn.Module, inputs: Mapping[str, Any], out: Any) -> dict:
    """Inputs of the decode step after a prefill that returned ``out`` (greedy next token)."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    position = (mask.long().cumsum(-1) - 1)[:, -1:]
    if Backbone.of(model).family.mrope:
        position = (position + model.model.rope_deltas).unsqueeze(0).expand(3, -1, -1)
    step = {"input_ids": out.logits[:, -1:].argmax(-1), "attention_mask": mask, "position_ids": position,
            "past_key_values": out.past_key_values}
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            step[key] = torch.zeros_like(step["input_ids"])
    return step
