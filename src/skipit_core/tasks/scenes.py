"""DigitScenes: scenes of real handwritten digits, and the question families asked about them.

Scenes are built from scikit-learn's bundled real handwritten digits (``sklearn.datasets.load_digits``:
1797 8x8 scans, offline):

* the 1797 source images are split once, by source image and stratified by class, into ``train``
  (60%), ``validation`` (15%) and ``test`` (25%) pools, so test scenes only use digit instances never
  seen in training;
* a scene is a 64x64 grey canvas cut into a 4x4 grid of 16x16 cells; ``2..6`` digits of *distinct*
  classes (so "the 3" is unique) are upscaled 8x8 -> 16x16 (nearest) into distinct cells; light
  Gaussian noise (sigma 0.03 of full scale) is added and the canvas is stored as ``uint8``;
* every question has a single-token answer. Rows and columns are numbered 1..4 from the top left.

=========  ===========================================  =================================  ========
family     question                                     answers                            chance
=========  ===========================================  =================================  ========
cell       ``which digit is in row 2 column 3 ?``       ``0``..``9``, ``none`` (11)        1/11
count      ``how many digits are there ?``              ``2``..``6`` (5)                   1/5
present    ``is there a 7 ?``                           ``yes``, ``no``                    1/2
largest    ``what is the largest digit ?``              ``1``..``9`` (9)                   1/9
smallest   ``what is the smallest digit ?``             ``0``..``8`` (9)                   1/9
left       ``which digit is left of the 3 ?``           ``0``..``9``, ``none`` (11)        1/11
above      ``which digit is above the 3 ?``             ``0``..``9``, ``none`` (11)        1/11
=========  ===========================================  =================================  ========

Each family is one :class:`QuestionFamily` object in :data:`QUESTION_FAMILIES`: its template, its
answers, how to lay out a scene whose answer is given (:meth:`QuestionFamily.make`) and how to ask it
about a given scene (:meth:`QuestionFamily.ask`). ``left`` / ``above`` are well posed: the answer is the
digit in the cell *immediately* left of (same row, column - 1) / above (same column, row - 1) the cell
holding the named digit, and ``none`` when that cell is empty or off the grid. The only family whose
answer set is narrower than the ten digits is largest/smallest (a largest digit of 0 is impossible with
two distinct digits); there the number of digits is drawn uniformly from what the answer allows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Any

import numpy as np
from sklearn.datasets import load_digits

from ..errors import InputError

__all__ = [
    "GRID", "CELL", "CANVAS", "N_CELLS", "NOISE", "SPLITS", "SPLIT_FRACTIONS", "DIGITS",
    "QuestionFamily", "QUESTION_FAMILIES", "question_family", "ANSWERS", "TEMPLATES", "VOCABULARY",
    "digit_pool", "render_scene",
]

GRID = 4
CELL = 16
CANVAS = GRID * CELL  # 64
N_CELLS = GRID * GRID  # 16, numbered row * GRID + col
NOISE = 0.03
SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.60, 0.15, 0.25)
SPLIT_SEED = 2509_25584  # fixed: the split never depends on a user's seed
DIGITS = tuple(str(d) for d in range(10))

Layout = tuple[list[int], list[int], dict]  # digits, their cells, the question's template fields


# ----------------------------------------------------------------------------- random draws
def _between(rng: np.random.Generator, a: int, b: int) -> int:
    return int(rng.integers(a, b + 1))


def _digits(rng: np.random.Generator, exclude: Iterable[int], k: int, among: Iterable[int] = range(10)) -> list[int]:
    """``k`` distinct digits of ``among`` not in ``exclude``."""
    pool = [d for d in among if d not in set(exclude)]
    return [int(x) for x in rng.choice(pool, size=k, replace=False)] if k else []


def _cells(rng: np.random.Generator, exclude: Iterable[int], k: int) -> list[int]:
    """``k`` distinct cells not in ``exclude``."""
    pool = np.setdiff1d(np.arange(N_CELLS), np.array(list(exclude), dtype=int))
    return [int(x) for x in rng.choice(pool, size=k, replace=False)] if k else []


def _pick(rng: np.random.Generator, options: Sequence[int]) -> int:
    return int(options[int(rng.integers(len(options)))])


# ----------------------------------------------------------------------------- question families
@dataclass(frozen=True)
class QuestionFamily:
    """One question family: ``name``, ``template`` (``str.format`` fields), answers, scene maker, asker.

    Subclasses define :meth:`answers`, :meth:`make` and :meth:`ask`; :data:`QUESTION_FAMILIES` holds one
    instance of each. ``lo`` / ``hi`` bound the number of digits in a scene.
    """

    name: str
    template: str

    def answers(self, lo: int = 2, hi: int = 6) -> tuple[str, ...]:
        """Every answer a scene of ``lo..hi`` digits can have (balanced generation draws from these)."""
        raise NotImplementedError

    def make(self, answer: str, lo: int, hi: int, rng: np.random.Generator) -> Layout:
        """``(digits, cells, fields)`` of a scene of ``lo..hi`` distinct digits whose answer is ``answer``."""
        raise NotImplementedError

    def ask(self, digits: Sequence[int], cells: Sequence[int], rng: np.random.Generator) -> tuple[str, str]:
        """A random ``(question, answer)`` about the scene with ``digits`` in ``cells`` (not balanced)."""
        raise NotImplementedError

    def question(self, **fields: Any) -> str:
        return self.template.format(**fields)


class _Cell(QuestionFamily):
    def answers(self, lo=2, hi=6):
        return DIGITS + ("none",)

    def make(self, answer, lo, hi, rng):
        target = int(rng.integers(N_CELLS))
        n = _between(rng, lo, hi)
        if answer == "none":
            digits, cells = _digits(rng, [], n), _cells(rng, [target], n)
        else:
            d = int(answer)
            digits = [d] + _digits(rng, [d], n - 1)
            cells = [target] + _cells(rng, [target], n - 1)
        return digits, cells, dict(row=target // GRID + 1, col=target % GRID + 1)

    def ask(self, digits, cells, rng):
        """Half of the questions name an occupied cell."""
        grid = dict(zip(cells, digits))
        target = _pick(rng, cells) if rng.random() < 0.5 else int(rng.integers(N_CELLS))
        answer = str(grid[target]) if target in grid else "none"
        return self.question(row=target // GRID + 1, col=target % GRID + 1), answer


class _Count(QuestionFamily):
    def answers(self, lo=2, hi=6):
        return tuple(str(n) for n in range(lo, hi + 1))

    def make(self, answer, lo, hi, rng):
        n = int(answer)
        return _digits(rng, [], n), _cells(rng, [], n), {}

    def ask(self, digits, cells, rng):
        return self.question(), str(len(digits))


class _Present(QuestionFamily):
    def answers(self, lo=2, hi=6):
        return ("yes", "no")

    def make(self, answer, lo, hi, rng):
        q = int(rng.integers(10))
        n = _between(rng, lo, min(hi, 9))
        digits = [q] + _digits(rng, [q], n - 1) if answer == "yes" else _digits(rng, [q], n)
        return digits, _cells(rng, [], n), dict(digit=q)

    def ask(self, digits, cells, rng):
        """Half of the questions name a digit in the scene."""
        absent = [d for d in range(10) if d not in digits]
        q = _pick(rng, digits) if rng.random() < 0.5 or not absent else _pick(rng, absent)
        return self.question(digit=q), "yes" if q in digits else "no"


@dataclass(frozen=True)
class _Extreme(QuestionFamily):
    """``largest`` (``sign=+1``) or ``smallest`` (``sign=-1``) digit of the scene."""

    sign: int = 1

    def answers(self, lo=2, hi=6):
        return tuple(str(d) for d in (range(lo - 1, 10) if self.sign > 0 else range(0, 11 - lo)))

    def make(self, answer, lo, hi, rng):
        a = int(answer)
        rest = range(a) if self.sign > 0 else range(a + 1, 10)  # the other digits lie on the right side of a
        n = _between(rng, lo, min(hi, len(rest) + 1))
        return [a] + _digits(rng, [], n - 1, among=rest), _cells(rng, [], n), {}

    def ask(self, digits, cells, rng):
        return self.question(), str(max(digits) if self.sign > 0 else min(digits))


@dataclass(frozen=True)
class _Neighbour(QuestionFamily):
    """The digit in the cell ``(drow, dcol)`` before the named digit's cell: left ``(0, 1)``, above ``(1, 0)``."""

    drow: int = 0
    dcol: int = 1

    @property
    def step(self) -> int:
        """Cell-index offset of the neighbour: ``cell - step``."""
        return self.drow * GRID + self.dcol

    def has_neighbour(self, cell: int) -> bool:
        """Whether the neighbour of ``cell`` is on the grid."""
        return cell // GRID >= self.drow and cell % GRID >= self.dcol

    def answers(self, lo=2, hi=6):
        return DIGITS + ("none",)

    def make(self, answer, lo, hi, rng):
        n = _between(rng, lo, hi)
        if answer == "none":
            anchor = int(rng.integers(10))
            acell = int(rng.integers(N_CELLS))
            blocked = [acell] + ([acell - self.step] if self.has_neighbour(acell) else [])
            digits = [anchor] + _digits(rng, [anchor], n - 1)
            cells = [acell] + _cells(rng, blocked, n - 1)
        else:
            d = int(answer)
            anchor = _digits(rng, [d], 1)[0]
            acell = int(rng.choice([c for c in range(N_CELLS) if self.has_neighbour(c)]))
            digits = [anchor, d] + _digits(rng, [anchor, d], n - 2)
            cells = [acell, acell - self.step] + _cells(rng, [acell, acell - self.step], n - 2)
        return digits, cells, dict(digit=anchor)

    def ask(self, digits, cells, rng):
        """When the scene has one, half of the questions name a digit whose neighbour cell is occupied."""
        grid = dict(zip(cells, digits))
        with_neighbour = [c for c in cells if self.has_neighbour(c) and c - self.step in grid]
        anchor = _pick(rng, with_neighbour) if with_neighbour and rng.random() < 0.5 else _pick(rng, cells)
        nb = anchor - self.step if self.has_neighbour(anchor) else None
        return self.question(digit=grid[anchor]), str(grid[nb]) if nb in grid else "none"


