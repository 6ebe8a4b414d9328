"""Find the LLM backbone of a Hugging Face vision-language model.

A VLM is a vision encoder, a projector and an LLM backbone of ``L`` decoder layers. Everything in
skipit_core that measures or skips layers talks to the backbone through :class:`Backbone`, so the
per-class knowledge (where the layers live, which extra inputs a class needs, how attention is
computed) is written once, here.

Layer ``l`` (0-based) maps its input ``x_{l}`` to its output ``x_{l+1} = x_l + Delta_l(x_l)``; in the
theory's notation (THEORY.md) the input of layer ``l`` is ``X_{l-1}`` and the output is ``X_l``.

Known traps, measured on transformers 5.23:

* the decoder layers live at ``model.model.language_model.layers`` for most classes and at
  ``model.model.text_model.layers`` for Idefics3/SmolVLM; decoder layers return a tensor;
* Qwen2/2.5/3-VL need ``mm_token_type_ids`` to build M-RoPE positions: Qwen2-VL raises without
  it, Qwen2.5-VL silently falls back to 1-D positions; :meth:`Backbone.check_inputs` raises for both;
* PaliGemma and Gemma 3 need ``token_type_ids`` (bidirectional attention over the image/prefix block,
  and a consistent KV cache under ``generate``);
* ``output_hidden_states``' last entry is taken after the final norm, so the last layer's output
  must be read with a hook (see :mod:`skipit_core.capture`).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .errors import InputError, PlanError, UnsupportedModelError

__all__ = ["Backbone", "Family", "FAMILIES", "TokenKind", "token_kinds", "allowed_keys", "ROW_SPLIT_LAYERS"]

#: decoder-layer classes whose forward :class:`Backbone` can run row by row (vision freeze): the value
#: says whether the class has Gemma 3's "sandwich" norms around both sublayers
ROW_SPLIT_LAYERS: dict[str, bool] = {
    "LlamaDecoderLayer": False, "MistralDecoderLayer": False, "Qwen2DecoderLayer": False,
    "Qwen2VLDecoderLayer": False, "Qwen2_5_VLDecoderLayer": False, "Qwen3VLTextDecoderLayer": False,
    "Qwen3DecoderLayer": False, "GemmaDecoderLayer": False, "Gemma3DecoderLayer": True,
}


@dataclass(frozen=True)
class Family:
    """What differs between VLM classes: where the text model lives and which inputs it needs."""

    name: str
    classes: tuple[str, ...]  # class names (ForConditionalGeneration and the bare Model)
    text_model_attr: str  # attribute of the inner ``model`` holding the LLM
    required_inputs: tuple[str, ...] = ()  # needed whenever pixel inputs are given
    mrope: bool = False

    def hint(self, key: str) -> str:
        return (
            f"{self.name} models need `{key}` next to `input_ids` and the pixel inputs; pass the "
            "processor's whole output (e.g. `model(**processor(images=..., text=..., return_tensors='pt'))`)."
        )


FAMILIES: tuple[Family, ...] = (
    Family("LLaVA", ("LlavaForConditionalGeneration", "LlavaModel"), "language_model"),
    Family("LLaVA-NeXT", ("LlavaNextForConditionalGeneration", "LlavaNextModel"), "language_model"),
    Family("Qwen2-VL", ("Qwen2VLForConditionalGeneration", "Qwen2VLModel"), "language_model",
           ("mm_token_type_ids",), mrope=True),
    Family("Qwen2.5-VL", ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel"), "language_model",
           ("mm_token_type_ids",), mrope=True),
    Family("Qwen3-VL", ("Qwen3VLForConditionalGeneration", "Qwen3VLModel"), "language_model",
           ("mm_token_type_ids",), mrope=True),
    Family("Idefics3", ("Idefics3ForConditionalGeneration", "Idefics3Model"), "text_model"),
    Family("SmolVLM", ("SmolVLMForConditionalGeneration", "SmolVLMModel"), "text_model"),
    Family("PaliGemma", ("PaliGemmaForConditionalGeneration", "PaliGemmaModel"), "language_model",
           ("token_type_ids",)),
    Family("Gemma 3", ("Gemma3ForConditionalGeneration", "Gemma3Model"), "language_model",
           ("token_type_ids",)),
)

PIXEL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos")


def _family_of(model: nn.Module) -> Family:
    names = {cls.__name__ for cls in type(model).__mro__}
    for family in FAMILIES:
        if names.intersection(family.classes):
            return family
    supported = ", ".join(family.classes[0] for family in FAMILIES)
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a supported vision-language model. Supported classes "
        f"(transformers 5.23): {supported}. Load the checkpoint with "
        "`AutoModelForImageTextToText.from_pretrained(...)`; text-only models have no vision tokens to skip."
    )


class TokenKind:
    """Codes of :func:`token_kinds`: what each position of a batch holds."""

    PAD = -1
    TEXT = 0
    VISION = 1
    SINK = 2  # the first attended position of each sample (BOS / attention sink), reported apart
    NAMES = {TEXT: "text", VISION: "vision", SINK: "sink"}


def token_kinds(input_ids: torch.Tensor, image_token_id: int,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Label every position ``[B, N]`` as PAD, TEXT, VISION or SINK (see :class:`TokenKind`).

    Vision positions are ``input_ids == image_token_id`` (never offsets); padding is
    ``attention_mask == 0``; the sink is the first non-padding position of each sample unless it is
    an image token. Pure tensor ops: no host synchronisation.
    """
    kinds = torch.full_like(input_ids, TokenKind.TEXT)
    kinds = kinds.masked_fill(input_ids == image_token_id, TokenKind.VISION)
    attended = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    first = attended & (attended.long().cumsum(-1) == 1)
    kinds = kinds.masked_fill(first & (kinds == TokenKind.TEXT), TokenKind.SINK)
    return kinds.masked_fill(~attended, TokenKind.PAD)


