"""Small helpers shared across skipit_core: seeding and array conversion."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from .errors import InputError, NumericalError

__all__ = ["set_seed", "as_numpy", "check_finite"]


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so a chapter run twice gives the same outputs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def as_numpy(x, name: str = "x", dtype=np.float64) -> np.ndarray:
    """Return ``x`` (array, tensor or sequence) as a NumPy array of ``dtype`` without copying when possible."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        x = x.float() if x.is_floating_point() and dtype is not None and np.dtype(dtype).kind == "f" else x
        x = x.numpy()
    try:
        arr = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be numeric array-like; got {type(x).__name__} ({exc}).") from exc
    return arr


def check_finite(arr: np.ndarray, name: str = "x") -> np.ndarray:
    """Raise :class:`NumericalError` if ``arr`` holds a NaN or an infinity."""
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise NumericalError(f"{name} holds {bad} NaN/inf value(s); drop or impute them before estimating.")
    return arr
