"""Honest scoring: prompts, batches, :func:`evaluate` with Wilson intervals, :func:`kept_window`.

:func:`evaluate` scores any supported Hugging Face VLM on a :class:`~skipit_core.tasks.VQASet`
(DigitScenes, or a real benchmark through :func:`~skipit_core.tasks.load_pope`): one forward pass per
batch (left padding), the answer is the argmax of the next-token logits over the **full vocabulary**,
decoded and normalised (lower case, surrounding spaces / punctuation / sentencepiece markers stripped)
and compared with the expected answer (``EvalResult.correct [N]``: one boolean per item, in the data's
order, so two plans scored on the same items can be compared question by question). Restricting the argmax to the family's answers would hide a
model that answers off-format; the full-vocabulary rule is the honest one. Every accuracy comes with a
Wilson 95% interval, per question family too, and a blank-image baseline (``with_blank=True`` or
``data.blank()``) says how much of it is reachable without looking.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..forward import accepts, model_device_dtype, move_inputs
from ..models import Backbone
from ..skip import SkipPlan, skipping
from ..stats import holm, mcnemar_exact, wilson_interval
from .datasets import VQASet, normalize_answer
from .scenes import ANSWERS, QUESTION_FAMILIES

__all__ = ["build_prompts", "encode", "batches", "next_token_logits", "evaluate", "EvalResult", "summarise",
           "wilson", "kept_window", "sweep", "sweep_frame", "STRATEGIES", "paired_sweep"]


#: the Wilson interval of every accuracy (:func:`skipit_core.stats.wilson_interval`, one owner)
wilson = wilson_interval


# ----------------------------------------------------------------------------- prompts and batches
def build_prompts(processor, questions: Sequence[str]) -> list[str]:
    """The prompt text for each question, one image each, as the model was trained / expects.

    Uses the processor's chat template when it has one (``USER: <image>\\n{question} ASSISTANT:`` for
    LLaVA-1.5, the Qwen chat format for Qwen2-VL, and the templates shipped with the zoo models), with
    one user message holding an image part then a text part and ``add_generation_prompt=True``;
    otherwise the LLaVA-1.5 format with the processor's image token.
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
    their one-question prompts, or the given ``texts`` (one per item, e.g. whole conversations).
    ``input_ids`` / ``attention_mask`` are ``[B, T]``; Qwen processors also give ``mm_token_type_ids``.

    Images go in as one list per prompt (``[[image], ...]``): Gemma3's processor reads a flat list as
    all the images of the first prompt; the other supported processors accept both forms. PaliGemma's
    ``labels`` (all -100 without a suffix) are dropped: scoring never needs them, and the model would
    compute a loss that fails under ``logits_to_keep=1``."""
    stop = len(data) if stop is None else stop
    images = [[data.image(i)] for i in range(start, stop)]
    prompts = build_prompts(processor, data.questions[start:stop]) if texts is None else list(texts)
    tok = getattr(processor, "tokenizer", None)
    old = getattr(tok, "padding_side", None)
    try:
        if tok is not None:
            tok.padding_side = "left"
        inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    finally:
        if tok is not None and old is not None:
            tok.padding_side = old
    inputs.pop("labels", None)
    if "mm_token_type_ids" not in inputs and "image_grid_thw" in inputs:
        # Qwen processors that did not return it: build it from the image token (what Backbone needs)
        image_id = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<|image_pad|>"))
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == image_id).int()
    return inputs


def batches(processor, data: VQASet, batch_size: int = 32) -> Iterator[Any]:
    """Processor inputs for ``data`` in consecutive batches of ``batch_size`` items (the last may be
    shorter): the iterable :func:`skipit_core.capture.profile` and the measures take."""
    _check_batch_size(batch_size)
    for start in range(0, len(data), batch_size):
        yield encode(processor, data, start, min(start + batch_size, len(data)))


def _check_batch_size(batch_size) -> None:
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer; got {batch_size!r}.")


def next_token_logits(model, inputs) -> torch.Tensor:
    """Logits ``[B, V]`` of the next token after each (left-padded) prompt."""
    kwargs = dict(inputs)
    if accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    with torch.no_grad():
        out = model(**kwargs)
    return out.logits[:, -1, :]


# ----------------------------------------------------------------------------- results
@dataclass
class EvalResult:
    """Accuracy with a Wilson interval, per family too; ``blank`` is the blank-image baseline when
    computed (``evaluate(..., with_blank=True)``). ``predictions`` are the decoded argmax tokens."""

    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    k: int
    by_family: pd.DataFrame  # family, n, k, accuracy, ci_low, ci_high, chance
    predictions: list[str]
    correct: np.ndarray
    blank: "EvalResult | None" = None
    confidence: float = 0.95

    def __str__(self) -> str:
        s = f"accuracy {self.accuracy:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] (n={self.n})"
        if self.blank is not None:
            s += f"; blank-image baseline {self.blank.accuracy:.3f} [{self.blank.ci_low:.3f}, {self.blank.ci_high:.3f}]"
        return s

    def table(self) -> pd.DataFrame:
        """Overall + per-family rows (with the blank baseline side by side when present)."""
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


def summarise(families: list[str], correct: np.ndarray, predictions: list[str], confidence: float = 0.95
              ) -> EvalResult:
    """The :class:`EvalResult` of scored items: per family and overall ``k / n`` with Wilson intervals.

    ``families[i]`` is item ``i``'s group, ``correct [N]`` booleans, ``predictions`` the answers given; this
    is the scoring :func:`evaluate` itself uses (e.g. to merge the items of several processes)."""
    rows = []
    order = [f for f in QUESTION_FAMILIES if f in set(families)] + sorted(set(families) - set(QUESTION_FAMILIES))
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


# ----------------------------------------------------------------------------- scoring
def evaluate(model, processor, data: VQASet, plan=None, *, batch_size: int = 32, with_blank: bool = False,
             confidence: float = 0.95, progress: bool = False) -> EvalResult:
    """Score ``model`` on ``data``: greedy single-token answers, full-vocabulary argmax.

    ``plan`` is an optional :class:`skipit_core.skip.SkipPlan` applied with
    ``skipit_core.skip.skipping`` around every forward pass. ``with_blank=True`` scores the same
    questions on blank images too and attaches that baseline as ``result.blank``. Batches are left
    padded; model inputs are checked with :meth:`skipit_core.models.Backbone.check_inputs`.
    Deterministic on CPU for a fixed ``batch_size``.
    """
    if not isinstance(data, VQASet):
        raise InputError(f"data must be a VQASet (DigitScenes.generate / DigitScenes.test_set / load_pope); "
                         f"got {type(data).__name__}.")
    if len(data) == 0:
        raise InputError("data is empty; nothing to evaluate.")
    _check_batch_size(batch_size)
    backbone = Backbone.of(model)
    ctx = (lambda: skipping(model, plan)) if plan is not None else contextlib.nullcontext
    tokenizer = getattr(processor, "tokenizer", processor)
    device, dtype = model_device_dtype(model)
    was_training = model.training
    model.eval()
    predictions: list[str] = []
    starts = range(0, len(data), batch_size)
    if progress:
        starts = tqdm(starts, desc=f"evaluate {data.name}", unit="batch")
    try:
        for s in starts:
            inputs = encode(processor, data, s, min(s + batch_size, len(data)))
            backbone.check_inputs(inputs)
            with ctx():
                logits = next_token_logits(model, move_inputs(inputs, device, dtype))
            predictions += [normalize_answer(tokenizer.decode([i])) for i in logits.float().argmax(-1).tolist()]
    finally:
        model.train(was_training)
    correct = np.array([p == normalize_answer(a) for p, a in zip(predictions, data.answers)], dtype=bool)
    result = summarise(list(data.families), correct, predictions, confidence)
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


#: the two sweeps of :func:`sweep`: display name -> plan constructor
STRATEGIES = {"Early Exit": SkipPlan.early_exit, "Late Entry": SkipPlan.late_entry}


def sweep(model, processor, data: VQASet, ks: Sequence[int] | None = None, *, reference: EvalResult | None = None,
          batch_size: int = 32, confidence: float = 0.95, progress: bool = False) -> dict[str, dict[int, EvalResult]]:
    """Early Exit(k) and Late Entry(k) scored on the same items for every ``k`` in ``ks``.

    Returns ``{"Early Exit": {k: EvalResult}, "Late Entry": {k: EvalResult}}`` (the keys of
    :data:`STRATEGIES`, ``k`` in the order given; default ``ks = 0, 1, ..., L`` for an ``L``-layer backbone,
    every layer boundary). The two sweeps are what :func:`kept_window` reads; every result keeps its
    per-item ``correct`` vector, so a plan can be compared with no skipping on the same questions
    (:func:`skipit_core.stats.mcnemar_exact`). The no-op plans ``late_entry(0)`` and ``early_exit(L)``
    give bit-identical outputs (tested in ``tests/test_skip.py``), so they are not run again: they
    get ``reference`` (the unskipped :func:`evaluate` of the same ``data``, computed once when not given).
    ``progress`` shows a tqdm bar over the plans.
    """
    L = Backbone.of(model).n_layers
    ks = list(range(L + 1)) if ks is None else [int(k) for k in ks]
    bad = [k for k in ks if not 0 <= k <= L]
    if bad or not ks or len(set(ks)) != len(ks):
        raise InputError(f"ks must be distinct layer boundaries in 0..{L} (this backbone has {L} layers); got "
                         f"{ks!r}.")
    if reference is not None and (reference.n != len(data) or reference.confidence != confidence):
        raise InputError(f"reference must be the unskipped evaluate() of the same {len(data)} items at confidence "
                         f"{confidence}; got n={reference.n}, confidence {reference.confidence}.")
    out: dict[str, dict[int, EvalResult]] = {name: {} for name in STRATEGIES}
    todo = [(name, k) for name in STRATEGIES for k in ks]
    for name, k in tqdm(todo, desc=f"sweep {data.name}", unit="plan", disable=not progress):
        plan = STRATEGIES[name](k)
        if plan.is_noop(L):
            if reference is None:
                reference = evaluate(model, processor, data, batch_size=batch_size, confidence=confidence)
            out[name][k] = reference
        else:
            out[name][k] = evaluate(model, processor, data, plan, batch_size=batch_size, confidence=confidence)
    return out


def sweep_frame(results: Mapping[str, Mapping[int, EvalResult]]) -> pd.DataFrame:
    """One row per swept plan of :func:`sweep`'s result: strategy, k, accuracy, ci_low, ci_high, n, k_correct."""
    return pd.DataFrame([dict(strategy=name, k=k, accuracy=r.accuracy, ci_low=r.ci_low, ci_high=r.ci_high, n=r.n,
                              k_correct=r.k) for name, by_k in results.items() for k, r in by_k.items()])


