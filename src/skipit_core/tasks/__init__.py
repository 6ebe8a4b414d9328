"""Visual question answering tasks and honest scoring.

* :mod:`.scenes`: the digit pools, scene rendering and the question families (:data:`QUESTION_FAMILIES`,
  one :class:`QuestionFamily` object each: template, answers, scene maker, follow-up asker);
* :mod:`.datasets`: :class:`VQASet`, the :class:`DigitScenes` generator and its frozen test split,
  :func:`load_pope`;
* :mod:`.evaluation`: prompts and batches, :func:`evaluate` (full-vocabulary argmax, Wilson intervals,
  blank-image baseline), :func:`kept_window`.

Every public name is re-exported here (``skipit_core.tasks.DigitScenes`` ...).
"""

from __future__ import annotations

from .datasets import (TEST_PER_FAMILY, TEST_SEED, DigitScenes, VQASet, load_pope, normalize_answer,
                       test_set_path)
from .evaluation import (STRATEGIES, EvalResult, batches, build_prompts, encode, evaluate, kept_window,
                         next_token_logits, paired_sweep, summarise, sweep, sweep_frame, wilson)
from .scenes import (ANSWERS, CANVAS, CELL, DIGITS, GRID, N_CELLS, NOISE, QUESTION_FAMILIES, SPLIT_FRACTIONS,
                     SPLITS, TEMPLATES, VOCABULARY, QuestionFamily, digit_pool, question_family, render_scene)

__all__ = [
    "QUESTION_FAMILIES",
    "QuestionFamily",
    "question_family",
    "ANSWERS",
    "TEMPLATES",
    "VOCABULARY",
    "DigitScenes",
    "batches",
    "VQASet",
    "EvalResult",
    "evaluate",
    "kept_window",
    "sweep",
    "sweep_frame",
    "paired_sweep",
    "STRATEGIES",
    "build_prompts",
    "encode",
    "next_token_logits",
    "normalize_answer",
    "wilson",
    "summarise",
    "load_pope",
    "digit_pool",
    "render_scene",
    "test_set_path",
]
