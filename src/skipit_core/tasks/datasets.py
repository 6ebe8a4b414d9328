"""Data sets to score: :class:`VQASet`, the DigitScenes generator and its frozen test split, POPE.

:class:`DigitScenes` draws items of the question families of :mod:`skipit_core.tasks.scenes` from one
split of the digit pool. Answers are balanced within each family: the answer is drawn first, uniformly
over the family's answer set (exactly balanced, up to one item, in :meth:`DigitScenes.generate`), and
the scene is built to make it true. The frozen test split (``data/digitscenes/test.{npz,jsonl}``) is
what :meth:`DigitScenes.make_test_set` generates from its seed. Real benchmarks: :func:`load_pope` (yes/no
object hallucination) and :func:`load_scienceqa` (ScienceQA's image questions, multiple choice answered by
the option's letter), each from rows, a local ``.jsonl`` or the hub through ``datasets``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InputError, SkipitError
from ..paths import data_dir
from .scenes import ANSWERS, CANVAS, GRID, NOISE, QUESTION_FAMILIES, digit_pool, question_family, render_scene

__all__ = ["VQASet", "DigitScenes", "test_set_path", "load_pope", "load_scienceqa", "normalize_answer", "TEST_SEED",
           "TEST_PER_FAMILY"]

TEST_SEED = 20260101  # the seed the frozen test file was generated with
TEST_PER_FAMILY = 120
_STRIP = string.punctuation + string.whitespace + "\u2581\u0120"


def normalize_answer(text: str) -> str:
    """Lower case, without surrounding whitespace, punctuation or tokenizer word markers (▁, Ġ)."""
    return text.strip(_STRIP).lower()


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

    def save(self, path: str | os.PathLike) -> Path:
        """Write the set as ``<path>.npz`` (uint8 images, one shape) + ``<path>.jsonl`` (one item a line); no
        pickle. :meth:`load` reads it back; ``skipit profile --data <folder>`` takes the folder."""
        path = Path(path)
        try:
            images = np.asarray(self.images, dtype=np.uint8) if len(self) else np.zeros((0, 1, 1), np.uint8)
        except (ValueError, TypeError) as exc:
            raise InputError(f"VQASet.save writes one uint8 array of images, so they must share one shape; "
                             f"{exc}. Resize them first (e.g. PIL's Image.resize).") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path.with_suffix(".npz"), images=images)
        with open(path.with_suffix(".jsonl"), "w") as fh:
            for q, a, f, m in zip(self.questions, self.answers, self.families, self.meta):
                fh.write(json.dumps(dict(question=q, answer=a, family=f, **m), sort_keys=True) + "\n")
        return path.with_suffix(".npz")

    @staticmethod
    def load(path: str | os.PathLike) -> "VQASet":
        """Read a set written by :meth:`save`."""
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

    def chance(self) -> float:
        """The accuracy of uniform guessing among each item's possible answers, averaged over items:
        ``1 / len(meta["choices"])`` for a multiple-choice item (:func:`load_scienceqa`), ``1/2`` for a yes/no
        item, ``1 / |answers of its family|`` for a DigitScenes item (the default digit counts); items of
        other kinds raise :class:`InputError` (give them ``choices`` in ``meta``)."""
        levels = []
        for i, (family, answer, meta) in enumerate(zip(self.families, self.answers, self.meta)):
            if meta.get("choices"):
                levels.append(1 / len(meta["choices"]))
            elif family in ANSWERS:
                levels.append(1 / len(ANSWERS[family]))
            elif answer in ("yes", "no"):
                levels.append(1 / 2)
            else:
                raise InputError(f"item {i} ({family!r}): its possible answers are unknown; put them in "
                                 f"meta['choices'].")
        if not levels:
            raise InputError("chance of an empty set: there are no items.")
        return float(np.mean(levels))

    def family_names(self) -> list[str]:
        """The families present: DigitScenes' in table order, then any others sorted."""
        present = set(self.families)
        order = [f for f in QUESTION_FAMILIES if f in present]
        return order + sorted(present - set(order))


def _blank_like(img):
    if isinstance(img, np.ndarray):
        return np.zeros_like(img)
    return Image.new(img.mode if img.mode in ("RGB", "L") else "RGB", img.size)


