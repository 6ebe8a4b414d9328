"""Build the zoo models from scratch: word-level tokenizer, processor, and random-init model.

Everything is a stock ``transformers`` class (``PreTrainedTokenizerFast``, ``CLIPImageProcessor`` /
``Qwen2VLImageProcessor``, ``LlavaProcessor`` / ``Qwen2VLProcessor``, ``LlavaForConditionalGeneration``
/ ``Qwen2VLForConditionalGeneration``), so the saved folder loads with ``AutoProcessor`` and
``AutoModelForImageTextToText`` and no custom code.

The prompt layout is the chat template saved with each processor (``chat_template.jinja``), which
:func:`skipit_core.tasks.build_prompts` applies, so a folder says how it is prompted. New models are
built ``image-first``, with their family's real layout; the folders shipped before are
``question-first`` and keep loading with their own template::

    image-first (default)
    USER: <image>\n{question} ASSISTANT:                                                    (llava)
    <|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n  (qwen2vl)

    question-first (the folders shipped before)
    USER: {question} <image> ASSISTANT:
    USER: {question} <|vision_start|><|image_pad|><|vision_end|> ASSISTANT:

The processor expands the image token to 64 (LLaVA) / 16 (Qwen2-VL) vision tokens; the tokenizer adds
``<s>`` in front and drops newlines; the answer is the next token.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from ..errors import InputError
from ..tasks import CANVAS, VOCABULARY

__all__ = ["ARCHS", "LAYOUTS", "ModelSize", "SIZES", "chat_template", "prompt_layout", "answer_cue", "build_tokenizer",
           "build_processor", "build_model", "build", "save_processor", "load_processor"]

ARCHS = ("llava", "qwen2vl")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
IMAGE_TOKENS = {
    "llava": ["<image>"],
    "qwen2vl": ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"],
}
IMAGE_BLOCK = {"llava": "<image>", "qwen2vl": "<|vision_start|><|image_pad|><|vision_end|>"}
CHAT_WORDS = ["user", ":", "assistant"]
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]


LAYOUTS = ("image-first", "question-first")
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]  # Qwen's turn markers (image-first qwen2vl only)

_QUESTION_FIRST = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %} BLOCK{% endif %}{% endfor %}"
    "{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_LLAVA_IMAGE_FIRST = (  # LLaVA-1.5: the images of a turn, then its text
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>{{ '\\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_QWEN_IMAGE_FIRST = (  # Qwen2-VL's ChatML: parts in the order given (build_prompts puts the image first)
    "{% for message in messages %}<|im_start|>{{ message['role'] }}{{ '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)


def chat_template(arch: str, layout: str = "image-first") -> str:
    """The chat template of ``arch`` in ``layout`` (see the module docstring).

    ``image-first`` is each family's real layout: every question token can read the image.
    ``question-first`` (``USER: {question} <image> ASSISTANT:``, whatever the order of the message's
    parts) is the layout of the folders shipped before; kept so they can be rebuilt and compared.
    """
    _check_arch(arch)
    _check_layout(layout)
    if layout == "question-first":
        return _QUESTION_FIRST.replace("BLOCK", IMAGE_BLOCK[arch])
    return _LLAVA_IMAGE_FIRST if arch == "llava" else _QWEN_IMAGE_FIRST


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise InputError(f"unknown prompt layout {layout!r}; choose from {', '.join(LAYOUTS)}.")


def prompt_layout(prompt: str, question: str = "{question}") -> str:
    """``"image-first"`` or ``"question-first"``: where the image sits in a prompt rendered for ``question``
    (e.g. ``build_prompts(processor, ["{question}"])[0]``, the ``prompt`` of a card's ``eval.json``)."""
    image = min((i for i in (prompt.find(t) for t in ("<image>", "<|vision_start|>", "<|image_pad|>")) if i >= 0),
                default=-1)
    if image < 0 or question not in prompt:
        raise InputError(f"cannot place the image and the question in the prompt {prompt!r}.")
    return "image-first" if image < prompt.find(question) else "question-first"


def answer_cue(tokenizer) -> tuple[int, int]:
    """The two token ids right before every answer in the zoo templates: ``assistant :`` (``ASSISTANT:``),
    or ``<|im_start|> assistant`` in ChatML (a tokenizer that has ``<|im_start|>``)."""
    chatml = tokenizer.convert_tokens_to_ids("<|im_start|>") not in (None, tokenizer.unk_token_id)
    return tuple(tokenizer.convert_tokens_to_ids(["<|im_start|>", "assistant"] if chatml else ["assistant", ":"]))


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise InputError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}.")


