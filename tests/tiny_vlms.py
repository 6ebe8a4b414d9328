"""Tiny random-init VLMs of every supported transformers class, and inputs for them.

Each builder returns a real ``transformers`` model (no mocks) small enough to run on a CPU in
milliseconds, and ``make_inputs`` returns a dict of model inputs exactly as the class's processor
would: ``input_ids`` with the image token repeated once per vision embedding, ``pixel_values`` and the
class's extra keys (``image_grid_thw`` and ``mm_token_type_ids`` for Qwen, ``token_type_ids`` for
PaliGemma/Gemma 3, ``pixel_attention_mask`` for Idefics3/SmolVLM). Prompts are random text tokens
around the image block; ``pad_left`` left-pads with ``pad_token_id`` and zero attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import transformers as tf

TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, max_position_embeddings=512, rms_norm_eps=1e-6, vocab_size=128)
PAD_ID = 0
BOS_ID = 1
IMAGE_ID = 100  # image token id used by every tiny config


@dataclass
class Tiny:
    """A tiny model and how to feed it: ``image_tokens`` vision embeddings per image, and
    ``pixels(n_images)`` returning the pixel inputs of ``n_images`` images."""

    name: str
    model: torch.nn.Module
    image_tokens: int
    pixels: Callable[[int], dict]

    def inputs(self, prompts=((2, 3),), images=None, seed: int = 0, pad_left: bool = True) -> dict:
        """A batch as the class's processor returns it.

        ``prompts`` gives per sample ``(n_before, n_after)``: BOS, ``n_before`` random text tokens, the
        image block, ``n_after`` text tokens (``images[i] = False`` leaves the image out). Shorter
        samples are padded on the left (or right) with ``PAD_ID`` and attention 0.
        """
        gen = torch.Generator().manual_seed(seed)
        images = [True] * len(prompts) if images is None else list(images)
        rows = []
        for (before, after), has_image in zip(prompts, images):
            text = torch.randint(2, IMAGE_ID, (before + after,), generator=gen).tolist()
            block = [IMAGE_ID] * self.image_tokens if has_image else []
            rows.append([BOS_ID] + text[:before] + block + text[before:])
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), PAD_ID)
        attention = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if pad_left else slice(0, len(row))
            ids[i, span] = torch.tensor(row)
            attention[i, span] = 1
        out = {"input_ids": ids, "attention_mask": attention}
        n_images = sum(images)
        if n_images:
            torch.manual_seed(seed)
            out.update(self.pixels(n_images))
        if self.name.startswith("qwen"):
            out["mm_token_type_ids"] = (ids == IMAGE_ID).int()
        if self.name == "gemma3":
            out["token_type_ids"] = (ids == IMAGE_ID).long()
        if self.name == "paligemma":  # prefix (image + prompt) = 0, as the processor returns without a suffix
            out["token_type_ids"] = torch.zeros_like(ids)
        return out


def make(name: str, n_layers: int = 4, seed: int = 0, attn: str = "sdpa") -> Tiny:
    """A tiny random-init model of class family ``name`` (a key of ``BUILDERS``), in eval mode."""
    torch.manual_seed(seed)
    model, image_tokens, pixels = BUILDERS[name](n_layers)
    model.set_attn_implementation(attn)
    return Tiny(name, model.eval(), image_tokens, pixels)


def _clip(**kw):
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                image_size=16, patch_size=8, **kw)


def _text(n_layers, **kw):
    return dict(TEXT, num_hidden_layers=n_layers, **kw)


def build_llava(n_layers=4):
    cfg = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(**_clip()),
        text_config=tf.LlamaConfig(**_text(n_layers, pad_token_id=PAD_ID)),
        image_token_index=IMAGE_ID, vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_seq_length=4,
    )
    model = tf.LlavaForConditionalGeneration(cfg)
    n_img = 4  # (16/8)^2 patches; "default" drops CLS

    def extra(n_images):
        return {"pixel_values": torch.randn(n_images, 3, 16, 16)}

    return model, n_img, extra


def _qwen_extra(patch, merge, temporal, grid_hw):
    """Flattened patches and grid sizes as Qwen's image processor returns them."""
    h, w = grid_hw

    def extra(n_images):
        n_patches = h * w
        return {
            "pixel_values": torch.randn(n_images * n_patches, 3 * temporal * patch * patch),
            "image_grid_thw": torch.tensor([[1, h, w]] * n_images),
        }

    return extra


QWEN_IDS = dict(image_token_id=IMAGE_ID, video_token_id=IMAGE_ID + 1,
                vision_start_token_id=IMAGE_ID + 2, vision_end_token_id=IMAGE_ID + 3)


def _qwen_text(n_layers):
    return _text(n_layers, bos_token_id=BOS_ID, eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "mrope_section": [2, 1, 1]})