# ----------------------------------------------------------------------------- DigitScenes
class DigitScenes:
    """Generator of digit-scene VQA items from one split of the real handwritten digits.

    >>> ds = DigitScenes("train")
    >>> items = ds.generate(n_per_family=10, seed=0)   # exactly balanced answers per family
    >>> batch = ds.sample(64, rng)                     # fresh random items (training)
    >>> test = DigitScenes.test_set()                  # the frozen test file in data/digitscenes

    ``min_digits``/``max_digits`` bound the number of digits per scene (2..6 by default; digits are
    distinct classes, so at most 10). ``families`` restricts the question families (names of
    :data:`~skipit_core.tasks.scenes.QUESTION_FAMILIES`).
    """

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
        self.families = tuple(QUESTION_FAMILIES if families is None else families)
        if not self.families:
            raise InputError("families is empty; give at least one of " + ", ".join(QUESTION_FAMILIES) + ".")
        for f in self.families:
            question_family(f)
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
        return question_family(family).answers(self.lo, self.hi)

    def item(self, family: str, answer: str | None, rng: np.random.Generator) -> dict:
        """One item of ``family`` whose answer is ``answer`` (drawn uniformly if None): a dict with
        ``image`` (``[64, 64]`` uint8), ``question``, ``answer``, ``family`` and ``meta`` (the layout)."""
        fam = question_family(family)
        allowed = fam.answers(self.lo, self.hi)
        if answer is None:
            answer = allowed[int(rng.integers(len(allowed)))]
        if answer not in allowed:
            raise InputError(f"{answer!r} is not an answer of family {family!r}; answers are {allowed}.")
        digits, cells, fields = fam.make(answer, self.lo, self.hi, rng)
        sources = [int(rng.choice(self.pool[d])) for d in digits]
        image = render_scene(sources, cells, rng, self.noise)
        meta = dict(digits=[int(d) for d in digits], cells=[int(c) for c in cells], sources=sources)
        return dict(image=image, question=fam.question(**fields), answer=answer, family=family, meta=meta)

    @staticmethod
    def ask(meta: Mapping[str, Any], family: str, rng: np.random.Generator) -> tuple[str, str]:
        """A random ``(question, answer)`` of ``family`` about the scene ``meta`` (its ``digits`` and
        ``cells``), answered from the layout: the follow-up turns of a multi-turn training conversation.

        Unlike :meth:`item`, the scene is given, so answers are not balanced; the draws lean towards
        informative questions (:meth:`QuestionFamily.ask` of each family says how).
        """
        return question_family(family).ask([int(d) for d in meta["digits"]], [int(c) for c in meta["cells"]], rng)

    @staticmethod
    def _collect(items: list[dict], name: str) -> VQASet:
        images = np.stack([it["image"] for it in items]) if items else np.zeros((0, CANVAS, CANVAS), np.uint8)
        return VQASet(images, [it["question"] for it in items], [it["answer"] for it in items],
                      [it["family"] for it in items], [it["meta"] for it in items], name)

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
    freeze = staticmethod(VQASet.save)  # DigitScenes.freeze(data, path): the same as data.save(path)
    load = staticmethod(VQASet.load)

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
    rows, base = _pope_rows(source, split)
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


#: option letters of ScienceQA's multiple-choice questions (at most five choices)
OPTION_LETTERS = "ABCDE"


