"""The small trained VLMs the book runs on by default, loaded like any Hugging Face checkpoint.

Two models answer :class:`skipit_core.tasks.DigitScenes` questions:

* ``digits-llava``: ``LlavaForConditionalGeneration`` (CLIP vision tower, 64 px, patch 8 -> 64 vision
  tokens; Llama backbone of 12 decoder layers);
* ``digits-qwen2vl``: ``Qwen2VLForConditionalGeneration`` (M-RoPE; 64 px, patch 8, merge 2 -> 16 vision
  tokens, one per grid cell; Qwen2 backbone of 12 decoder layers).

Each lives in ``data/models/<name>/`` as safetensors + configs + a word-level tokenizer + processor,
saved with ``save_pretrained`` and loaded exactly as a reader loads ``llava-hf/llava-1.5-7b-hf``. How a
model is prompted is its folder's ``chat_template.jinja``: models built now read the image first, in
their family's real template; the two folders shipped so far read the question first (their cards say
which; :func:`skipit_core.zoo.build.prompt_layout`)::

    from transformers import AutoModelForImageTextToText, AutoProcessor
    processor = AutoProcessor.from_pretrained("data/models/digits-llava")
    model = AutoModelForImageTextToText.from_pretrained("data/models/digits-llava")

:func:`load_tiny_vlm` does that and finds the folder. (transformers' Qwen2-VL video processor needs
torchvision; where it is missing, :func:`skipit_core.zoo.build.load_processor` assembles the same
``Qwen2VLProcessor`` from the saved tokenizer, image processor and chat template, without video.) Build: :mod:`skipit_core.zoo.build`; train:
``python -m skipit_core.zoo.train``; model card: ``python -m skipit_core.zoo.card``.

Before any weight is loaded, :func:`requirements` says what a checkpoint needs (weights and KV cache in
bytes, prefill FLOPs per prompt) from its config alone, through :func:`meta_model` (the model built on
PyTorch's meta device: shapes, no storage); :func:`load_config` and :func:`load_vlm_processor` read the
config and the processor of any ``model_id`` :func:`load_vlm` takes, and :func:`published_config` gives
the configs of LLaVA-1.5-7B and Qwen2-VL-7B-Instruct without the hub.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers as tf
from huggingface_hub import HfApi, constants, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
from transformers.utils import logging as hf_logging

from ..bench import Shapes, flops, prompt_tokens
from ..errors import InputError, SkipitError
from ..forward import check_device
from ..models import Backbone
from ..paths import ENV, data_dir, models_dir
from ..skip import SkipPlan
from .build import has_torchvision, load_processor

__all__ = ["MODELS", "data_dir", "model_path", "load_tiny_vlm", "load_vlm", "resolve_model", "ModelSource",
           "load_config", "load_vlm_processor", "folder_processor", "images_only", "meta_model", "Requirements",
           "requirements", "matmul_rate", "PUBLISHED_CONFIGS", "published_config"]

MODELS = ("digits-llava", "digits-qwen2vl")


def model_path(name: str = "digits-llava", path: str | os.PathLike | None = None) -> Path:
    """Folder of zoo model ``name`` (or ``path`` itself when given)."""
    if path is not None:
        p = Path(path).expanduser()
    else:
        if name not in MODELS:
            raise InputError(f"unknown zoo model {name!r}; pass path= to a saved folder. {_bundled(str(name))}")
        p = models_dir() / name
    if not (p / "config.json").exists():
        raise SkipitError(
            f"no saved model at {p} (config.json missing). Get the repository's data/ folder "
            f"(git clone; or set ${ENV}), or train it: "
            f"python -m skipit_core.zoo.train --arch {'qwen2vl' if 'qwen' in str(name) else 'llava'} --out {p}"
        )
    return p


def load_tiny_vlm(name: str = "digits-llava", path: str | os.PathLike | None = None, device: str = "cpu",
                  dtype=None):
    """``(model, processor)`` of a zoo model via ``AutoModelForImageTextToText`` / ``AutoProcessor``.

    The model is in eval mode on ``device`` (float32 unless ``dtype`` is given). ``path`` overrides the
    lookup in ``data/models/<name>``. No network access, no ``trust_remote_code``.
    """
    p = model_path(name, path)
    processor = folder_processor(p)
    model = AutoModelForImageTextToText.from_pretrained(p, local_files_only=True,
                                                        dtype=dtype or torch.float32)
    return model.to(device).eval(), processor


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$", re.ASCII)  # org/name
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$", re.ASCII)  # a bare repository name
HUB_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ModelSource:
    """Where :func:`load_vlm` loads ``model_id`` from: ``kind`` is ``"zoo"`` (a bundled name),
    ``"folder"`` (a saved folder) or ``"hub"`` (a Hugging Face id; ``local_only``: from the cache)."""

    kind: str
    where: str | Path
    local_only: bool = True


def _bundled(hint: str = "") -> str:
    close = difflib.get_close_matches(hint, MODELS, n=1, cutoff=0.6) if hint else []
    guess = f" Did you mean {close[0]!r}?" if close else ""
    return f"Bundled models: {', '.join(MODELS)}.{guess}"


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` as set now (or when huggingface_hub was imported)."""
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _hub_cached(model_id: str) -> bool:
    return isinstance(try_to_load_from_cache(model_id, "config.json"), str)