def paired_sweep(results: Mapping[str, Mapping[int, EvalResult]], reference: EvalResult,
                 window: tuple[int, int] | None = None, n_layers: int | None = None) -> pd.DataFrame:
    """Every swept plan against no skipping on the same questions: exact McNemar test and paired effect.

    ``results``: :func:`sweep`'s ``{"Early Exit": {k: EvalResult}, "Late Entry": {k: EvalResult}}``;
    ``reference``: the unskipped result on the same items (``correct`` vectors compared item by item);
    ``window = (a, b)``: the layers ``[a, b)`` the vision tokens are kept in (the band they skip is
    ``[0, a) U [b, L)``, e.g. :func:`kept_window`'s result or a predicted ``late_entry(a) | early_exit(b)``).
    A plan is *inside* when it skips only band layers (Late Entry(k) with ``k <= a``, Early Exit(k) with
    ``k >= b``). ``n_layers`` marks the no-op plans (Late Entry(0), Early Exit(L)).

    Columns: strategy, k, inside (None without a window), noop, accuracy, ci_low, ci_high, reference_in_ci
    (the unskipped accuracy lies in the plan's Wilson interval), difference (reference accuracy minus the plan's, the
    paired difference of :func:`skipit_core.stats.mcnemar_exact`), diff_low, diff_high (its exact interval),
    only_reference, only_plan (discordant questions), p_value (two-sided exact McNemar) and p_holm (Holm-adjusted
    over the plans that are not no-ops, :func:`skipit_core.stats.holm`).
    """
    rows = []
    ref_correct = np.asarray(reference.correct, dtype=bool)
    for name, by_k in results.items():
        if name not in STRATEGIES:
            raise InputError(f"results must be sweep()'s dict with keys {list(STRATEGIES)}; got key {name!r}.")
        for k, r in by_k.items():
            if len(r.correct) != len(ref_correct):
                raise InputError(f"{name}({k}) was scored on {len(r.correct)} items, the reference on "
                                 f"{len(ref_correct)}: a paired test needs the same questions.")
            test = mcnemar_exact(ref_correct, np.asarray(r.correct, dtype=bool), reference.confidence)
            inside = None
            if window is not None:
                inside = bool(k <= window[0]) if name == "Late Entry" else bool(k >= window[1])
            noop = (k == 0 if name == "Late Entry" else k == n_layers) if n_layers is not None else False
            rows.append(dict(strategy=name, k=int(k), inside=inside, noop=bool(noop), accuracy=r.accuracy,
                             ci_low=r.ci_low, ci_high=r.ci_high,
                             reference_in_ci=bool(r.ci_low <= reference.accuracy <= r.ci_high),
                             difference=test.difference, diff_low=test.ci[0], diff_high=test.ci[1],
                             only_reference=test.only_a, only_plan=test.only_b, p_value=test.p_value))
    frame = pd.DataFrame(rows)
    frame["p_holm"] = np.nan
    tested = ~frame["noop"].to_numpy(bool)
    if tested.any():
        frame.loc[tested, "p_holm"] = holm(frame.loc[tested, "p_value"].to_numpy())
    return frame