def load_scienceqa(source: str | os.PathLike | Iterable[Mapping[str, Any]] = "derek-thomas/ScienceQA",
                   split: str = "validation", limit: int | None = None,
                   prompt_suffix: str = " Answer with the option's letter.", subject: str | None = None) -> VQASet:
    """ScienceQA-IMG (the ScienceQA questions that come with an image) as a :class:`VQASet`.

    ``source``: an iterable of dict rows with ScienceQA's schema (``image``: PIL image, array, file path, or
    ``None`` for the text-only questions, which are skipped; ``question``; ``choices``: 2 to 5 strings;
    ``answer``: the index of the right choice; optional ``hint`` (the context) and ``subject``, used as the
    family), a local ``.jsonl`` of such rows (image paths relative to the file), or a hub name loaded with
    ``datasets.load_dataset(source, split=split)``. Each item's question is the hint, the question and the
    lettered options (``A. ...``), one per line, then ``prompt_suffix``; its single-token answer is the right
    option's letter (``"a"`` ... after :func:`normalize_answer`). ``limit`` counts kept (image) items.
    """
    rows, base = _pope_rows(source, split, "ScienceQA")
    images, questions, answers, families, meta = [], [], [], [], []
    for i, row in enumerate(rows):
        if limit is not None and len(questions) >= limit:
            break
        for key in ("question", "choices", "answer"):
            if key not in row:
                raise InputError(f"row {i} lacks `{key}`; ScienceQA rows need image, question, choices and answer "
                                 f"(got keys {sorted(row)}).")
        if row.get("image") is None or (subject is not None and row.get("subject") != subject):
            continue
        choices = [str(c) for c in row["choices"]]
        answer = row["answer"]
        if not 2 <= len(choices) <= len(OPTION_LETTERS):
            raise InputError(f"row {i}: {len(choices)} choices; ScienceQA questions have 2 to "
                             f"{len(OPTION_LETTERS)}.")
        if isinstance(answer, bool) or not isinstance(answer, (int, np.integer)) or not 0 <= answer < len(choices):
            raise InputError(f"row {i}: answer must be the index of the right choice (0..{len(choices) - 1}); "
                             f"got {answer!r}.")
        options = "\n".join(f"{OPTION_LETTERS[k]}. {c}" for k, c in enumerate(choices))
        hint = str(row.get("hint") or "").strip()
        text = "\n".join(part for part in (hint, str(row["question"]).strip(), options) if part)
        images.append(_as_image(row["image"], base))
        questions.append(text + prompt_suffix)
        answers.append(normalize_answer(OPTION_LETTERS[int(answer)]))
        families.append(str(row.get("subject") or "scienceqa"))
        meta.append(dict(choices=choices, **{k: row[k] for k in ("id", "grade", "topic", "category") if k in row}))
    if not questions:
        raise InputError("no ScienceQA image rows were read; check the source, split and subject.")
    return VQASet(images, questions, answers, families, meta, "scienceqa-img")


def _pope_rows(source, split: str, what: str = "POPE") -> tuple[Iterable[Mapping[str, Any]], Path | None]:
    """The rows of a POPE (or ScienceQA: ``what``) source and the folder relative image paths start from."""
    if not isinstance(source, (str, os.PathLike)):
        return source, None
    p = Path(source)
    if p.suffix == ".jsonl" and p.exists():
        return [json.loads(line) for line in open(p) if line.strip()], p.parent
    if p.exists():
        raise InputError(f"{p} is not a .jsonl file of {what} rows; give a .jsonl, an iterable of dicts, "
                         "or a hub name.")
    try:
        import datasets as hf_datasets
    except ImportError as exc:
        raise SkipitError(f"loading {source!r} from the hub needs `datasets` (pip install datasets); "
                          "or pass an iterable of dict rows / a local .jsonl.") from exc
    return hf_datasets.load_dataset(str(source), split=split), None


def _as_image(obj, base: Path | None):
    if isinstance(obj, Image.Image):
        return obj.convert("RGB")
    if isinstance(obj, np.ndarray):
        return Image.fromarray(obj.astype(np.uint8)).convert("RGB")
    if isinstance(obj, Mapping) and obj.get("bytes") is not None:  # datasets' Image feature, undecoded
        return Image.open(io.BytesIO(obj["bytes"])).convert("RGB")
    if isinstance(obj, (str, os.PathLike)):
        p = Path(obj)
        p = base / p if base is not None and not p.is_absolute() else p
        return Image.open(p).convert("RGB")
    raise InputError(f"cannot read an image from {type(obj).__name__}; give a PIL image, an array or a path.")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m skipit_core.tasks [--freeze STEM]``: write the frozen DigitScenes test split."""
    ap = argparse.ArgumentParser(prog="python -m skipit_core.tasks", description="Write the frozen DigitScenes test split.")
    ap.add_argument("--freeze", default=None, help="path stem (default: data/digitscenes/test)")
    args = ap.parse_args(argv)
    path = DigitScenes.freeze(DigitScenes.make_test_set(), args.freeze or test_set_path())
    print(f"wrote {path} and {path.with_suffix('.jsonl')}")