def resolve_model(model_id: str) -> ModelSource:
    """Where ``model_id`` is, decided at once (at most one hub query of ``HUB_TIMEOUT_S`` seconds).

    A bundled name, then an existing folder, then a Hugging Face id: ``org/name`` (where no local folder
    ``org`` exists, else it is a missing path) goes to the hub when its
    ``config.json`` is in the local cache or the hub answers that the repository exists; a bare name only
    when cached. Anything else raises :class:`InputError` naming the bundled models and the closest one.
    """
    if not isinstance(model_id, (str, os.PathLike)):
        raise InputError(f"model_id must be a string or a path; got {type(model_id).__name__}. {_bundled()}")
    text = str(model_id)
    if text in MODELS:
        return ModelSource("zoo", text)
    if not text.strip():
        raise InputError(f"model_id is empty; name a bundled model, a saved folder or a hub id. {_bundled()}")
    try:
        p = Path(text).expanduser()
        is_dir, exists = p.is_dir(), p.exists()
    except (RuntimeError, OSError, ValueError) as exc:  # ~nouser, a NUL byte, a name too long ...
        raise InputError(f"{text[:120]!r} is not a usable path ({type(exc).__name__}: {str(exc)[:120]}). "
                         f"{_bundled()}") from None
    if is_dir:
        return ModelSource("folder", p)
    if exists:
        raise InputError(f"{text} is a file, not a model folder; pass the folder that holds config.json "
                         f"(e.g. {p.parent}). {_bundled()}")
    if HUB_ID.match(text) and not text.startswith((".", "~")) and not p.parent.is_dir():
        return _hub_source(text)  # org/name, and no local folder "org" it could be a path into
    if os.sep in text or text.startswith((".", "~")):
        raise InputError(f"no folder at {text}. {_bundled(p.name)}")
    if HUB_NAME.match(text) and _hub_cached(text):
        return ModelSource("hub", text)
    raise InputError(f"unknown model {text!r}: not a bundled model, not a folder, and not a Hugging Face id "
                     f"(org/name) in the local cache. {_bundled(text)}")