#: name -> family, in the order of the table above (iterating gives the names)
QUESTION_FAMILIES: Mapping[str, QuestionFamily] = MappingProxyType({f.name: f for f in (
    _Cell("cell", "which digit is in row {row} column {col} ?"),
    _Count("count", "how many digits are there ?"),
    _Present("present", "is there a {digit} ?"),
    _Extreme("largest", "what is the largest digit ?", sign=1),
    _Extreme("smallest", "what is the smallest digit ?", sign=-1),
    _Neighbour("left", "which digit is left of the {digit} ?", drow=0, dcol=1),
    _Neighbour("above", "which digit is above the {digit} ?", drow=1, dcol=0),
)})


def question_family(name: str) -> QuestionFamily:
    """The family called ``name``; :class:`InputError` naming the families otherwise."""
    if name not in QUESTION_FAMILIES:
        raise InputError(f"unknown question family {name!r}; choose from {', '.join(QUESTION_FAMILIES)}.")
    return QUESTION_FAMILIES[name]


TEMPLATES = {name: f.template for name, f in QUESTION_FAMILIES.items()}
ANSWERS = {name: f.answers() for name, f in QUESTION_FAMILIES.items()}  # for 2..6 digits per scene
VOCABULARY: tuple[str, ...] = tuple(sorted(
    {w for t in TEMPLATES.values() for w in t.split() if "{" not in w} | set(DIGITS) | {"yes", "no", "none"}
))