def build_tokenizer(arch: str = "llava", layout: str = "image-first"):
    """A word-level ``PreTrainedTokenizerFast``: lower-casing, split on whitespace and punctuation,
    vocabulary = special tokens + image tokens (+ ChatML turn markers for image-first Qwen2-VL) + chat
    words + the DigitScenes words; ``<s>`` prepended."""
    _check_arch(arch)
    _check_layout(layout)
    special = SPECIAL + IMAGE_TOKENS[arch] + (CHATML_TOKENS if (arch, layout) == ("qwen2vl", "image-first") else [])
    words = special + CHAT_WORDS + [w for w in VOCABULARY if w not in CHAT_WORDS]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(special)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="left", model_max_length=512,
                                   clean_up_tokenization_spaces=False)
    return fast


def build_processor(arch: str = "llava", layout: str = "image-first"):
    """The processor of ``arch`` with the chat template of ``layout``: 64x64 images stay 64x64; image
    tokens expand to 64 (LLaVA) / 16 (Qwen2-VL)."""
    tokenizer = build_tokenizer(arch, layout)
    if arch == "llava":
        image_processor = tf.CLIPImageProcessor(
            size={"shortest_edge": CANVAS}, crop_size={"height": CANVAS, "width": CANVAS},
            do_resize=True, do_center_crop=True, image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
        return tf.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                 vision_feature_select_strategy="default", chat_template=chat_template(arch, layout),
                                 image_token="<image>", num_additional_image_tokens=1)
    image_processor = tf.Qwen2VLImageProcessor(**QWEN_IMAGE)
    return qwen_processor(image_processor, tokenizer, chat_template(arch, layout))


QWEN_IMAGE = dict(patch_size=8, merge_size=2, temporal_patch_size=1, min_pixels=CANVAS * CANVAS,
                  max_pixels=CANVAS * CANVAS, image_mean=IMAGE_MEAN, image_std=IMAGE_STD)


def has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def qwen_processor(image_processor, tokenizer, template: str):
    """A ``Qwen2VLProcessor``; with torchvision it has its video processor, without it none (images only)."""
    if has_torchvision():
        video = tf.Qwen2VLVideoProcessor(**{k: v for k, v in QWEN_IMAGE.items() if k not in ("min_pixels", "max_pixels")})
        return tf.Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video,
                                   chat_template=template)
    # transformers' video processors need torchvision, images do not: let this one instance take
    # video_processor=None (its class check is shadowed on the instance during __init__ only)
    processor = tf.Qwen2VLProcessor.__new__(tf.Qwen2VLProcessor)
    check = processor.check_argument_for_proper_class
    processor.check_argument_for_proper_class = lambda name, arg: None if name == "video_processor" and arg is None \
        else check(name, arg)
    try:
        processor.__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                           chat_template=template)
    finally:
        del processor.check_argument_for_proper_class
    return processor


def video_processor_dict() -> dict:
    """The video processor entry of ``processor_config.json`` (what ``AutoProcessor`` needs to build
    ``Qwen2VLProcessor`` where torchvision is installed)."""
    return dict(video_processor_type="Qwen2VLVideoProcessor", patch_size=8, merge_size=2, temporal_patch_size=1,
                image_mean=IMAGE_MEAN, image_std=IMAGE_STD, do_resize=True, do_rescale=True, do_normalize=True,
                do_convert_rgb=True, size={"shortest_edge": CANVAS * CANVAS, "longest_edge": CANVAS * CANVAS},
                min_pixels=CANVAS * CANVAS, max_pixels=CANVAS * CANVAS)


