"""The error family of skipit_core.

Every error says what was wrong and what to do about it. Subclasses let callers catch one kind of
failure (``except UnsupportedModelError``) while ``except SkipitError`` catches them all; each also
derives from the builtin it refines (``ValueError``, ``TypeError``) so generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "SkipitError",
    "UnsupportedModelError",
    "InputError",
    "NumericalError",
    "PlanError",
]


class SkipitError(Exception):
    """Base class of every error raised on purpose by skipit_core."""


class UnsupportedModelError(SkipitError, TypeError):
    """The model's class is not one whose LLM backbone skipit_core knows how to find."""


class InputError(SkipitError, ValueError):
    """Inputs (tensors, arrays, batches, arguments) that cannot give a correct answer."""


class NumericalError(SkipitError, ArithmeticError):
    """A NaN or an infinity where a finite number is needed."""


class PlanError(SkipitError, ValueError):
    """A skip plan that cannot be applied to this model or these inputs."""
