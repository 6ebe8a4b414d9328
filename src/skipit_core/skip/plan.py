"""Skip plans: immutable, validated descriptions of which work a forward pass leaves out.

A plan says, for every decoder layer ``l`` (0-based), which tokens take part in it:

* ``LayerMode.FULL``   every token (the layer as the model has it);
* ``LayerMode.TEXT``   text rows only; vision rows are absent from the layer (not in its KV cache) and keep
  the state they had (Late Entry before ``k``, Early Exit from ``k`` on);
* ``LayerMode.FREEZE`` text rows get the whole layer; vision rows only give their keys/values and keep
  their state (ShortV-style vision freeze);
* ``LayerMode.SKIP``   nobody: the layer is not called and its KV cache stays empty (ShortGPT/SLEB-style).

Plans are built from the four constructors and composed with ``|``::

    plan = SkipPlan.late_entry(2) | SkipPlan.early_exit(10)
    plan.validate(backbone)          # PlanError if impossible for this model
    plan.mode(5, backbone.n_layers)  # LayerMode.FULL
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..errors import PlanError
from ..models import Backbone

__all__ = ["SkipPlan", "LayerMode", "Work"]


class Work(str, Enum):
    """What one token does in one layer: everything, only its key/value projections, or nothing."""

    ALL = "all"
    KV = "kv"
    NONE = "none"


class LayerMode(str, Enum):
    """Who takes part in a layer under a plan (see the module docstring)."""

    FULL = "full"
    TEXT = "text"
    FREEZE = "freeze"
    SKIP = "skip"

    def work(self, kind: str) -> Work:
        """What a token of ``kind`` (``"text"`` or ``"vision"``) does in a layer of this mode."""
        if kind not in ("text", "vision"):
            raise PlanError(f"token kind must be 'text' or 'vision', got {kind!r}.")
        if self is LayerMode.SKIP:
            return Work.NONE
        if kind == "text" or self is LayerMode.FULL:
            return Work.ALL
        return Work.KV if self is LayerMode.FREEZE else Work.NONE


def _as_layer(x: Any) -> int:
    """``x`` as a non-negative layer index: ints and integer-likes (``np.int64``, a 0-d integer tensor,
    anything with ``__index__``); bools (also numpy / torch booleans) and negatives raise ``ValueError``."""
    if isinstance(x, bool) or "bool" in str(getattr(x, "dtype", "")):
        raise ValueError
    try:
        index = operator.index(x)
    except TypeError:
        raise ValueError from None
    if index < 0:
        raise ValueError
    return index


def _layer_set(layers: Any, what: str) -> frozenset[int]:
    """A layer index or an iterable of them (a range, a list, a numpy array ...) as a frozenset of ints."""
    try:
        return frozenset((_as_layer(layers),))
    except ValueError:
        pass
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        layers = [layers]  # a single bad index: reported below
    out, bad = set(), []
    for x in layers:
        try:
            out.add(_as_layer(x))
        except ValueError:
            bad.append(x)
    if bad:
        raise PlanError(f"{what} takes a layer index or an iterable of them; layer indices must be non-negative "
                        f"ints (0-based; integer-likes such as np.int64 work, bools do not); got "
                        f"{', '.join(map(repr, bad))}.")
    return frozenset(out)


def _index(k: Any, what: str) -> int:
    try:
        return _as_layer(k)
    except ValueError:
        raise PlanError(f"{what}(k) takes a non-negative integer layer index (0-based; not a bool), "
                        f"got {k!r} ({type(k).__name__}).") from None


def _ranges(layers: frozenset[int]) -> str:
    """``{1,2,3,7}`` -> ``"1-3,7"``."""
    out, run = [], []
    for x in sorted(layers):
        if run and x != run[-1] + 1:
            out.append(run)
            run = []
        run.append(x)
    if run:
        out.append(run)
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in out)


@dataclass(frozen=True)
class SkipPlan:
    """Which layers and which tokens a forward pass skips. Build with the class methods, compose with ``|``.

    Fields: ``whole`` (layers not called at all), ``freeze`` (vision-freeze layers), ``entry`` (Late Entry
    layer ``k``: vision tokens absent from layers ``0..k-1``) and ``exit`` (Early Exit layer ``k``: vision
    tokens absent from layers ``k..L-1``); ``None`` where unused.
    """

    whole: frozenset[int] = frozenset()
    freeze: frozenset[int] = frozenset()
    entry: int | None = None
    exit: int | None = None

    def __post_init__(self) -> None:
        self._check_consistent()

    # ------------------------------------------------------------ constructors
    @classmethod
    def none(cls) -> "SkipPlan":
        """The empty plan: the model runs unchanged."""
        return cls()

    @classmethod
    def whole_layers(cls, layers: int | Iterable[int]) -> "SkipPlan":
        """Skip ``layers`` entirely for every token (identity; their KV cache stays empty)."""
        return cls(whole=_layer_set(layers, "whole_layers"))

    @classmethod
    def vision_freeze(cls, layers: int | Iterable[int]) -> "SkipPlan":
        """In ``layers`` vision rows skip their query and MLP but still give keys/values (ShortV-style)."""
        return cls(freeze=_layer_set(layers, "vision_freeze"))

    @classmethod
    def late_entry(cls, k: int) -> "SkipPlan":
        """Vision tokens are absent from layers ``0..k-1`` and enter layer ``k`` with their layer-0 input
        (embedding) states; ``late_entry(0)`` changes nothing."""
        return cls(entry=_index(k, "late_entry"))

    @classmethod
    def early_exit(cls, k: int) -> "SkipPlan":
        """Vision tokens take part in layers ``0..k-1`` and are gone from layer ``k`` on (later layers and
        their KV cache hold text only); ``early_exit(n_layers)`` changes nothing."""
        return cls(exit=_index(k, "early_exit"))

    # ------------------------------------------------------------- composition
    def __or__(self, other: "SkipPlan") -> "SkipPlan":
        if not isinstance(other, SkipPlan):
            return NotImplemented
        return SkipPlan(
            whole=self.whole | other.whole,
            freeze=self.freeze | other.freeze,
            entry=_merge(self.entry, other.entry, "late_entry"),
            exit=_merge(self.exit, other.exit, "early_exit"),
        )

    def _check_consistent(self) -> None:
        both = self.whole & self.freeze
        if both:
            raise PlanError(f"layers {_ranges(both)} are both skipped whole and vision-frozen; pick one per layer.")
        if self.entry is not None and self.exit is not None and self.exit < self.entry:
            raise PlanError(
                f"early_exit({self.exit}) before late_entry({self.entry}): vision tokens would leave before they "
                f"enter. Use early_exit(j) with j >= {self.entry}."
            )
        absent = {x for x in self.freeze if (self.entry is not None and x < self.entry)
                  or (self.exit is not None and x >= self.exit)}
        if absent:
            raise PlanError(
                f"vision_freeze on layers {_ranges(frozenset(absent))} where the plan has already removed the vision "
                "tokens (Late Entry / Early Exit): there is nothing to freeze there."
            )

    # ---------------------------------------------------------------- queries
    @property
    def is_empty(self) -> bool:
        """True when the plan leaves no work out on any model (``entry=0`` is a no-op; ``exit`` needs the depth)."""
        return not self.whole and not self.freeze and not self.entry and self.exit is None

    @property
    def needs_vision(self) -> bool:
        """True when the plan treats vision tokens apart (it then needs ``input_ids`` to find them)."""
        return bool(self.freeze) or bool(self.entry) or self.exit is not None

    def mode(self, layer: int, n_layers: int) -> LayerMode:
        """Who takes part in layer ``layer`` of an ``n_layers``-layer backbone."""
        if not 0 <= layer < n_layers:
            raise PlanError(f"layer {layer} is out of range for a {n_layers}-layer backbone.")
        if layer in self.whole:
            return LayerMode.SKIP
        if (self.entry is not None and layer < self.entry) or (self.exit is not None and layer >= self.exit):
            return LayerMode.TEXT
        if layer in self.freeze:
            return LayerMode.FREEZE
        return LayerMode.FULL

    def modes(self, n_layers: int) -> tuple[LayerMode, ...]:
        """:meth:`mode` of every layer."""
        return tuple(self.mode(layer, n_layers) for layer in range(n_layers))

    def participants(self, layer: int, n_layers: int) -> dict[str, Work]:
        """``{"text": Work, "vision": Work}``: what each token kind does in ``layer`` (used by bench.flops)."""
        mode = self.mode(layer, n_layers)
        return {kind: mode.work(kind) for kind in ("text", "vision")}

    def is_noop(self, n_layers: int) -> bool:
        """True when every layer is FULL for an ``n_layers``-layer backbone."""
        return all(m is LayerMode.FULL for m in self.modes(n_layers))

    def validate(self, backbone: Any) -> "SkipPlan":
        """Check the plan against a model, its backbone, or a layer count; return it or raise :class:`PlanError`.

        Layer indices must exist; ``late_entry(k)`` and ``early_exit(k)`` need ``0 <= k <= n_layers``;
        vision-freeze layers must have a structure :mod:`skipit_core.skip` knows how to split by rows.
        """
        if not isinstance(backbone, int):
            backbone = Backbone.of(backbone)
        n_layers = backbone if isinstance(backbone, int) else backbone.n_layers
        for name, k in (("late_entry", self.entry), ("early_exit", self.exit)):
            if k is not None and k > n_layers:
                raise PlanError(
                    f"{name}({k}) needs a model with at least {k} layers; this backbone has {n_layers} "
                    f"(valid k: 0..{n_layers}). Was the plan built for a deeper model?"
                )
        for name, layers in (("whole_layers", self.whole), ("vision_freeze", self.freeze)):
            bad = sorted(x for x in layers if x >= n_layers)
            if bad:
                raise PlanError(
                    f"{name} names layers {bad}, but this backbone has {n_layers} layers (0..{n_layers - 1}). "
                    "Was the plan built for a deeper model?"
                )
        if not isinstance(backbone, int):
            for layer in sorted(self.freeze):
                backbone.check_row_split(layer)
        return self

    # ---------------------------------------------------------------- display
    def __str__(self) -> str:
        parts = []
        if self.entry is not None:
            parts.append(f"late_entry({self.entry})")
        if self.exit is not None:
            parts.append(f"early_exit({self.exit})")
        if self.freeze:
            parts.append(f"vision_freeze({_ranges(self.freeze)})")
        if self.whole:
            parts.append(f"whole_layers({_ranges(self.whole)})")
        return " | ".join(parts) if parts else "none()"

    def __repr__(self) -> str:
        return f"SkipPlan<{self}>"


def _merge(a: int | None, b: int | None, what: str) -> int | None:
    if a is None or a == b:
        return b if a is None else a
    if b is None:
        return a
    raise PlanError(f"two different {what} layers ({a} and {b}) in one plan; a plan has at most one {what}.")
