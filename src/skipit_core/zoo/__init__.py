"""The small trained VLMs the book runs on by default, loaded like any Hugging Face checkpoint.

Two models answer :class:`skipit_core.tasks.DigitScenes` questions:

* ``digits-llava``: ``LlavaForConditionalGeneration`` (CLIP vision tower, 64 px, patch 8 -> 64 vision
  tokens; Llama backbone of 12 decoder layers);
* ``digits-qwen2vl``: ``Qwen2VLForConditionalGeneration`` (M-RoPE; 64 px, patch 8, merge 2 -> 16 vision
  tokens, one per grid cell; Qwen2 backbone of 12 decoder layers).

Each lives in ``data/models/<name>/`` as safetensors + configs + a word-level tokenizer + processor,
saved with ``save_pretrained`` and loaded exactly as a reader loads ``llava-hf/llava-1.5-7b-hf``::

    from transformers import AutoModelForImageTextToText, AutoProcessor
    processor = AutoProcessor.from_pretrained("data/models/digits-llava")
    model = AutoModelForImageTextToText.from_pretrained("data/models/digits-llava")

:func:`load_tiny_vlm` does that and finds the folder. (transformers' Qwen2-VL video processor needs
torchvision; where it is missing, :func:`skipit_core.zoo.build.load_processor` assembles the same
``Qwen2VLProcessor`` from the saved tokenizer, image processor and chat template, without video.) Build: :mod:`skipit_core.zoo.build`; train:
``python -m skipit_core.zoo.train``; model card: ``python -m skipit_core.zoo.card``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SkipitError
from ..paths import ENV, data_dir, models_dir

__all__ = ["MODELS", "data_dir", "model_path", "load_tiny_vlm", "load_vlm"]

MODELS = ("digits-llava", "digits-qwen2vl")


def model_path(name: str = "digits-llava", path: str | os.PathLike | None = None) -> Path:
    """Folder of zoo model ``name`` (or ``path`` itself when given)."""
    if path is not None:
        p = Path(path).expanduser()
    else:
        if name not in MODELS:
            raise SkipitError(f"unknown zoo model {name!r}; choose from {', '.join(MODELS)} "
                              "or pass path= to a saved folder.")
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
    import torch
    from transformers import AutoModelForImageTextToText

    from .build import load_processor

    p = model_path(name, path)
    processor = load_processor(p)
    model = AutoModelForImageTextToText.from_pretrained(p, local_files_only=True,
                                                        dtype=dtype or torch.float32)
    return model.to(device).eval(), processor


def load_vlm(model_id: str = "digits-llava", *, device: str | None = None, dtype=None):
    """``(model, processor)`` for any ``model_id`` a chapter's parameters cell may name.

    A zoo name (``digits-llava``, ``digits-qwen2vl``) loads the bundled model from ``data/``; a local
    folder or a Hugging Face id (``llava-hf/llava-1.5-7b-hf``, ``Qwen/Qwen2-VL-2B-Instruct`` ...) goes
    through ``AutoProcessor`` / ``AutoModelForImageTextToText`` with ``dtype`` (default: bfloat16 on a
    GPU, float32 on the CPU) on ``device`` (default: CUDA when available). The model is in eval mode.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep notebook outputs to what the chapter shows
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model_id in MODELS:
        return load_tiny_vlm(model_id, device=device, dtype=dtype)
    if Path(model_id).expanduser().is_dir():
        return load_tiny_vlm(path=model_id, device=device, dtype=dtype)
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    processor = AutoProcessor.from_pretrained(model_id)
    model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=dtype)
    return model.to(device).eval(), processor
