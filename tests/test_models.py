"""Backbone.of on every supported class, token kinds, input checks and the unsupported-model error."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn

from skipit_core.errors import InputError, UnsupportedModelError
from skipit_core.models import FAMILIES, Backbone, TokenKind, allowed_keys, token_kinds
from tiny_vlms import BUILDERS, IMAGE_ID, PAD_ID, TEXT, make

TEXT_MODEL_ATTR = {"idefics3": "text_model", "smolvlm": "text_model"}




@pytest.mark.parametrize("name", list(BUILDERS))
def test_backbone_finds_layers_and_sizes(name):
    tiny = make(name, n_layers=3)
    bb = Backbone.of(tiny.model)
    inner = getattr(tiny.model.model, TEXT_MODEL_ATTR.get(name, "language_model"))
    assert bb.layers is inner.layers
    assert bb.n_layers == 3 == len(bb.layers)
    assert bb.hidden_size == TEXT["hidden_size"]
    assert Backbone.of(bb) is bb
    assert type(tiny.model).__name__ in repr(bb)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_vision_mask_is_image_token_from_config(name):
    tiny = make(name)
    bb = Backbone.of(tiny.model)
    cfg = tiny.model.config
    image_id = getattr(cfg, "image_token_id", None)
    image_id = getattr(cfg, "image_token_index", None) if image_id is None else image_id
    inputs = tiny.inputs(prompts=[(2, 3), (0, 1)], images=[True, False])
    mask = bb.vision_mask(inputs["input_ids"])
    assert torch.equal(mask, inputs["input_ids"] == image_id)
    assert mask[0].sum() == tiny.image_tokens and mask[1].sum() == 0


def test_unsupported_text_only_model_names_class_and_lists_supported():
    cfg = tf.LlamaConfig(**dict(TEXT, num_hidden_layers=1))
    with pytest.raises(UnsupportedModelError) as err:
        Backbone.of(tf.LlamaForCausalLM(cfg))
    msg = str(err.value)
    assert "LlamaForCausalLM" in msg
    for family in FAMILIES:
        assert family.classes[0] in msg


def test_unsupported_plain_module_and_non_module():
    with pytest.raises(UnsupportedModelError, match="Linear.*Supported classes.*LlavaForConditionalGeneration"):
        Backbone.of(nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError, match="nn.Module.*str"):
        Backbone.of("llava")


@pytest.mark.parametrize("name,key", [("qwen2_vl", "mm_token_type_ids"), ("qwen2_5_vl", "mm_token_type_ids"),
                                      ("qwen3_vl", "mm_token_type_ids"), ("paligemma", "token_type_ids"),
                                      ("gemma3", "token_type_ids")])
def test_check_inputs_requires_class_companions(name, key):
    tiny = make(name)
    bb = Backbone.of(tiny.model)
    inputs = tiny.inputs()
    bb.check_inputs(inputs)  # complete inputs pass
    inputs.pop(key)
    with pytest.raises(InputError, match=f"lack `{key}`.*processor"):
        bb.check_inputs(inputs)


def test_check_inputs_needs_dict_with_input_ids():
    bb = Backbone.of(make("llava").model)
    with pytest.raises(InputError, match="dict"):
        bb.check_inputs([1, 2])
    with pytest.raises(InputError, match="input_ids"):
        bb.check_inputs({"pixel_values": torch.zeros(1)})


def test_token_kinds_with_left_padding():
    tiny = make("llava")
    inputs = tiny.inputs(prompts=[(2, 3), (0, 1)], images=[True, True], pad_left=True)
    kinds = Backbone.of(tiny.model).token_kinds(inputs["input_ids"], inputs["attention_mask"])
    ids, att = inputs["input_ids"], inputs["attention_mask"]
    assert torch.equal(kinds == TokenKind.PAD, att == 0)
    assert torch.equal(kinds == TokenKind.VISION, (ids == IMAGE_ID) & (att == 1))
    first = att.argmax(1)  # first attended position of each (left-padded) sample
    assert (kinds[torch.arange(2), first] == TokenKind.SINK).all()
    assert (kinds == TokenKind.SINK).sum() == 2
    assert (kinds[1, : int((att[1] == 0).sum())] == TokenKind.PAD).all()
    assert (ids[kinds == TokenKind.PAD] == PAD_ID).all()


def test_token_kinds_image_first_has_no_sink():
    ids = torch.tensor([[IMAGE_ID, IMAGE_ID, 5, 6]])
    kinds = token_kinds(ids, IMAGE_ID)
    assert kinds.tolist() == [[TokenKind.VISION, TokenKind.VISION, TokenKind.TEXT, TokenKind.TEXT]]


def test_allowed_keys_formats():
    B, N = 2, 4
    causal = torch.ones(N, N).tril().bool()
    assert torch.equal(allowed_keys(None, B, N, N, torch.device("cpu"))[0, 0], causal)
    pad = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    flash = allowed_keys(pad, B, N, N, torch.device("cpu"))  # 2-D padding mask (flash attention)
    assert flash.shape == (B, 1, N, N)
    assert torch.equal(flash[0, 0], causal & pad[0].bool()[None])
    assert torch.equal(flash[1, 0], causal)
    additive = torch.zeros(B, 1, N, N).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert torch.equal(allowed_keys(additive, B, N, N, torch.device("cpu"))[:, 0], causal.expand(B, N, N))