def _hub_source(model_id: str) -> ModelSource:
    try:
        validate_repo_id(model_id)
    except HFValidationError as exc:
        raise InputError(f"{model_id!r} is not a valid Hugging Face id ({exc}). {_bundled()}") from None
    cached = _hub_cached(model_id)
    if _hub_offline():
        if cached:
            return ModelSource("hub", model_id)
        raise InputError(f"{model_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                         f"download it where the hub is reachable (`hf download {model_id}`), or unset "
                         f"HF_HUB_OFFLINE. {_bundled()}")
    try:
        HfApi().model_info(model_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return ModelSource("hub", model_id, local_only=cached)  # exists; transformers explains the access
    except RepositoryNotFoundError:
        if cached:
            return ModelSource("hub", model_id)
        raise InputError(f"{model_id!r} is not on the Hugging Face hub (or is private: log in with "
                         f"`hf auth login`). {_bundled(model_id.split('/')[-1])}") from None
    except Exception as exc:  # no network, DNS, proxy, timeout, server error
        if cached:
            return ModelSource("hub", model_id)
        raise InputError(f"the Hugging Face hub is not reachable ({type(exc).__name__}: {exc}) and {model_id!r} "
                         f"is not in the local cache: connect, or download it elsewhere and copy the cache "
                         f"(`hf download {model_id}`), or pass a local folder. {_bundled()}") from None
    return ModelSource("hub", model_id, local_only=False)


def load_vlm(model_id: str = "digits-llava", *, device: str | None = None, dtype=None, device_map=None,
             max_memory: dict | None = None, offload_folder: str | os.PathLike | None = None):
    """``(model, processor)`` for any ``model_id`` a chapter's parameters cell may name.

    A zoo name (``digits-llava``, ``digits-qwen2vl``) loads the bundled model from ``data/``; a local
    folder or a Hugging Face id (``llava-hf/llava-1.5-7b-hf``, ``Qwen/Qwen2-VL-2B-Instruct`` ...) goes
    through ``AutoProcessor`` / ``AutoModelForImageTextToText`` with ``dtype`` (default: bfloat16 on a
    GPU, float32 on the CPU) on ``device`` (default: CUDA when available). The model is in eval mode.
    Where ``model_id`` is gets decided first (:func:`resolve_model`): a typo, a missing folder or an id
    that is neither cached nor on a reachable hub raises :class:`InputError` at once.

    ``device_map`` (``"auto"``, a dict ...), ``max_memory`` and ``offload_folder`` go to transformers'
    ``from_pretrained`` (accelerate dispatches the layers over GPUs, CPU and disk); ``device`` is then
    unused. Skip plans and profiles run through accelerate's hooks unchanged.
    """
    source = resolve_model(model_id)
    hf_logging.disable_progress_bar()  # keep notebook outputs to what the chapter shows
    device = str(check_device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    if device_map is None and source.kind == "zoo":
        return load_tiny_vlm(str(source.where), device=device, dtype=dtype)
    if device_map is None and source.kind == "folder":
        return load_tiny_vlm(path=source.where, device=device, dtype=dtype)
    where = model_path(source.where) if source.kind == "zoo" else source.where
    if source.kind == "hub":
        processor = AutoProcessor.from_pretrained(where, local_files_only=source.local_only)
        on_gpu = torch.cuda.is_available() if device_map is not None else device.startswith("cuda")
        dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
    else:
        processor = folder_processor(where)
        dtype = dtype or torch.float32
    kwargs = dict(dtype=dtype, local_files_only=source.local_only)
    if device_map is not None:
        kwargs.update(device_map=device_map, offload_folder=offload_folder)
        if max_memory:
            kwargs["max_memory"] = max_memory
    model = AutoModelForImageTextToText.from_pretrained(where, **kwargs)
    return (model if device_map is not None else model.to(device)).eval(), processor


# ----------------------------------------------------------------------------- without the weights
def _where(model_id) -> tuple[str | Path, bool]:
    """``(folder or hub id, local_files_only)`` of ``model_id`` (decided by :func:`resolve_model`)."""
    source = resolve_model(model_id)
    if source.kind == "zoo":
        return model_path(str(source.where)), True
    return source.where, source.local_only


def load_config(model_id: str | os.PathLike = "digits-llava"):
    """``transformers.AutoConfig.from_pretrained`` of any ``model_id`` :func:`load_vlm` takes (a bundled
    name, a saved folder, a Hugging Face id): the config alone, a few kilobytes, no weights."""
    where, local = _where(model_id)
    return AutoConfig.from_pretrained(where, local_files_only=local)


#: processors whose class takes a video processor, which transformers builds only with torchvision
_VIDEO_CLASSES = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen3VLProcessor")


def folder_processor(path: str | os.PathLike):
    """The processor saved in folder ``path``: ``AutoProcessor.from_pretrained(path)``.

    Where torchvision is missing, transformers cannot build the video processor that the Qwen2-VL,
    Qwen2.5-VL and Qwen3-VL processors take; such a folder's processor is then assembled for images
    only, from its tokenizer, its image processor (the PIL backend), its chat template and the
    processor's own settings in ``processor_config.json``, with ``video_processor=None`` (Qwen2-VL:
    :func:`skipit_core.zoo.build.load_processor`). Images give the same inputs as the full processor;
    a video raises. (SmolVLM's processor reads its video processor's settings in every chat template
    and needs ``num2words``: it is left to ``AutoProcessor``, which says what to install.)
    """
    path = Path(path)
    cfg_file = path / "processor_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    name = cfg.get("processor_class")
    if name not in _VIDEO_CLASSES or has_torchvision():
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    if name == "Qwen2VLProcessor":
        return load_processor(path)
    image_cfg = {k: v for k, v in cfg.get("image_processor", {}).items() if k != "image_processor_type"}
    kind = cfg.get("image_processor", {}).get("image_processor_type", "").removesuffix("Fast")
    image_cls = getattr(tf, kind + "Pil", None) or getattr(tf, kind, None)
    if image_cls is None:
        raise SkipitError(f"{cfg_file}: unknown image processor type {kind!r}; install torchvision so that "
                          f"AutoProcessor can read the folder.")
    template = path / "chat_template.jinja"
    settings = {k: v for k, v in cfg.items() if k not in ("processor_class", "image_processor", "video_processor",
                                                           "auto_map", "chat_template")}
    return images_only(getattr(tf, name), image_processor=image_cls(**image_cfg),
                        tokenizer=AutoTokenizer.from_pretrained(path, local_files_only=True),
                        chat_template=template.read_text() if template.exists() else None, **settings)


def images_only(cls, **kwargs):
    """``cls(video_processor=None, **kwargs)`` for a processor class that takes a video processor (a Qwen
    processor built where torchvision is missing): this one instance accepts ``None`` for its video processor
    (the class check is shadowed on the instance during ``__init__`` only)."""
    processor = cls.__new__(cls)
    check = processor.check_argument_for_proper_class
    processor.check_argument_for_proper_class = lambda name, arg: None if name == "video_processor" and arg is None \
        else check(name, arg)
    try:
        processor.__init__(video_processor=None, **kwargs)
    finally:
        del processor.check_argument_for_proper_class
    return processor


def load_vlm_processor(model_id: str | os.PathLike = "digits-llava"):
    """The processor of any ``model_id`` :func:`load_vlm` takes, without loading the model (what
    :func:`requirements` needs to count a prompt's tokens)."""
    where, local = _where(model_id)
    if isinstance(where, Path):
        return folder_processor(where)
    return AutoProcessor.from_pretrained(where, local_files_only=local)


def _llava_15_7b():
    return tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                          num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        text_config=tf.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=32064),
        image_token_index=32000, vision_feature_select_strategy="default", vision_feature_layer=-2)