# ----------------------------------------------------------------------------- source digits
@lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images [1797, 8, 8] uint8 on 0..255, labels [1797])`` of ``sklearn.datasets.load_digits``."""
    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


@lru_cache(maxsize=None)
def _split_indices() -> dict[str, np.ndarray]:
    """Source-image indices of each split: stratified by class, fixed seed, disjoint."""
    _, target = _load_digits()
    rng = np.random.default_rng(SPLIT_SEED)
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(target == d))
        n_train = int(round(SPLIT_FRACTIONS[0] * len(idx)))
        n_val = int(round(SPLIT_FRACTIONS[1] * len(idx)))
        out["train"] += idx[:n_train].tolist()
        out["validation"] += idx[n_train:n_train + n_val].tolist()
        out["test"] += idx[n_train + n_val:].tolist()
    return {s: np.array(sorted(v), dtype=np.int64) for s, v in out.items()}


def digit_pool(split: str) -> dict[int, np.ndarray]:
    """``{digit: source indices into load_digits()}`` of one split (``train``/``validation``/``test``)."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}.")
    _, target = _load_digits()
    idx = _split_indices()[split]
    return {d: idx[target[idx] == d] for d in range(10)}


def render_scene(sources: Sequence[int], cells: Sequence[int], rng: np.random.Generator | None = None,
                 noise: float = NOISE) -> np.ndarray:
    """A ``[64, 64]`` ``uint8`` canvas with ``load_digits`` image ``sources[i]`` in cell ``cells[i]``.

    Cells are numbered ``row * 4 + col`` (0-based, row-major). Noise is Gaussian with standard deviation
    ``noise`` (fraction of full scale) drawn from ``rng``; ``noise=0`` gives a clean canvas.
    """
    sources, cells = list(sources), list(cells)
    if len(sources) != len(cells):
        raise InputError(f"got {len(sources)} digit sources for {len(cells)} cells; give one cell per digit.")
    if not 1 <= len(cells) <= N_CELLS:
        raise InputError(f"a scene holds 1 to {N_CELLS} digits (one per cell); got {len(cells)}.")
    if len(set(cells)) != len(cells) or not all(0 <= c < N_CELLS for c in cells):
        raise InputError(f"cells must be distinct integers in [0, {N_CELLS}); got {cells}.")
    images, _ = _load_digits()
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.float64)
    for src, cell in zip(sources, cells):
        r, c = divmod(int(cell), GRID)
        canvas[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = np.kron(images[int(src)], np.ones((2, 2)))
    if noise > 0:
        rng = np.random.default_rng(0) if rng is None else rng
        canvas = canvas + rng.normal(0.0, noise * 255.0, canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
