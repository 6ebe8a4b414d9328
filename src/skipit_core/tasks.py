"""Visual question answering tasks and honest scoring.

:class:`DigitScenes` builds a VQA task that cannot be solved without the image, from scikit-learn's
bundled real handwritten digits (``sklearn.datasets.load_digits``: 1797 8x8 scans, offline):

* the 1797 source images are split once, by source image and stratified by class, into
  ``train`` (60%), ``validation`` (15%) and ``test`` (25%) pools, so test scenes only use digit
  instances never seen in training;
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

``left`` / ``above`` are well posed: the answer is the digit in the cell *immediately* left of
(same row, column - 1) / above (same column, row - 1) the cell holding the named digit, and
``none`` when that cell is empty or off the grid. Answers are balanced within each family: the
answer is drawn first, uniformly over the family's answer set (exactly balanced, up to one item, in
:meth:`DigitScenes.generate`), and the scene is built to make it true. The only family whose answer
set is narrower than the ten digits is largest/smallest (a largest digit of 0 is impossible with two
distinct digits); there the number of digits is drawn uniformly from what the answer allows.

:func:`evaluate` scores any supported Hugging Face VLM on a :class:`VQASet` (DigitScenes, or a real
benchmark through :func:`load_pope`): one forward pass per batch (left padding), the answer is the
argmax of the next-token logits over the **full vocabulary**, decoded and normalised (lower case,
surrounding spaces / punctuation / sentencepiece markers stripped) and compared with the expected
answer. Restricting the argmax to the family's answers would hide a model that answers off-format;
the full-vocabulary rule is the honest one. Every accuracy comes with a Wilson 95% interval, per
question family too, and a blank-image baseline (``with_blank=True`` or ``data.blank()``) says how
much of it is reachable without looking.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, SkipitError
from .paths import data_dir

__all__ = [
    "FAMILIES",
    "ANSWERS",
    "VOCABULARY",
    "DigitScenes",
    "batches",
    "VQASet",
    "EvalResult",
    "evaluate",
    "kept_window",
    "build_prompts",
    "normalize_answer",
    "load_pope",
    "digit_pool",
    "render_scene",
    "test_set_path",
]

GRID = 4
CELL = 16
CANVAS = GRID * CELL  # 64
SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.60, 0.15, 0.25)
SPLIT_SEED = 2509_25584  # fixed: the split never depends on a user's seed
TEST_SEED = 20260101  # the seed the frozen test file was generated with
TEST_PER_FAMILY = 120
NOISE = 0.03

DIGITS = tuple(str(d) for d in range(10))
FAMILIES = ("cell", "count", "present", "largest", "smallest", "left", "above")

TEMPLATES = {
    "cell": "which digit is in row {row} column {col} ?",
    "count": "how many digits are there ?",
    "present": "is there a {digit} ?",
    "largest": "what is the largest digit ?",
    "smallest": "what is the smallest digit ?",
    "left": "which digit is left of the {digit} ?",
    "above": "which digit is above the {digit} ?",
}


def _answers(family: str, lo: int = 2, hi: int = 6) -> tuple[str, ...]:
    if family in ("cell", "left", "above"):
        return DIGITS + ("none",)
    if family == "count":
        return tuple(str(n) for n in range(lo, hi + 1))
    if family == "present":
        return ("yes", "no")
    if family == "largest":
        return tuple(str(d) for d in range(lo - 1, 10))
    if family == "smallest":
        return tuple(str(d) for d in range(0, 11 - lo))
    raise InputError(f"unknown question family {family!r}; choose from {', '.join(FAMILIES)}.")


ANSWERS = {f: _answers(f) for f in FAMILIES}
VOCABULARY: tuple[str, ...] = tuple(sorted(
    {w for t in TEMPLATES.values() for w in t.split() if "{" not in w}
    | set(DIGITS) | {"yes", "no", "none"}
))


# ----------------------------------------------------------------------------- source digits
@lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # [1797, 8, 8]
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
    """A 64x64 ``uint8`` canvas with ``load_digits`` image ``sources[i]`` in cell ``cells[i]``.

    Cells are numbered ``row * 4 + col`` (0-based, row-major). Noise is Gaussian with standard deviation
    ``noise`` (fraction of full scale) drawn from ``rng``; ``noise=0`` gives a clean canvas.
    """
    sources, cells = list(sources), list(cells)
    if len(sources) != len(cells):
        raise InputError(f"got {len(sources)} digit sources for {len(cells)} cells; give one cell per digit.")
    if not 1 <= len(cells) <= GRID * GRID:
        raise InputError(f"a scene holds 1 to {GRID * GRID} digits (one per cell); got {len(cells)}.")
    if len(set(cells)) != len(cells) or not all(0 <= c < GRID * GRID for c in cells):
        raise InputError(f"cells must be distinct integers in [0, {GRID * GRID}); got {cells}.")
    images, _ = _load_digits()
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.float64)
    for src, cell in zip(sources, cells):
        r, c = divmod(int(cell), GRID)
        canvas[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = np.kron(images[int(src)], np.ones((2, 2)))
    if noise > 0:
        rng = np.random.default_rng(0) if rng is None else rng
        canvas = canvas + rng.normal(0.0, noise * 255.0, canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- data container
@dataclass
class VQASet:
    """Items to score: ``images`` (an ``[N, H, W]`` / ``[N, H, W, 3]`` uint8 array, or a list of PIL
    images / arrays), ``questions``, single-token ``answers``, ``families`` (the group each item is
    scored in) and per-item ``meta`` dicts. Indexing with a slice or index array gives a subset."""

    images: Any
    questions: list[str]
    answers: list[str]
    families: list[str]
    meta: list[dict] = field(default_factory=list)
    name: str = "vqa"

    def __post_init__(self):
        n = len(self.questions)
        if not (len(self.answers) == len(self.families) == n and len(self.images) == n):
            raise InputError(
                f"VQASet columns differ in length: {len(self.images)} images, {n} questions, "
                f"{len(self.answers)} answers, {len(self.families)} families."
            )
        if not self.meta:
            self.meta = [{} for _ in range(n)]

    def __len__(self) -> int:
        return len(self.questions)

    def __repr__(self) -> str:
        counts = ", ".join(f"{f} {self.families.count(f)}" for f in self.family_names())
        return f"VQASet({self.name!r}, {len(self)} items; {counts})"

    def __getitem__(self, index) -> "VQASet":
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        idx = np.arange(len(self))[index]
        images = self.images[idx] if isinstance(self.images, np.ndarray) else [self.images[i] for i in idx]
        return VQASet(images, [self.questions[i] for i in idx], [self.answers[i] for i in idx],
                      [self.families[i] for i in idx], [self.meta[i] for i in idx], self.name)

    def image(self, i: int):
        """Image ``i`` as a processor takes it: ``H x W x 3`` uint8 array (or the PIL image as given)."""
        img = self.images[i]
        if isinstance(img, np.ndarray):
            return np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img
        return img

    def blank(self) -> "VQASet":
        """The same questions on all-black images of the same size: the text-only baseline."""
        if isinstance(self.images, np.ndarray):
            images: Any = np.zeros_like(self.images)
        else:
            images = [_blank_like(img) for img in self.images]
        return VQASet(images, list(self.questions), list(self.answers), list(self.families),
                      [dict(m, blank=True) for m in self.meta], self.name + "-blank")

    def family_names(self) -> list[str]:
        order = [f for f in FAMILIES if f in set(self.families)]
        return order + sorted(set(self.families) - set(order))


def _blank_like(img):
    if isinstance(img, np.ndarray):
        return np.zeros_like(img)
    from PIL import Image

    return Image.new(img.mode if img.mode in ("RGB", "L") else "RGB", img.size)


def _neighbour(family: str) -> tuple[int, Callable[[int], bool]]:
    """For ``left`` / ``above``: the cell-index step to the neighbour (``cell - step``) and whether a
    cell has that neighbour on the grid (not in the first column / first row)."""
    if family == "left":
        return 1, lambda c: c % GRID >= 1
    return GRID, lambda c: c >= GRID


# ----------------------------------------------------------------------------- DigitScenes
class DigitScenes:
    """Generator of digit-scene VQA items from one split of the real handwritten digits.

    >>> ds = DigitScenes("train")
    >>> items = ds.generate(n_per_family=10, seed=0)   # exactly balanced answers per family
    >>> batch = ds.sample(64, rng)                     # fresh random items (training)
    >>> test = DigitScenes.test_set()                  # the frozen test file in data/digitscenes

    ``min_digits``/``max_digits`` bound the number of digits per scene (2..6 by default; digits are
    distinct classes, so at most 10). ``families`` restricts the question families.
    """

    FAMILIES = FAMILIES

    def __init__(self, split: str = "train", *, min_digits: int = 2, max_digits: int = 6,
                 families: Sequence[str] | None = None, noise: float = NOISE):
        if not (isinstance(min_digits, (int, np.integer)) and isinstance(max_digits, (int, np.integer))):
            raise InputError("min_digits and max_digits must be integers.")
        if min_digits < 2:
            raise InputError(f"min_digits={min_digits}: a scene needs at least 2 digits (relations and "
                             "largest/smallest need two); use min_digits >= 2.")
        if max_digits < min_digits:
            raise InputError(f"max_digits={max_digits} < min_digits={min_digits}; swap or fix them.")
        if max_digits > 10:
            raise InputError(f"max_digits={max_digits}: digits in a scene are distinct classes and there are "
                             f"{GRID * GRID} cells, so at most 10 digits fit; use max_digits <= 10.")
        if not 0 <= noise <= 1:
            raise InputError(f"noise={noise} must be a fraction of full scale in [0, 1].")
        self.families = tuple(FAMILIES if families is None else families)
        if not self.families:
            raise InputError("families is empty; give at least one of " + ", ".join(FAMILIES) + ".")
        for f in self.families:
            if f not in FAMILIES:
                raise InputError(f"unknown question family {f!r}; choose from {', '.join(FAMILIES)}.")
        self.split = split
        self.pool = digit_pool(split)
        self.lo, self.hi = int(min_digits), int(max_digits)
        self.noise = float(noise)

    def __repr__(self) -> str:
        n = sum(len(v) for v in self.pool.values())
        return (f"DigitScenes(split={self.split!r}, {n} source digits, {self.lo}..{self.hi} digits per scene, "
                f"families={list(self.families)})")

    def answers(self, family: str) -> tuple[str, ...]:
        """The answer set of ``family`` under this generator's digit-count bounds."""
        return _answers(family, self.lo, self.hi)

    # -------------------------------------------------------------- one item
    def item(self, family: str, answer: str | None, rng: np.random.Generator) -> dict:
        """One item of ``family`` whose answer is ``answer`` (drawn uniformly if None)."""
        allowed = self.answers(family)
        if answer is None:
            answer = allowed[int(rng.integers(len(allowed)))]
        if answer not in allowed:
            raise InputError(f"{answer!r} is not an answer of family {family!r}; answers are {allowed}.")
        lo, hi = self.lo, self.hi
        all_cells = np.arange(GRID * GRID)

        def n_between(a: int, b: int) -> int:
            return int(rng.integers(a, b + 1))

        def others(exclude: Iterable[int], k: int, among: Iterable[int] = range(10)) -> list[int]:
            pool = [d for d in among if d not in set(exclude)]
            return [int(x) for x in rng.choice(pool, size=k, replace=False)] if k else []

        def free_cells(exclude: Iterable[int], k: int) -> list[int]:
            pool = np.setdiff1d(all_cells, np.array(list(exclude), dtype=int))
            return [int(x) for x in rng.choice(pool, size=k, replace=False)] if k else []

        fmt: dict[str, Any] = {}
        if family == "cell":
            target = int(rng.integers(GRID * GRID))
            n = n_between(lo, hi)
            if answer == "none":
                digits = others([], n)
                cells = free_cells([target], n)
            else:
                d = int(answer)
                digits = [d] + others([d], n - 1)
                cells = [target] + free_cells([target], n - 1)
            fmt = dict(row=target // GRID + 1, col=target % GRID + 1)
        elif family == "count":
            n = int(answer)
            digits, cells = others([], n), free_cells([], n)
        elif family == "present":
            q = int(rng.integers(10))
            n = n_between(lo, min(hi, 9))
            digits = [q] + others([q], n - 1) if answer == "yes" else others([q], n)
            cells = free_cells([], n)
            fmt = dict(digit=q)
        elif family == "largest":
            a = int(answer)
            n = n_between(lo, min(hi, a + 1))
            digits = [a] + others([], n - 1, among=range(a))
            cells = free_cells([], n)
        elif family == "smallest":
            s = int(answer)
            n = n_between(lo, min(hi, 10 - s))
            digits = [s] + others([], n - 1, among=range(s + 1, 10))
            cells = free_cells([], n)
        elif family in ("left", "above"):
            step, ok = _neighbour(family)
            n = n_between(lo, hi)
            if answer == "none":
                anchor = int(rng.integers(10))
                acell = int(rng.integers(GRID * GRID))
                blocked = [acell] + ([acell - step] if ok(acell) else [])
                digits = [anchor] + others([anchor], n - 1)
                cells = [acell] + free_cells(blocked, n - 1)
            else:
                d = int(answer)
                anchor = others([d], 1)[0]
                acell = int(rng.choice([c for c in all_cells if ok(c)]))
                digits = [anchor, d] + others([anchor, d], n - 2)
                cells = [acell, acell - step] + free_cells([acell, acell - step], n - 2)
            fmt = dict(digit=anchor)
        else:
            raise InputError(f"unknown question family {family!r}; choose from {', '.join(FAMILIES)}.")
        sources = [int(rng.choice(self.pool[d])) for d in digits]
        image = render_scene(sources, cells, rng, self.noise)
        meta = dict(digits=[int(d) for d in digits], cells=[int(c) for c in cells], sources=sources)
        return dict(image=image, question=TEMPLATES[family].format(**fmt), answer=answer, family=family,
                    meta=meta)

    @staticmethod
    def _collect(items: list[dict], name: str) -> VQASet:
        return VQASet(np.stack([it["image"] for it in items]) if items else np.zeros((0, CANVAS, CANVAS), np.uint8),
                      [it["question"] for it in items], [it["answer"] for it in items],
                      [it["family"] for it in items], [it["meta"] for it in items], name)

    # -------------------------------------------------------------- more questions about one scene
    @staticmethod
    def ask(meta: Mapping[str, Any], family: str, rng: np.random.Generator) -> tuple[str, str]:
        """A random ``(question, answer)`` of ``family`` about the scene ``meta`` (its ``digits`` and
        ``cells``), answered from the layout: the follow-up turns of a multi-turn training conversation.

        Unlike :meth:`item`, the scene is given, so answers are not balanced; the draws lean towards
        informative questions: half of the ``cell`` questions name an occupied cell, half of the
        ``present`` questions a digit in the scene, and ``left`` / ``above`` questions name, when the
        scene has one, a digit whose neighbour cell is occupied half of the time.
        """
        digits, cells = [int(d) for d in meta["digits"]], [int(c) for c in meta["cells"]]
        grid = dict(zip(cells, digits))

        def pick(options: Sequence[int]) -> int:
            return int(options[int(rng.integers(len(options)))])

        if family == "cell":
            target = pick(cells) if rng.random() < 0.5 else int(rng.integers(GRID * GRID))
            answer = str(grid[target]) if target in grid else "none"
            return TEMPLATES["cell"].format(row=target // GRID + 1, col=target % GRID + 1), answer
        if family == "count":
            return TEMPLATES["count"], str(len(digits))
        if family == "present":
            absent = [d for d in range(10) if d not in grid.values()]
            q = pick(digits) if rng.random() < 0.5 or not absent else pick(absent)
            return TEMPLATES["present"].format(digit=q), "yes" if q in digits else "no"
        if family in ("largest", "smallest"):
            return TEMPLATES[family], str(max(digits) if family == "largest" else min(digits))
        if family in ("left", "above"):
            step, ok = _neighbour(family)
            with_neighbour = [c for c in cells if ok(c) and c - step in grid]
            anchor = pick(with_neighbour) if with_neighbour and rng.random() < 0.5 else pick(cells)
            nb = anchor - step if ok(anchor) else None
            answer = str(grid[nb]) if nb in grid else "none"
            return TEMPLATES[family].format(digit=grid[anchor]), answer
        raise InputError(f"unknown question family {family!r}; choose from {', '.join(FAMILIES)}.")

    # -------------------------------------------------------------- many items
    def generate(self, n_per_family: int, seed: int = 0, shuffle: bool = True) -> VQASet:
        """``n_per_family`` items of every family, answers exactly balanced (each answer of a family
        appears ``n_per_family // |answers|`` or one more times). Same seed, byte-identical items."""
        if not isinstance(n_per_family, (int, np.integer)) or n_per_family < 1:
            raise InputError(f"n_per_family must be a positive integer; got {n_per_family!r}.")
        rng = np.random.default_rng(seed)
        items = []
        for family in self.families:
            allowed = list(self.answers(family))
            reps = -(-n_per_family // len(allowed))
            chosen = [str(allowed[i]) for _ in range(reps) for i in rng.permutation(len(allowed))][:n_per_family]
            items += [self.item(family, a, rng) for a in chosen]
        if shuffle:
            items = [items[i] for i in rng.permutation(len(items))]
        return self._collect(items, f"digitscenes-{self.split}")

    def sample(self, n: int, rng: np.random.Generator | int, weights: Sequence[float] | None = None) -> VQASet:
        """``n`` fresh random items (family uniform, or drawn with ``weights`` per family of this
        generator; then answer uniform): for training on the fly."""
        rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
        if weights is None:
            fams = rng.integers(len(self.families), size=n)
        else:
            w = np.asarray(weights, dtype=float)
            if w.shape != (len(self.families),) or (w < 0).any() or w.sum() <= 0:
                raise InputError(f"weights must be {len(self.families)} non-negative numbers, one per family "
                                 f"{list(self.families)}; got {list(weights)}.")
            fams = rng.choice(len(self.families), size=n, p=w / w.sum())
        return self._collect([self.item(self.families[f], None, rng) for f in fams], f"digitscenes-{self.split}")

    def stream(self, batch_size: int, seed: int = 0) -> Iterator[VQASet]:
        """An endless iterator of fresh batches (seeded)."""
        rng = np.random.default_rng(seed)
        while True:
            yield self.sample(batch_size, rng)

    # -------------------------------------------------------------- frozen test split
    @staticmethod
    def freeze(data: VQASet, path: str | os.PathLike) -> Path:
        """Write ``data`` as ``<path>.npz`` (uint8 images) + ``<path>.jsonl`` (one item a line); no pickle."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        images = np.asarray(data.images, dtype=np.uint8)
        np.savez_compressed(path.with_suffix(".npz"), images=images)
        with open(path.with_suffix(".jsonl"), "w") as fh:
            for q, a, f, m in zip(data.questions, data.answers, data.families, data.meta):
                fh.write(json.dumps(dict(question=q, answer=a, family=f, **m), sort_keys=True) + "\n")
        return path.with_suffix(".npz")

    @staticmethod
    def load(path: str | os.PathLike) -> VQASet:
        """Read a set written by :meth:`freeze`."""
        path = Path(path)
        npz, jsonl = path.with_suffix(".npz"), path.with_suffix(".jsonl")
        if not npz.exists() or not jsonl.exists():
            raise SkipitError(f"{npz} / {jsonl} not found. Regenerate with "
                              "`python -m skipit_core.tasks --freeze <path>` or point to the repo's data/ folder.")
        with np.load(npz, allow_pickle=False) as z:
            images = z["images"]
        rows = [json.loads(line) for line in open(jsonl)]
        meta = [{k: v for k, v in r.items() if k not in ("question", "answer", "family")} for r in rows]
        return VQASet(images, [r["question"] for r in rows], [r["answer"] for r in rows],
                      [r["family"] for r in rows], meta, path.stem)

    @classmethod
    def test_set(cls, path: str | os.PathLike | None = None) -> VQASet:
        """The frozen test split every reader evaluates (``data/digitscenes/test.npz`` + ``.jsonl``)."""
        data = cls.load(test_set_path() if path is None else path)
        data.name = "digitscenes-test"
        return data

    @classmethod
    def make_test_set(cls) -> VQASet:
        """Regenerate the frozen test split from its seed (what ``data/digitscenes/test`` holds)."""
        return cls("test").generate(TEST_PER_FAMILY, seed=TEST_SEED)


def test_set_path() -> Path:
    """Path stem of the frozen test split (``<data>/digitscenes/test``); see :func:`skipit_core.paths.data_dir`."""
    return data_dir() / "digitscenes" / "test"


# ----------------------------------------------------------------------------- real benchmarks
def load_pope(source: str | os.PathLike | Iterable[Mapping[str, Any]] = "lmms-lab/POPE", split: str = "test",
              limit: int | None = None, prompt_suffix: str = "", category: str | None = None) -> VQASet:
    """A POPE-style yes/no benchmark as a :class:`VQASet`.

    ``source`` is any iterable of dict rows with the POPE schema (``image``: PIL image or array or a
    file path; ``question``; ``answer``: ``yes``/``no``; optional ``category`` used as the family,
    e.g. ``random``/``popular``/``adversarial``), a local ``.jsonl`` file of such rows (image paths
    relative to the file), or a Hugging Face hub name, loaded with ``datasets.load_dataset(source,
    split=split)`` (``datasets`` is imported only then). ``prompt_suffix`` is appended to every
    question (e.g. ``" Answer with yes or no."`` for chat models).
    """
    base = None
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.suffix == ".jsonl" and p.exists():
            rows: Iterable[Mapping[str, Any]] = [json.loads(line) for line in open(p) if line.strip()]
            base = p.parent
        elif p.exists():
            raise InputError(f"{p} is not a .jsonl file of POPE rows; give a .jsonl, an iterable of dicts, "
                             "or a hub name.")
        else:
            try:
                import datasets  # noqa: F401
            except ImportError as exc:
                raise SkipitError(f"loading {source!r} from the hub needs `datasets` (pip install datasets); "
                                  "or pass an iterable of dict rows / a local .jsonl.") from exc
            rows = datasets.load_dataset(str(source), split=split)
    else:
        rows = source
    images, questions, answers, families, meta = [], [], [], [], []
    for i, row in enumerate(rows):
        if limit is not None and len(questions) >= limit:
            break
        if category is not None and row.get("category") != category:
            continue
        for key in ("image", "question", "answer"):
            if key not in row:
                raise InputError(f"row {i} lacks `{key}`; POPE rows need image, question and answer "
                                 f"(got keys {sorted(row)}).")
        answer = normalize_answer(str(row["answer"]))
        if answer not in ("yes", "no"):
            raise InputError(f"row {i}: POPE answers are yes/no, got {row['answer']!r}.")
        images.append(_as_image(row["image"], base))
        questions.append(str(row["question"]).strip() + prompt_suffix)
        answers.append(answer)
        families.append(str(row.get("category", "pope")))
        meta.append({k: row[k] for k in ("question_id", "id", "image_source") if k in row})
    if not questions:
        raise InputError("no POPE rows were read; check the source, split and category.")
    return VQASet(images, questions, answers, families, meta, "pope")


def _as_image(obj, base: Path | None):
    from PIL import Image

    if isinstance(obj, Image.Image):
        return obj.convert("RGB")
    if isinstance(obj, np.ndarray):
        return Image.fromarray(obj.astype(np.uint8)).convert("RGB")
    if isinstance(obj, Mapping) and obj.get("bytes") is not None:  # datasets' Image feature, undecoded
        import io

        return Image.open(io.BytesIO(obj["bytes"])).convert("RGB")
    if isinstance(obj, (str, os.PathLike)):
        p = Path(obj)
        p = base / p if base is not None and not p.is_absolute() else p
        return Image.open(p).convert("RGB")
    raise InputError(f"cannot read an image from {type(obj).__name__}; give a PIL image, an array or a path.")


# ----------------------------------------------------------------------------- scoring
_STRIP = string.punctuation + string.whitespace + "\u2581\u0120"


def normalize_answer(text: str) -> str:
    """Lower case, without surrounding whitespace, punctuation or tokenizer word markers (▁, Ġ)."""
    return text.strip(_STRIP).lower()


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of ``k`` successes in ``n`` trials (:func:`skipit_core.theory.wilson_interval`)."""
    from .theory import wilson_interval

    lo, hi = wilson_interval(k, n, confidence)[:2]
    return float(lo), float(hi)


@dataclass
class EvalResult:
    """Accuracy with a Wilson interval, per family too; ``blank`` is the blank-image baseline when
    computed (``evaluate(..., with_blank=True)``). ``predictions`` are the decoded argmax tokens."""

    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    k: int
    by_family: Any  # pandas DataFrame: family, n, k, accuracy, ci_low, ci_high, chance
    predictions: list[str]
    correct: np.ndarray
    blank: "EvalResult | None" = None
    confidence: float = 0.95

    def __str__(self) -> str:
        s = f"accuracy {self.accuracy:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] (n={self.n})"
        if self.blank is not None:
            s += f"; blank-image baseline {self.blank.accuracy:.3f} [{self.blank.ci_low:.3f}, {self.blank.ci_high:.3f}]"
        return s

    def table(self):
        """Overall + per-family rows (with the blank baseline side by side when present)."""
        import pandas as pd

        overall = pd.DataFrame([dict(family="all", n=self.n, k=self.k, accuracy=self.accuracy,
                                     ci_low=self.ci_low, ci_high=self.ci_high, chance=np.nan)])
        t = pd.concat([self.by_family, overall], ignore_index=True)
        if self.blank is not None:
            b = self.blank.table()[["family", "accuracy", "ci_low", "ci_high"]]
            t = t.merge(b.rename(columns={c: "blank_" + c for c in ("accuracy", "ci_low", "ci_high")}),
                        on="family", how="left")
        return t

    def to_dict(self) -> dict:
        d = dict(accuracy=self.accuracy, ci_low=self.ci_low, ci_high=self.ci_high, n=self.n, k=self.k,
                 confidence=self.confidence, by_family=self.by_family.to_dict(orient="records"))
        if self.blank is not None:
            d["blank"] = self.blank.to_dict()
        return d


def _chance(family: str) -> float:
    return 1.0 / len(ANSWERS[family]) if family in ANSWERS else float("nan")


def _summarise(families: list[str], correct: np.ndarray, predictions: list[str], confidence: float) -> EvalResult:
    import pandas as pd

    rows = []
    order = [f for f in FAMILIES if f in set(families)] + sorted(set(families) - set(FAMILIES))
    fam = np.array(families)
    for f in order:
        c = correct[fam == f]
        lo, hi = wilson(int(c.sum()), len(c), confidence)
        rows.append(dict(family=f, n=len(c), k=int(c.sum()), accuracy=float(c.mean()), ci_low=lo, ci_high=hi,
                         chance=_chance(f)))
    k, n = int(correct.sum()), len(correct)
    lo, hi = wilson(k, n, confidence)
    return EvalResult(k / n if n else float("nan"), lo, hi, n, k, pd.DataFrame(rows), predictions, correct,
                      confidence=confidence)


def build_prompts(processor, questions: Sequence[str]) -> list[str]:
    """The prompt text for each question, one image each, as the model was trained / expects.

    Uses the processor's chat template when it has one (``USER: <image>\\n{question} ASSISTANT:`` for
    LLaVA-1.5, the Qwen chat format for Qwen2-VL, and the templates shipped with the zoo models),
    with ``add_generation_prompt=True``; otherwise the LLaVA-1.5 format with the processor's image token.
    """
    if getattr(processor, "chat_template", None):
        return [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True, tokenize=False) for q in questions]
    token = getattr(processor, "image_token", "<image>")
    return [f"USER: {token}\n{q} ASSISTANT:" for q in questions]


def encode(processor, data: VQASet, start: int = 0, stop: int | None = None,
           texts: Sequence[str] | None = None):
    """Processor inputs (``return_tensors='pt'``, left padding) for items ``start:stop`` of ``data``:
    their one-question prompts, or the given ``texts`` (one per item, e.g. whole conversations)."""
    stop = len(data) if stop is None else stop
    images = [data.image(i) for i in range(start, stop)]
    prompts = build_prompts(processor, data.questions[start:stop]) if texts is None else list(texts)
    kwargs: dict[str, Any] = dict(images=images, text=prompts, return_tensors="pt", padding=True)
    tok = getattr(processor, "tokenizer", None)
    old = getattr(tok, "padding_side", None)
    try:
        if tok is not None:
            tok.padding_side = "left"
        inputs = processor(**kwargs)
    finally:
        if tok is not None and old is not None:
            tok.padding_side = old
    if "mm_token_type_ids" not in inputs and "image_grid_thw" in inputs:
        # Qwen processors that did not return it: build it from the image token (what Backbone needs)
        image_id = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<|image_pad|>"))
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == image_id).int()
    return inputs


def batches(processor, data: VQASet, batch_size: int = 32) -> Iterator[Any]:
    """Processor inputs for ``data`` in consecutive batches of ``batch_size`` items (the last may be
    shorter): the iterable :func:`skipit_core.capture.profile` and the measures take."""
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer; got {batch_size!r}.")
    for start in range(0, len(data), batch_size):
        yield encode(processor, data, start, min(start + batch_size, len(data)))


def next_token_logits(model, inputs) -> "Any":
    """Logits ``[B, V]`` of the next token after each (left-padded) prompt."""
    import inspect

    import torch

    kwargs = dict(inputs)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    with torch.no_grad():
        out = model(**kwargs)
    return out.logits[:, -1, :]


def evaluate(model, processor, data: VQASet, plan=None, *, batch_size: int = 32, with_blank: bool = False,
             confidence: float = 0.95, progress: bool = False) -> EvalResult:
    """Score ``model`` on ``data``: greedy single-token answers, full-vocabulary argmax.

    ``plan`` is an optional :class:`skipit_core.skip.SkipPlan` applied with
    ``skipit_core.skip.skipping`` around every forward pass. ``with_blank=True`` scores the same
    questions on blank images too and attaches that baseline as ``result.blank``. Batches are left
    padded; model inputs are checked with :meth:`skipit_core.models.Backbone.check_inputs`.
    Deterministic on CPU for a fixed ``batch_size``.
    """
    import contextlib

    import torch

    from .models import Backbone

    if not isinstance(data, VQASet):
        raise InputError(f"data must be a VQASet (DigitScenes.generate / DigitScenes.test_set / load_pope); "
                         f"got {type(data).__name__}.")
    if len(data) == 0:
        raise InputError("data is empty; nothing to evaluate.")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer; got {batch_size!r}.")
    backbone = Backbone.of(model)
    if plan is not None:
        from .skip import skipping

        ctx = lambda: skipping(model, plan)  # noqa: E731
    else:
        ctx = contextlib.nullcontext
    tokenizer = getattr(processor, "tokenizer", processor)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predictions: list[str] = []
    starts = range(0, len(data), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"evaluate {data.name}", unit="batch")
    try:
        for s in starts:
            inputs = encode(processor, data, s, min(s + batch_size, len(data)))
            backbone.check_inputs(inputs)
            inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
            if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
                inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
            with ctx():
                logits = next_token_logits(model, inputs)
            ids = logits.float().argmax(-1).tolist()
            predictions += [normalize_answer(tokenizer.decode([i])) for i in ids]
    finally:
        model.train(was_training)
    correct = np.array([p == normalize_answer(a) for p, a in zip(predictions, data.answers)], dtype=bool)
    result = _summarise(list(data.families), correct, predictions, confidence)
    if with_blank:
        result.blank = evaluate(model, processor, data.blank(), plan, batch_size=batch_size,
                                confidence=confidence, progress=progress)
    return result


def kept_window(early_exit: Mapping[int, Any], late_entry: Mapping[int, Any], reference: float) -> tuple[int, int]:
    """The widest window ``[a, b)`` of layers to keep the vision tokens in, read off two accuracy sweeps.

    ``early_exit[k]`` / ``late_entry[k]``: results (anything with ``ci_low`` and ``ci_high``, e.g. an
    :class:`EvalResult`) of ``SkipPlan.early_exit(k)`` / ``SkipPlan.late_entry(k)``. ``b`` is the smallest
    swept ``k`` such that the interval of every Early Exit at ``k`` or later contains ``reference`` (the
    unskipped accuracy); ``a`` the largest swept ``k`` such that every Late Entry at ``k`` or earlier does;
    ``b`` is raised to ``a`` if it is smaller. A description of one sample, not a test: the intervals of
    neighbouring ``k`` share their questions.
    """
    def contains(result) -> bool:
        return result.ci_low <= reference <= result.ci_high

    exits = [k for k in sorted(early_exit) if all(contains(early_exit[j]) for j in early_exit if j >= k)]
    entries = [k for k in sorted(late_entry) if all(contains(late_entry[j]) for j in late_entry if j <= k)]
    if not exits or not entries:
        raise InputError("no swept plan keeps the reference accuracy inside its interval; include the no-op "
                         "plans early_exit(n_layers) and late_entry(0) in the sweeps.")
    return entries[-1], max(exits[0], entries[-1])


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Write the frozen DigitScenes test split.")
    ap.add_argument("--freeze", default=None, help="path stem (default: data/digitscenes/test)")
    args = ap.parse_args(argv)
    path = DigitScenes.freeze(DigitScenes.make_test_set(), args.freeze or test_set_path())
    print(f"wrote {path} and {path.with_suffix('.jsonl')}")


if __name__ == "__main__":
    _main()