def _qwen2_vl_7b():
    return tf.Qwen2VLConfig(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2))


#: hub ids whose published ``config.json`` is written out here (sizes only; no weights, nothing downloaded)
PUBLISHED_CONFIGS = {"llava-hf/llava-1.5-7b-hf": _llava_15_7b, "Qwen/Qwen2-VL-7B-Instruct": _qwen2_vl_7b}


def published_config(model_id: str = "llava-hf/llava-1.5-7b-hf"):
    """The transformers config of a published checkpoint, written out from its hub ``config.json``
    (:data:`PUBLISHED_CONFIGS`), for sizing it offline with :func:`meta_model` / :func:`requirements`.

    ``llava-hf/llava-1.5-7b-hf``: CLIP ViT-L/14 at 336 px (24 layers, d = 1024, 576 patch tokens) and a
    Llama decoder of 32 layers, d = 4096, MLP 11008, 32 heads, vocabulary 32064; about 7.06e9 parameters.
    ``Qwen/Qwen2-VL-7B-Instruct``: a 32-block ViT (d = 1280, patch 14, 2 x 2 merge) and a Qwen2 decoder of
    28 layers, d = 3584, 28 query / 4 key-value heads, M-RoPE sections (16, 24, 24); about 8.29e9 parameters.
    Where the hub is reachable, :func:`load_config` of the same id reads the real file."""
    if model_id not in PUBLISHED_CONFIGS:
        raise InputError(f"no published config is written out for {model_id!r}; known: "
                         f"{', '.join(PUBLISHED_CONFIGS)}. Use load_config(model_id) where the hub is reachable.")
    return PUBLISHED_CONFIGS[model_id]()