def build_qwen2_vl(n_layers=4):
    cfg = tf.Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=1),
        text_config=_qwen_text(n_layers), **QWEN_IDS,
    )
    return tf.Qwen2VLForConditionalGeneration(cfg), 4, _qwen_extra(4, 2, 1, (4, 4))


def build_qwen2_5_vl(n_layers=4):
    cfg = tf.Qwen2_5_VLConfig(
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=1, out_hidden_size=32,
                           window_size=16, fullatt_block_indexes=[0]),
        text_config=_qwen_text(n_layers), **QWEN_IDS,
    )
    return tf.Qwen2_5_VLForConditionalGeneration(cfg), 4, _qwen_extra(4, 2, 1, (4, 4))


def build_qwen3_vl(n_layers=4):
    cfg = tf.Qwen3VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=1, out_hidden_size=32,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        text_config=_text(n_layers, bos_token_id=BOS_ID, eos_token_id=2,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                           "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
        **QWEN_IDS,
    )
    return tf.Qwen3VLForConditionalGeneration(cfg), 4, _qwen_extra(4, 2, 1, (4, 4))


def build_idefics3(n_layers=4, cls=tf.Idefics3ForConditionalGeneration, cfg_cls=tf.Idefics3Config):
    cfg = cfg_cls(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=16, patch_size=4),
        text_config=tf.LlamaConfig(**_text(n_layers, pad_token_id=PAD_ID)),
        image_token_id=IMAGE_ID, scale_factor=2,
    )
    n_img = (16 // 4) ** 2 // 2**2

    def extra(n_images):
        return {"pixel_values": torch.randn(n_images, 1, 3, 16, 16),
                "pixel_attention_mask": torch.ones(n_images, 1, 16, 16, dtype=torch.bool)}

    return cls(cfg), n_img, extra


def build_smolvlm(n_layers=4):
    return build_idefics3(n_layers, tf.SmolVLMForConditionalGeneration, tf.SmolVLMConfig)


def build_paligemma(n_layers=4):
    cfg = tf.PaliGemmaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=16, patch_size=4),
        text_config=dict(TEXT, num_hidden_layers=n_layers, model_type="gemma", pad_token_id=PAD_ID),
        image_token_index=IMAGE_ID, projection_dim=32, hidden_size=32, vocab_size=TEXT["vocab_size"],
    )
    cfg.vision_config.projection_dim = 32

    def extra(n_images):
        return {"pixel_values": torch.randn(n_images, 3, 16, 16)}

    return tf.PaliGemmaForConditionalGeneration(cfg), 16, extra


def build_gemma3(n_layers=4):
    cfg = tf.Gemma3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=16, patch_size=4),
        text_config=dict(TEXT, num_hidden_layers=n_layers, sliding_window=8, pad_token_id=PAD_ID),
        image_token_index=IMAGE_ID, boi_token_index=IMAGE_ID + 2, eoi_token_index=IMAGE_ID + 3,
        mm_tokens_per_image=4,
    )

    def extra(n_images):
        return {"pixel_values": torch.randn(n_images, 3, 16, 16)}

    model = tf.Gemma3ForConditionalGeneration(cfg)
    # HF initialises the projection to zeros: every image token would be the zero vector.
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.2)
    return model, 4, extra


def build_llava_next(n_layers=4):
    cfg = tf.LlavaNextConfig(
        vision_config=tf.CLIPVisionConfig(**_clip()),
        text_config=tf.LlamaConfig(**_text(n_layers, pad_token_id=PAD_ID)),
        image_token_index=IMAGE_ID, vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_grid_pinpoints=[[16, 16]],
    )
    model = tf.LlavaNextForConditionalGeneration(cfg)

    def extra(n_images):
        return {"pixel_values": torch.randn(n_images, 2, 3, 16, 16),
                "image_sizes": torch.tensor([[16, 16]] * n_images)}

    return model, 10, extra


BUILDERS = {
    "llava": build_llava, "llava_next": build_llava_next, "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl, "qwen3_vl": build_qwen3_vl, "idefics3": build_idefics3,
    "smolvlm": build_smolvlm, "paligemma": build_paligemma, "gemma3": build_gemma3,
}


def layer_io(model, inputs: dict):
    """Plain reference: every decoder layer's ``(input, output)`` in float64, and the logits.

    Hooks read ``args[0]`` and the returned tensor of each layer of ``Backbone.of(model).layers``.
    """
    from skipit_core.models import Backbone

    bb = Backbone.of(model)
    seen = {}
    hooks = [layer.register_forward_hook(
        lambda m, a, kw, out, i=i: seen.__setitem__(i, (a[0].double(), out.double())), with_kwargs=True)
        for i, layer in enumerate(bb.layers)]
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        for h in hooks:
            h.remove()
    return [seen[i] for i in range(bb.n_layers)], logits
