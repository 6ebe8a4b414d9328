"""Small helpers shared across skipit_core: seeding, array conversion and argument checks.

This module is imported by ``import skipit_core`` and must stay torch-free at import time: torch
is only touched when it is already loaded (a tensor can exist only then) or inside
:func:`set_seed`. ``tests/test_utils.py`` checks that ``import skipit_core`` loads no torch.
"""

from __future__ import annotations

import math
import operator
import random
import sys
from typing import Any

import numpy as np

from .errors import InputError, NumericalError

__all__ = ["set_seed", "as_numpy", "check_finite", "as_int", "as_probability_level", "is_tensor"]

# torch dtypes that NumPy cannot hold (bfloat16) or that lose too much for estimation (float16):
# they are upcast to float32, which represents every value of both exactly.
_HALF_DTYPES = ("torch.float16", "torch.bfloat16")


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and CUDA).

    A chapter run twice then draws the same numbers. ``PYTHONHASHSEED`` is *not* set: it only takes
    effect when the interpreter starts, so setting it here would change nothing (export it in the
    shell, e.g. ``PYTHONHASHSEED=0 python ...``, if string-hash order matters). torch is imported
    here, not at module level, so that ``import skipit_core`` stays light.
    """
    seed = as_int(seed, "seed", minimum=0, maximum=2**63 - 1)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    import torch

    torch.manual_seed(seed)


def is_tensor(x: Any) -> bool:
    """Whether ``x`` is a ``torch.Tensor``, without importing torch (a tensor implies torch is loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _tensor_to_numpy(x) -> np.ndarray:
    """A tensor as a NumPy array of the same dtype; half precision (float16, bfloat16) becomes float32.

    float64 stays float64: casting it down would merge values closer than 1e-7 relative (and make
    valid inputs look constant or duplicated).
    """
    x = x.detach().to("cpu").resolve_conj().resolve_neg()
    if str(x.dtype) in _HALF_DTYPES:
        x = x.float()
    return x.numpy()


def as_numpy(x, name: str = "x", dtype=np.float64, numeric: bool = True) -> np.ndarray:
    """Return ``x`` (array, tensor or sequence) as a NumPy array of ``dtype`` without copying when possible.

    ``dtype=None`` keeps the input's dtype (tensors: float16/bfloat16 become float32, the rest keep
    theirs). Complex input with a real ``dtype`` is rejected instead of silently dropping the
    imaginary part; ragged sequences and (with ``numeric=True``) text, dates and objects that are
    not numbers raise :class:`InputError`.
    """
    if is_tensor(x):
        x = _tensor_to_numpy(x)
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as exc:  # e.g. ragged nested lists
        raise InputError(f"{name} must be an array-like of one shape; got {type(x).__name__} ({exc}).") from exc
    if not numeric:
        return arr
    if arr.dtype.kind == "O":  # e.g. a list of 0-d tensors or Python numbers of mixed types
        try:
            arr = arr.astype(np.float64 if dtype is None else dtype)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{name} must be numeric array-like; got objects ({exc}).") from exc
    if arr.dtype.kind in "USVMm":
        raise InputError(f"{name} must be numeric array-like; got dtype {arr.dtype}. Encode labels as "
                         "integers first, e.g. np.unique(x, return_inverse=True)[1].")
    if dtype is not None and np.dtype(dtype).kind in "fiub" and arr.dtype.kind == "c":
        raise InputError(f"{name} is complex; the estimators need real values. Pass x.real, x.imag or "
                         "np.abs(x), whichever the question is about.")
    return arr if dtype is None else arr.astype(dtype, copy=False)


def check_finite(arr: np.ndarray, name: str = "x") -> np.ndarray:
    """Raise :class:`NumericalError` if ``arr`` holds a NaN or an infinity."""
    if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise NumericalError(f"{name} holds {bad} NaN/inf value(s); drop or impute them before estimating.")
    return arr


def _is_bool(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return True
    return str(getattr(value, "dtype", "")) in ("bool", "torch.bool")


def as_int(value: Any, name: str, minimum: int | None = None, what: str = "", maximum: int | None = None) -> int:
    """``value`` as a Python ``int`` if it is integer-like, else :class:`InputError`.

    Integer-like means ``operator.index(value)`` works (``int``, ``np.int64``, a 0-d integer torch
    tensor or array), bools excepted: ``True`` is a flag, not a count. Floats (``3.0``) and strings
    (``"3"``) are rejected: pass ``int(...)`` yourself if that is what you mean. ``minimum`` is the
    smallest allowed value, ``maximum`` the largest; ``what`` says what the number is, for the message.
    """
    role = f" ({what})" if what else ""
    kind = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}.get(
        minimum, f"an integer >= {minimum}")
    example = f"e.g. {name}={max(minimum or 0, 3)}"
    if _is_bool(value):
        raise InputError(f"{name}{role} must be {kind}; got the bool {value!r}. Pass a number, {example}.")
    try:
        out = operator.index(value)
    except TypeError:
        raise InputError(f"{name}{role} must be {kind}; got {value!r} of type {type(value).__name__}. "
                         f"Pass a Python int ({example}); NumPy integers and 0-d integer tensors are "
                         "accepted too.") from None
    if minimum is not None and out < minimum:
        raise InputError(f"{name}{role} must be {kind}; got {out}.")
    if maximum is not None and out > maximum:
        raise InputError(f"{name}{role} must be at most {maximum}; got {out}.")
    return int(out)


def as_probability_level(value: Any, name: str = "confidence") -> float:
    """A level strictly inside (0, 1) (e.g. 0.95) as a float, else :class:`InputError`.

    Bools, NaN, strings and percentages (``95``) are rejected with the fix in the message.
    """
    if _is_bool(value) or isinstance(value, (str, bytes)):
        raise InputError(f"{name} must be a number in (0, 1), e.g. 0.95; got {value!r}.")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number in (0, 1), e.g. 0.95; got {value!r}.") from None
    if not (math.isfinite(v) and 0.0 < v < 1.0):
        hint = f" (a percentage? pass {v / 100:g})" if 1.0 < v < 100.0 else ""
        raise InputError(f"{name} must be in (0, 1), e.g. 0.95; got {value!r}{hint}.")
    return v