def meta_model(config):
    """The model of ``config`` (a transformers config, or any ``model_id``) on PyTorch's meta device:
    every parameter has its shape and dtype and no storage, so a 70B model builds in a second and
    :func:`skipit_core.bench.flops`, :class:`~skipit_core.models.Backbone` and parameter counts work on it."""
    if not isinstance(config, tf.PretrainedConfig):
        config = load_config(config)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return model.eval()


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"dtype must be a floating torch dtype (torch.float32, torch.bfloat16, 'float16' ...); "
                         f"got {dtype!r}.")
    return dtype


@dataclass(frozen=True)
class Requirements:
    """What a checkpoint needs to score prompts of ``n_vision`` vision + ``n_text`` text tokens, in batches
    of ``batch_size``, computed from its config alone (:func:`requirements`).

    ``parameters`` counts every parameter once (tied embeddings once); ``parts`` splits it into
    ``language`` (embeddings, decoder layers, final norm), ``lm_head`` (0 when tied to the embeddings)
    and ``vision`` (vision tower and projector: everything else). ``weight_bytes = parameters x
    dtype size``. ``kv_cache_bytes = 2 x L x kv_heads x head_dim x (n_vision + n_text + new_tokens) x
    batch_size x dtype size`` (keys and values of every layer at every position; sliding-window layers
    keep fewer, so it is an upper bound there). ``prefill_flops`` is the decoder prefill of one prompt
    (:func:`skipit_core.bench.flops`, causal pairs) plus the ``lm_head`` at its last position; the
    vision tower is not counted.
    """

    architecture: str
    dtype: torch.dtype
    parameters: int
    parts: dict[str, int]
    n_layers: int
    n_vision: int
    n_text: int
    new_tokens: int
    batch_size: int
    weight_bytes: int
    kv_cache_bytes: int
    prefill_flops: int
    shapes: Shapes = field(repr=False)

    @property
    def memory_bytes(self) -> int:
        """Weights plus the KV cache of one batch: the floor of what the device must hold (activations,
        the vision tower's work and the framework's own buffers come on top)."""
        return self.weight_bytes + self.kv_cache_bytes

    def seconds(self, n_samples: int, flops_per_second: float) -> float:
        """Time for ``n_samples`` prefills at ``flops_per_second``: ``n_samples x prefill_flops / rate``.
        With the rate of a dense matmul (:func:`matmul_rate`), a rough estimate that can err either way:
        the forward pass also runs work the FLOP count leaves out, and may reach another rate than one
        matmul measured once (other threads, another load on the machine)."""
        if not flops_per_second > 0:
            raise InputError(f"flops_per_second must be positive; got {flops_per_second!r}.")
        return n_samples * self.prefill_flops / flops_per_second

    def __str__(self) -> str:
        gib = 1024 ** 3
        parts = ", ".join(f"{k} {v / 1e6:.3f} M" for k, v in self.parts.items())
        return (f"{self.architecture}: {self.parameters / 1e6:.3f} M parameters ({parts}), {self.n_layers} decoder "
                f"layers\n  weights in {str(self.dtype).removeprefix('torch.')}: {self.weight_bytes / gib:.4f} GiB\n"
                f"  KV cache, batch {self.batch_size} x ({self.n_vision} vision + {self.n_text} text + "
                f"{self.new_tokens} new) positions: {self.kv_cache_bytes / gib:.4f} GiB\n"
                f"  prefill: {self.prefill_flops / 1e9:.4f} GFLOP per prompt (decoder + lm_head; vision tower "
                f"not counted)")


