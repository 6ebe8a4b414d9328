"""skipit_core: when may a vision-language model skip layers?

The library behind the *skipit* book. It implements the redundancy notions and theorems of
Hartman et al., "Skip-It? Theoretical Conditions for Layer Skipping in Vision-Language Models"
(arXiv:2509.25584, ICML 2026) in this project's own formulation, measures them on real Hugging Face
VLMs, and skips work that the measures say is redundant.

    import skipit_core as sk
    bb = sk.Backbone.of(model)                  # the LLM backbone of a supported VLM
    prof = sk.profile(model, batches)           # one streaming pass: per-layer, per-modality stats
    prof.mean_cos_dist("vision")

Submodules are imported on first use (``sk.information``, ``sk.theory`` ...) and the top level imports
only ``errors`` and ``utils``, which do not import torch, so ``import skipit_core`` loads neither torch
nor transformers (``tests/test_utils.py`` checks it) and takes well under a second; the main names
are available at top level and import their submodule when first touched.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import InputError, NumericalError, PlanError, SkipitError, UnsupportedModelError
from .utils import set_seed

__version__ = "0.1.0"

SUBMODULES = (
    "models", "forward", "capture", "measures", "information", "theory", "stats", "skip", "band",
    "bench", "tasks", "zoo", "plotting", "cli", "utils",
)

# top-level name -> submodule that defines it
_EXPORTS = {
    "Backbone": "models",
    "profile": "capture",
    "LayerProfile": "capture",
    "SkipPlan": "skip",
    "skipping": "skip",
    "load_tiny_vlm": "zoo",
    "predict_band": "band",
    "BandPrediction": "band",
}

__all__ = [
    "SkipitError", "UnsupportedModelError", "InputError", "NumericalError", "PlanError",
    "set_seed", "__version__", *SUBMODULES, *_EXPORTS,
]


def __getattr__(name: str) -> Any:
    if name in SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'skipit_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
