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
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import HfApi, constants, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import logging as hf_logging

from ..errors import InputError, SkipitError
from ..forward import check_device
from ..paths import ENV, data_dir, models_dir
from .build import load_processor

__all__ = ["MODELS", "data_dir", "model_path", "load_tiny_vlm", "load_vlm", "resolve_model", "ModelSource"]

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
    processor = load_processor(p)
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
        processor = load_processor(where)
        dtype = dtype or torch.float32
    kwargs = dict(dtype=dtype, local_files_only=source.local_only)
    if device_map is not None:
        kwargs.update(device_map=device_map, offload_folder=offload_folder)
        if max_memory:
            kwargs["max_memory"] = max_memory
    model = AutoModelForImageTextToText.from_pretrained(where, **kwargs)
    return (model if device_map is not None else model.to(device)).eval(), processor