def _parts(model) -> dict[str, int]:
    bb = Backbone.of(model)
    seen: set[int] = set()

    def count(params) -> int:
        total = 0
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    language = count(bb.text_model.parameters())
    head = model.get_output_embeddings()
    lm_head = count(head.parameters()) if head is not None else 0
    return {"language": language, "lm_head": lm_head, "vision": count(model.parameters())}


def requirements(model_id, inputs=None, *, n_vision: int | None = None, n_text: int | None = None,
                 dtype=torch.bfloat16, batch_size: int = 1, new_tokens: int = 1) -> Requirements:
    """GPU memory and FLOPs that ``model_id`` (any id :func:`load_vlm` takes, a transformers config, or a
    model, meta device included) needs, before its weights are loaded.

    The prompt size comes from ``inputs`` (a processor batch: the first prompt's image tokens and real
    text tokens, :func:`skipit_core.bench.prompt_tokens`) or from ``n_vision`` and ``n_text``. Everything
    else is read off :func:`meta_model`: parameter counts, ``bench.Shapes`` and ``bench.flops``.
    See :class:`Requirements` for the formulas.
    """
    model = model_id if isinstance(model_id, torch.nn.Module) else meta_model(model_id)
    if inputs is not None:
        n_vision, n_text = prompt_tokens(model, inputs)
    if n_vision is None or n_text is None:
        raise InputError("give inputs (a processor batch) or both n_vision and n_text.")
    for name, value in (("n_vision", n_vision), ("n_text", n_text), ("batch_size", batch_size),
                        ("new_tokens", new_tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "batch_size" else 0):
            raise InputError(f"{name} must be a {'positive' if name == 'batch_size' else 'non-negative'} integer; "
                             f"got {value!r}.")
    if n_text < 1:
        raise InputError("n_text must be at least 1 (the answer is read at a text position).")
    dtype = _dtype(dtype)
    size = dtype.itemsize
    parts = _parts(model)
    parameters = sum(parts.values())
    s = Shapes.of(model)
    positions = n_vision + n_text + new_tokens
    kv = 2 * s.n_layers * s.kv_heads * s.head_dim * positions * batch_size * size
    report = flops(model, n_vision, n_text, SkipPlan.none(), text_before=min(1, n_text))
    return Requirements(type(model).__name__, dtype, parameters, parts, s.n_layers, n_vision, n_text, new_tokens,
                        batch_size, parameters * size, kv, report.total + report.head_per_position, s)


def matmul_rate(device: str | torch.device = "cpu", dtype=torch.float32, size: int = 512, repeats: int = 5) -> float:
    """FLOP/s of one dense ``size x size`` matmul on ``device`` in ``dtype`` (the median of ``repeats``
    timed runs after one warm-up; ``2 size^3`` FLOPs each), the rate :meth:`Requirements.seconds` turns
    FLOPs into seconds with. A timing of the machine as it is now: never checked as output."""
    device = check_device(str(device))
    if not isinstance(size, int) or size < 1 or not isinstance(repeats, int) or repeats < 1:
        raise InputError(f"size and repeats must be positive integers; got {size!r}, {repeats!r}.")
    a = torch.randn(size, size, device=device, dtype=_dtype(dtype))
    b = torch.randn(size, size, device=device, dtype=a.dtype)
    samples = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            samples.append(time.perf_counter() - t0)
    return 2 * size ** 3 / statistics.median(samples)
