"""Forward-pass plumbing shared by every module that runs a VLM: batches, hooks, last-position scores.

* :class:`BatchLayout`: where each kind of token (:class:`~skipit_core.models.TokenKind`) sits in a
  batch, computed once per batch on the device;
* :func:`iter_batches`: inputs checked (:meth:`Backbone.check_inputs`) and moved to the model's device
  and dtype (:func:`move_inputs`), each with its layout;
* :func:`run_forward`: one ``torch.no_grad`` forward with pre/post hooks on every decoder layer (the
  model's train/eval flags and Qwen's cached ``rope_deltas`` are always restored), optionally stopped
  after a layer, returning the logits at each sample's last position (``logits_to_keep`` where the
  class accepts it, :func:`accepts`);
* :func:`last_logprobs`: float64 log-probabilities of the next token there.

:mod:`skipit_core.capture` (statistics), :mod:`skipit_core.measures`, :mod:`skipit_core.tasks` and
:mod:`skipit_core.bench` all run models through these functions. Hooks never synchronise with the host.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .errors import InputError
from .models import Backbone, TokenKind

__all__ = [
    "check_device",
    "BatchLayout", "iter_batches", "move_inputs", "model_device_dtype", "execution_device", "run_forward", "last_logprobs",
    "hooked", "accepts", "layer_input", "StopForward", "PostHook", "PreHook", "TRASH_SLOT",
]

TRASH_SLOT = 3  # accumulator slot of PAD positions (BatchLayout.slot), dropped by the statistics

PostHook = Callable[[int, torch.Tensor, torch.Tensor, dict, "BatchLayout"], "torch.Tensor | None"]
PreHook = Callable[[int, torch.Tensor, dict, "BatchLayout"], "dict | torch.Tensor | None"]


@dataclass
class BatchLayout:
    """Where each kind of token sits in one batch, computed once per batch, before the forward.

    ``kinds [B, N]`` holds :class:`TokenKind` codes, ``slot`` the same with PAD mapped to an
    accumulator trash slot. ``text_idx [B, T]`` lists the TEXT positions of each sample in order
    (``text_valid`` marks the real ones; ``T`` is the largest count in the batch), ``last_text [B]``
    the last TEXT position and ``last_pos [B]`` the last non-padding position (where the next token is
    predicted). ``has_vision``/``n_text_max`` are Python values so hooks can branch without a sync.
    """

    kinds: torch.Tensor
    slot: torch.Tensor
    vision: torch.Tensor
    n_vision: torch.Tensor
    text_idx: torch.Tensor
    text_valid: torch.Tensor
    n_text: torch.Tensor
    last_text: torch.Tensor
    last_pos: torch.Tensor
    has_vision: bool
    n_text_max: int

    @property
    def batch(self) -> int:
        return self.kinds.shape[0]

    @property
    def seq(self) -> int:
        return self.kinds.shape[1]

    @classmethod
    def of(cls, bb: Backbone, inputs: Mapping[str, Any], device: torch.device) -> "BatchLayout":
        ids = inputs["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise InputError("input_ids must be a [batch, seq] tensor, as a processor returns with "
                             "return_tensors='pt'.")
        kinds = bb.token_kinds(ids, inputs.get("attention_mask")).to(device)
        text = kinds == TokenKind.TEXT
        n_text = text.sum(1)
        n_text_max = int(n_text.max())
        text_idx = torch.sort((~text).to(torch.int8), dim=1, stable=True).indices[:, :n_text_max]
        text_valid = torch.arange(n_text_max, device=device)[None, :] < n_text[:, None]
        positions = torch.arange(kinds.shape[1], device=device)[None, :]
        last_text = torch.where(text, positions, -1).amax(1).clamp_min(0)
        last_pos = torch.where(kinds != TokenKind.PAD, positions, -1).amax(1).clamp_min(0)
        vision = kinds == TokenKind.VISION
        n_vision = vision.sum(1)
        return cls(kinds, kinds.masked_fill(kinds == TokenKind.PAD, TRASH_SLOT), vision, n_vision,
                   text_idx, text_valid, n_text, last_text, last_pos, bool(n_vision.any()), n_text_max)


def check_device(device: str | torch.device, what: str = "device") -> torch.device:
    """``device`` as a :class:`torch.device` that exists here, else :class:`InputError` with the fix
    (a typo such as ``"gpu0"``, ``"cuda"`` on a machine without CUDA, a GPU index past the count, ``"mps"``
    where Metal is absent)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"{what} {device!r} is not a device: use 'cpu', 'cuda', 'cuda:N' or 'mps'.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{what} {device!r}: CUDA is not available here; use 'cpu'.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"{what} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"{what} {device!r}: Apple's MPS is not available here; use 'cpu'.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"{what} {device!r}: skipit runs on 'cpu', 'cuda' or 'mps'.")
    return dev


def execution_device(model: nn.Module) -> torch.device:
    """Where inputs must go: for a model dispatched by accelerate (weights offloaded to CPU or disk are
    ``meta`` in place), the execution device of its input embeddings' hook; else the device of the first
    parameter that is not on ``meta``."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = getattr(getattr(embed, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device inputs should be moved to (:func:`execution_device`) and the model's dtype."""
    param = next(model.parameters())
    return execution_device(model), getattr(model, "dtype", param.dtype)