def allowed_keys(attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int,
                 device: torch.device) -> torch.Tensor:
    """The attention pattern a decoder layer was given, as booleans ``[B, 1, q_len, kv_len]``.

    transformers passes SDPA layers either ``None`` (plain causal attention, queries being the last
    ``q_len`` of ``kv_len`` positions), a boolean mask (True = may attend) or an additive float mask
    (0 = may attend, large negative = may not).
    """
    if attention_mask is None:
        q_pos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        k_pos = torch.arange(kv_len, device=device)[None, :]
        return (k_pos <= q_pos).expand(batch, 1, q_len, kv_len)
    if attention_mask.dim() == 2:  # flash-attention layers get the [B, kv] padding mask: causal & padding
        return allowed_keys(None, batch, q_len, kv_len, device) & attention_mask[:, None, None, -kv_len:].bool()
    mask = attention_mask[..., -q_len:, -kv_len:]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask.expand(batch, 1, q_len, kv_len)


class Backbone:
    """The LLM backbone of a supported VLM.

    Attributes: ``model`` (the whole VLM), ``family``, ``text_model`` (the LLM without its head),
    ``layers`` (the decoder ``ModuleList``), ``norm`` (final norm), ``n_layers``, ``hidden_size``,
    ``n_heads``, ``n_kv_heads``, ``head_dim``, ``image_token_id``, ``text_config``.

    >>> bb = Backbone.of(model)            # doctest: +SKIP
    >>> bb.vision_mask(inputs["input_ids"])  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, family: Family):
        self.model = model
        self.family = family
        inner = getattr(model, "model", model)
        self.text_model: nn.Module = getattr(inner, family.text_model_attr)
        self.layers: nn.ModuleList = self.text_model.layers
        self.norm: nn.Module = self.text_model.norm
        self.config = model.config
        self.text_config = model.config.get_text_config()
        tc = self.text_config
        self.n_layers: int = len(self.layers)
        self.hidden_size: int = tc.hidden_size
        self.n_heads: int = tc.num_attention_heads
        self.n_kv_heads: int = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
        self.head_dim: int = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        self.image_token_id: int = int(model.config.image_token_id)

    @classmethod
    def of(cls, model: nn.Module) -> "Backbone":
        """The backbone of ``model``; raises :class:`UnsupportedModelError` for other classes."""
        if isinstance(model, Backbone):
            return model
        if not isinstance(model, nn.Module):
            raise UnsupportedModelError(
                f"Backbone.of expects a transformers VLM (an nn.Module), got {type(model).__name__}."
            )
        return cls(model, _family_of(model))

    def __repr__(self) -> str:
        return (f"Backbone({self.family.name}: {type(self.model).__name__}, {self.n_layers} layers, "
                f"d={self.hidden_size}, heads={self.n_heads}/{self.n_kv_heads}, "
                f"image_token_id={self.image_token_id})")

    # ------------------------------------------------------------------ tokens
    def vision_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``BoolTensor[B, N]``: True where ``input_ids`` holds the config's image token."""
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}.")
        return input_ids == self.image_token_id

    def token_kinds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`token_kinds` with this model's image token id."""
        return token_kinds(input_ids, self.image_token_id, attention_mask)

    def check_inputs(self, inputs: Mapping[str, object]) -> None:
        """Raise :class:`InputError` for inputs this class would silently mishandle.

        ``input_ids`` are required (vision positions come from them). Whenever pixel inputs are given,
        the class's required companions must be too (``mm_token_type_ids`` for Qwen, whose 2.5
        version otherwise uses wrong positions without a word; ``token_type_ids`` for
        PaliGemma/Gemma 3).
        """
        if not isinstance(inputs, Mapping):
            raise InputError(
                f"model inputs must be a dict as a processor returns it; got {type(inputs).__name__}."
            )
        if inputs.get("input_ids") is None:
            raise InputError("inputs need `input_ids`: vision positions are found from the image token id.")
        if any(inputs.get(key) is not None for key in PIXEL_KEYS):
            for key in self.family.required_inputs:
                if inputs.get(key) is None:
                    raise InputError(f"inputs lack `{key}`. " + self.family.hint(key))

    # ------------------------------------------------------------ layer anatomy
    # A decoder layer computes  h = x + o_proj(Attn(q, k, v))  on  n = input_layernorm(x),
    # then  y = h + mlp(post_attention_layernorm(h))  (Gemma 3 wraps both sublayers in extra norms).
    # The methods below expose those pieces so that measures and plans can run them on chosen rows.
    def decoder_layer(self, layer_idx: int) -> nn.Module:
        """Decoder layer ``layer_idx`` itself (the original layer while a skip plan wraps it)."""
        layer = self.layers[layer_idx]
        return layer.layer if getattr(type(layer), "wraps_decoder_layer", False) else layer

    def attention(self, layer_idx: int) -> nn.Module:
        """The self-attention module of decoder layer ``layer_idx``."""
        return self.decoder_layer(layer_idx).self_attn

    def input_norm(self, layer_idx: int, x: torch.Tensor) -> torch.Tensor:
        """``input_layernorm(x)``: what the layer's q/k/v projections read, ``[B, N, d]``."""
        return self.decoder_layer(layer_idx).input_layernorm(x)

    def check_row_split(self, layer_idx: int) -> None:
        """Raise :class:`PlanError` unless layer ``layer_idx`` can be run on a subset of its rows
        (queries and MLP for some rows, keys/values for all: :meth:`finish_layer` and friends)."""
        layer = self.decoder_layer(layer_idx)
        name = type(layer).__name__
        needed = ["input_layernorm", "post_attention_layernorm", "mlp", "self_attn"]
        if ROW_SPLIT_LAYERS.get(name):
            needed += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        attn = getattr(layer, "self_attn", None)
        missing = [n for n in needed if not hasattr(layer, n)]
        missing += [f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(attn, n)]
        if name not in ROW_SPLIT_LAYERS or missing:
            raise PlanError(
                f"vision_freeze cannot split layer {layer_idx} ({name}) by rows: it supports "
                f"{', '.join(sorted(ROW_SPLIT_LAYERS))}" + (f"; missing {missing}" if missing else "")
                + ". Use late_entry / early_exit / whole_layers, which treat any layer as a black box."
            )

    def rope_function(self, layer_idx: int) -> Callable:
        """The ``apply_rotary_pos_emb(q, k, cos, sin)`` the layer's own modeling file uses.

        M-RoPE (Qwen) is folded into ``cos``/``sin`` by the rotary embedding in transformers 5, so
        one signature covers every supported class.
        """
        module = sys.modules[type(self.attention(layer_idx)).__module__]
        fn = getattr(module, "apply_rotary_pos_emb", None)
        if fn is None or len(inspect.signature(fn).parameters) < 4:
            raise UnsupportedModelError(
                f"{type(self.attention(layer_idx)).__name__} has no standard apply_rotary_pos_emb; "
                "attention internals of this class are not supported."
            )
        return fn

    def project_qk(self, layer_idx: int, normed: torch.Tensor,
                   position_embeddings: tuple[torch.Tensor, torch.Tensor],
                   query_states: torch.Tensor | None = None,
                   query_position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys of layer ``layer_idx`` exactly as its attention computes them.

        ``normed`` is the layer's input after its ``input_layernorm`` (:meth:`input_norm`), ``[B, N, d]``.
        Returns ``q [B, H, N, head_dim]`` and ``k [B, H_kv, N, head_dim]`` after the per-head norms
        (Gemma 3, Qwen3) and the rotary embedding. With ``query_states [B, R, d]`` (a subset of the normed
        rows) and their ``query_position_embeddings``, queries are formed for those rows only:
        ``q [B, H, R, head_dim]``, keys still for all ``N``.
        """
        attn = self.attention(layer_idx)
        q_in = normed if query_states is None else query_states
        q = attn.q_proj(q_in).view(*q_in.shape[:-1], -1, self.head_dim)
        k = attn.k_proj(normed).view(*normed.shape[:-1], -1, self.head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        rope = self.rope_function(layer_idx)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = position_embeddings
        if query_states is None:
            return rope(q, k, cos, sin)
        q_cos, q_sin = query_position_embeddings
        # the rope function rotates a (q, k) pair; the partner of each call is a one-head slice, discarded
        return rope(q, q[:, :1], q_cos, q_sin)[0], rope(k[:, :1], k, cos, sin)[1]

    def project_values(self, layer_idx: int, normed: torch.Tensor) -> torch.Tensor:
        """Values ``v [B, H_kv, N, head_dim]`` of layer ``layer_idx`` from its normed input ``[B, N, d]``."""
        v = self.attention(layer_idx).v_proj(normed)
        return v.view(*normed.shape[:-1], -1, self.head_dim).transpose(1, 2)

    def attention_scale(self, layer_idx: int) -> float:
        """The factor multiplying ``q k^T`` in layer ``layer_idx`` (``head_dim^-1/2`` unless overridden)."""
        return float(getattr(self.attention(layer_idx), "scaling", self.head_dim ** -0.5))

    def attention_probs(self, layer_idx: int, x_in: torch.Tensor, kwargs: Mapping[str, object],
                        query_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention probabilities of decoder layer ``layer_idx`` recomputed from its input ``x_in [B, N, d]``.

        ``A = softmax(scale * q k^T [+ softcap] masked by the layer's mask)`` with q, k from
        :meth:`project_qk`, in float32; ``kwargs`` are the keyword arguments the layer was called with
        (``position_embeddings``, ``attention_mask``). ``query_idx [B, Q]`` selects query rows (all ``N``
        when None), so only ``Q x N`` scores are formed. Returns ``probs [B, H, Q, N]`` (rows with no
        allowed key are 0) and ``allowed [B, Q, N]``.
        """
        layer = self.decoder_layer(layer_idx)
        if "position_embeddings" not in kwargs or not hasattr(layer, "input_layernorm"):
            raise UnsupportedModelError(
                f"decoder layer {layer_idx} ({type(layer).__name__}) gets no `position_embeddings` or has no "
                "`input_layernorm`; attention statistics need the transformers-5 layer interface. Pass "
                "attention=False to profile without VAR.")
        B, N, _ = x_in.shape
        q, k = self.project_qk(layer_idx, self.input_norm(layer_idx, x_in), kwargs["position_embeddings"])
        H, hd = q.shape[1], q.shape[-1]
        allowed = allowed_keys(kwargs.get("attention_mask"), B, N, N, x_in.device)[:, 0]
        if query_idx is not None:
            q = q.gather(2, query_idx[:, None, :, None].expand(B, H, query_idx.shape[1], hd))
            allowed = allowed.gather(1, query_idx[:, :, None].expand(B, query_idx.shape[1], N))
        Q, g = q.shape[2], H // k.shape[1]
        scores = q.float().reshape(B, k.shape[1], g * Q, hd) @ k.float().transpose(-1, -2)
        scores = scores.view(B, H, Q, N) * self.attention_scale(layer_idx)
        cap = getattr(self.attention(layer_idx), "attn_logit_softcapping", None)
        if cap:
            scores = torch.tanh(scores / cap) * cap
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        return torch.softmax(scores, dim=-1).nan_to_num(0.0), allowed

    def attention_values(self, layer_idx: int, x_in: torch.Tensor) -> torch.Tensor:
        """Values of layer ``layer_idx`` repeated to the query heads, ``[B, H, N, head_dim]``, so that
        ``attention_probs(...)[0] @ attention_values(...)`` is each head's attention output."""
        v = self.project_values(layer_idx, self.input_norm(layer_idx, x_in))
        return v.repeat_interleave(self.n_heads // v.shape[1], dim=1)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """``o_proj(Attn(q, k, v))`` through the attention implementation the layer is configured with;
        ``q [B, H, R, hd]``, ``k, v [B, H_kv, K, hd]``, ``mask`` in that implementation's encoding;
        returns ``[B, R, d]``."""
        attn = self.attention(layer_idx)
        eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)
        out, _ = attention(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling,
                           sliding_window=getattr(attn, "sliding_window", None))
        return attn.o_proj(out.reshape(q.shape[0], q.shape[2], -1))

    def finish_layer(self, layer_idx: int, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """The rest of decoder layer ``layer_idx`` after attention: residual, norms and MLP, on the rows
        ``x [B, R, d]`` whose attention output is ``attn_out [B, R, d]`` (:meth:`attend`)."""
        layer = self.decoder_layer(layer_idx)
        if ROW_SPLIT_LAYERS[type(layer).__name__]:  # Gemma 3: norms around both sublayers
            h = x + layer.post_attention_layernorm(attn_out)
            return h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
        h = x + attn_out
        return h + layer.mlp(layer.post_attention_layernorm(h))