def save_processor(processor, path) -> None:
    """``processor.save_pretrained(path)``; for a Qwen2VLProcessor built without torchvision, the same
    files written by hand (tokenizer, chat template, processor_config.json with image and video entries)."""
    if getattr(processor, "video_processor", "absent") is not None:
        processor.save_pretrained(path)
        return
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    processor.tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(processor.chat_template)
    image = processor.image_processor.to_dict()
    image["image_processor_type"] = "Qwen2VLImageProcessor"
    for key in list(image):
        if key.startswith("_"):
            image.pop(key)
    config = {"processor_class": type(processor).__name__, "image_processor": image,
              "video_processor": video_processor_dict()}
    (path / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_processor(path):
    """``AutoProcessor.from_pretrained(path)``; a Qwen2-VL folder in an environment without torchvision
    is assembled from its tokenizer, image processor and chat template (no video processor)."""
    path = Path(path)
    cfg_file = path / "processor_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    if cfg.get("processor_class") != "Qwen2VLProcessor" or has_torchvision():
        return tf.AutoProcessor.from_pretrained(path, local_files_only=True)
    image_cfg = {k: v for k, v in cfg["image_processor"].items() if k != "image_processor_type"}
    image_processor = tf.Qwen2VLImageProcessorPil(**image_cfg)
    tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    template = (path / "chat_template.jinja").read_text() if (path / "chat_template.jinja").exists() else None
    return qwen_processor(image_processor, tokenizer, template)


@dataclass
class ModelSize:
    """Sizes of a zoo model (text backbone and vision tower)."""

    hidden: int = 128
    layers: int = 12
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 384
    vision_hidden: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    vision_intermediate: int = 256
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


SIZES = {"llava": ModelSize(), "qwen2vl": ModelSize()}


def build_model(arch: str, tokenizer, size: ModelSize | None = None, seed: int = 0):
    """A random-init model of ``arch`` whose special-token ids match ``tokenizer``."""
    _check_arch(arch)
    s = size or SIZES[arch]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL + IMAGE_TOKENS[arch]}
    common = dict(vocab_size=len(tokenizer), hidden_size=s.hidden, intermediate_size=s.intermediate,
                  num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                  max_position_embeddings=256, rms_norm_eps=1e-6, pad_token_id=ids["<pad>"],
                  bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    if arch == "llava":
        cfg = tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(
                hidden_size=s.vision_hidden, intermediate_size=s.vision_intermediate,
                num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads, image_size=CANVAS,
                patch_size=8, num_channels=3, projection_dim=s.vision_hidden),
            text_config=tf.LlamaConfig(head_dim=s.hidden // s.heads, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common),
            image_token_index=ids["<image>"], vision_feature_select_strategy="default", vision_feature_layer=-1,
            image_seq_length=(CANVAS // 8) ** 2, projector_hidden_act="gelu", tie_word_embeddings=False,
        )
        model = tf.LlavaForConditionalGeneration(cfg)
    else:
        head_dim = s.hidden // s.heads
        # M-RoPE splits head_dim/2 rotary frequencies into (temporal, height, width) sections
        half = head_dim // 2
        section = [half // 2, half // 4, half - half // 2 - half // 4]
        cfg = tf.Qwen2VLConfig(
            vision_config=dict(depth=s.vision_layers, embed_dim=s.vision_hidden, hidden_size=s.hidden,
                               num_heads=s.vision_heads, mlp_ratio=s.vision_intermediate // s.vision_hidden,
                               patch_size=8, spatial_merge_size=2, temporal_patch_size=1, in_channels=3),
            text_config=dict(common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "mrope_section": section}),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=False,
        )
        model = tf.Qwen2VLForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = ids["<pad>"]
    model.generation_config.bos_token_id = ids["<s>"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    chatml = im_end not in (None, tokenizer.unk_token_id)
    model.generation_config.eos_token_id = [ids["</s>"], im_end] if chatml else ids["</s>"]  # a turn ends there
    return model


def build(arch: str = "llava", size: ModelSize | None = None, seed: int = 0, layout: str = "image-first"):
    """``(model, processor)``: a fresh random-init model and its processor (prompted in ``layout``)."""
    processor = build_processor(arch, layout)
    return build_model(arch, processor.tokenizer, size, seed), processor