def move_inputs(batch: Mapping[str, Any], device: torch.device, dtype: torch.dtype | None = None) -> dict:
    """A copy of ``batch`` with every tensor on ``device``; floating tensors (pixels) also cast to
    ``dtype`` when given (integer ids and masks keep theirs)."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype) if value.is_floating_point() and dtype else value.to(device)
        out[key] = value
    return out


def iter_batches(model: nn.Module | Backbone, batches: Iterable[Mapping[str, Any]] | Mapping[str, Any]
                 ) -> Iterator[tuple[dict, BatchLayout]]:
    """Yield ``(inputs, layout)`` per batch: inputs checked (:meth:`Backbone.check_inputs`) and moved
    to the model's device (floating tensors to its dtype). A single dict counts as one batch.

    Raises :class:`InputError` when ``batches`` yields nothing.
    """
    bb = Backbone.of(model)
    device, dtype = model_device_dtype(bb.model)
    if isinstance(batches, Mapping):
        batches = [batches]
    n = 0
    for batch in batches:
        bb.check_inputs(batch)
        inputs = move_inputs(batch, device, dtype)
        yield inputs, BatchLayout.of(bb, inputs, device)
        n += 1
    if n == 0:
        raise InputError("`batches` yielded no batch: pass an iterable of model-input dicts, e.g. "
                         "[processor(images=..., text=..., return_tensors='pt')].")


class StopForward(Exception):
    """Raised by a hook to end a forward early (nothing after the last needed layer runs)."""


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states ``[B, N, d]`` a decoder layer was called with (first positional or keyword)."""
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def hooked(bb: Backbone, layout: BatchLayout, post: PostHook | None, pre: PreHook | None,
            stop_after: int | None) -> Iterator[None]:
    """Register the hooks on every decoder layer; always remove them and restore the model's state
    (train/eval flags of every module, Qwen's cached ``rope_deltas``)."""
    model = bb.model
    modes = [(m, m.training) for m in model.modules()]
    inner = getattr(model, "model", model)
    rope = ("rope_deltas", inner.rope_deltas) if hasattr(inner, "rope_deltas") else None
    handles = []

    def make_post(idx: int):
        def hook(module, args, kwargs, output):
            x_out = output[0] if isinstance(output, tuple) else output
            new = post(idx, layer_input(args, kwargs), x_out, kwargs, layout) if post else None
            if stop_after is not None and idx >= stop_after:
                raise StopForward
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    def make_pre(idx: int):
        def hook(module, args, kwargs):
            new = pre(idx, layer_input(args, kwargs), kwargs, layout)
            if new is None:
                return None
            if isinstance(new, torch.Tensor):  # new hidden states for the layer's input
                return ((new, *args[1:]), kwargs) if args else (args, dict(kwargs, hidden_states=new))
            return args, new
        return hook

    try:
        model.eval()
        for idx, layer in enumerate(bb.layers):
            if pre is not None:
                handles.append(layer.register_forward_pre_hook(make_pre(idx), with_kwargs=True))
            if post is not None or stop_after is not None:
                handles.append(layer.register_forward_hook(make_post(idx), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes:
            module.training = mode
        if rope is not None:
            setattr(inner, *rope)


def accepts(model: nn.Module, name: str) -> bool:
    """True when ``model.forward`` takes a parameter called ``name`` (e.g. ``logits_to_keep``)."""
    return name in inspect.signature(model.forward).parameters


def run_forward(model: nn.Module | Backbone, inputs: dict, layout: BatchLayout, *,
                post: PostHook | None = None, pre: PreHook | None = None,
                stop_after: int | None = None, logits: bool = False) -> torch.Tensor | None:
    """One forward of ``inputs`` under ``torch.no_grad`` with hooks on every decoder layer.

    ``post(l, x_in, x_out, kwargs, layout)`` runs after layer ``l`` (return a tensor to replace the
    layer's output); ``pre(l, x_in, kwargs, layout)`` runs before it (return a new kwargs dict, e.g.
    with an edited ``attention_mask``, or a tensor ``[B, N, d]`` to replace the layer's input). ``stop_after=l`` ends the forward after layer ``l``.
    Returns the logits at each sample's last non-padding position ``[B, V]`` when ``logits=True``
    (computed for those positions only where the class supports ``logits_to_keep``), else None.
    """
    bb = Backbone.of(model)
    kwargs: dict[str, Any] = {"use_cache": False} if "use_cache" not in inputs else {}
    keep = logits and accepts(bb.model, "logits_to_keep")
    if logits and keep:
        kwargs["logits_to_keep"] = layout.last_pos[:, None]
    elif not logits and accepts(bb.model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1  # the head's work is not needed
    with hooked(bb, layout, post, pre, stop_after), torch.no_grad():
        try:
            out = bb.model(**inputs, **kwargs)
        except StopForward:
            return None
    if not logits:
        return None
    scores = out.logits
    if keep:
        return scores[:, -1]
    return scores[torch.arange(layout.batch, device=scores.device), layout.last_pos]


def last_logprobs(model: nn.Module | Backbone, inputs: dict, layout: BatchLayout, **hooks) -> torch.Tensor:
    """Float64 log-probabilities ``[B, V]`` of the next token at each sample's last position,
    under the given hooks (see :func:`run_forward`); float64 keeps small KL divergences accurate."""
    return torch.log_softmax(run_forward(model, inputs, layout, logits=True, **hooks).double(), dim=-1)
