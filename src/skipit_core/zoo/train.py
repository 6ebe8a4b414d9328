"""Train a zoo model on DigitScenes from scratch, on a CPU, with LLaVA's three-stage recipe.

    python -m skipit_core.zoo.train --arch llava --out data/models/digits-llava
    python -m skipit_core.zoo.train --arch qwen2vl --out data/models/digits-qwen2vl

Every setting is a field of :class:`TrainConfig` (defaults written once; the command-line flags are
generated from its fields) and the whole config is written to ``training.json``. New models are prompted
``image-first`` with their family's real chat template (:mod:`skipit_core.zoo.build`).

The model is split into three parts (:func:`model_parts`): the vision encoder, the projector (LLaVA's
``multi_modal_projector``, Qwen2-VL's patch ``merger``) and the language model. Stages, one optimiser
loop (:func:`optimise`) each:

1. **vision pretraining** (``vision_*``, the stand-in for a pretrained CLIP): the vision encoder alone
   learns, per patch token, the digit in its grid cell, in the cells left of and above it, and the cell's
   row and column (:func:`pretrain_vision`);
2. **alignment** (``align_*``, off by default): only the projector trains, on the answer loss, with the
   vision encoder and the language model frozen (:func:`align`);
3. **full fine-tuning**: everything trains on the answer loss, the vision encoder at
   ``vision_lr_scale`` x the learning rate (:func:`finetune`).

The answer loss: fresh scenes every step from the *train* digit pool, one question per sequence in the
model's chat template, exactly the prompt :func:`skipit_core.tasks.evaluate` scores; the loss is the
cross-entropy of the answer token. With ``--turns N`` a sequence is instead an N-turn conversation about
one image (turn 1 = the evaluation prompt, then follow-up questions, every answer in the loss). AdamW,
linear warm-up then cosine decay to ``min_lr_rate`` of the peak learning rate (transformers'
``get_cosine_with_min_lr_schedule_with_warmup``), gradient-norm clipping; validation accuracy
(validation digit pool) is logged at the end of stages 2 and 3 and every ``--eval-every`` steps of
stage 3, with the training time spent so far (validation excluded). Seeded: the same command on the
same machine gives the same model. The folder gets ``save_pretrained`` output (safetensors) plus
``training.json``. Write the model card afterwards with ``python -m skipit_core.zoo.card``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, get_cosine_with_min_lr_schedule_with_warmup

from ..errors import InputError
from ..tasks import GRID, N_CELLS, QUESTION_FAMILIES, DigitScenes, VQASet, build_prompts, encode, evaluate
from ..utils import set_seed
from .build import ARCHS, LAYOUTS, SIZES, ModelSize, answer_cue, build, load_processor, prompt_layout, save_processor

__all__ = ["TrainConfig", "train", "optimise", "model_parts", "pretrain_vision", "align", "finetune", "main",
           "cell_labels", "TARGET_CLASSES", "run_stages", "validation_set", "training_records", "validation_curve"]


def _help(text: str, **extra) -> dict:
    return dict(help=text, **extra)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; ``python -m skipit_core.zoo.train --help`` lists them as flags.

    Stage 1 (``vision_*``) pretrains the vision encoder, stage 2 (``align_*``) the projector alone, stage 3
    (``steps``, ``lr`` ...) everything, the vision encoder at ``vision_lr_scale * lr``.
    """

    arch: str = field(default="llava", metadata=_help("model family", choices=ARCHS))
    layout: str = field(default="image-first", metadata=_help("prompt layout of a new model (a continued run "
                                                              "keeps its folder's)", choices=LAYOUTS))
    seed: int = field(default=0, metadata=_help("seed of weights, data and order"))
    threads: int | None = field(default=None, metadata=_help("torch CPU threads during training (default: torch's setting)"))
    init_from: str | None = field(default=None, metadata=_help("continue training a saved model folder "
                                                                 "(no vision pretraining)"))
    size: ModelSize = field(default_factory=ModelSize, metadata=_help("model sizes"))
    # stage 1: vision pretraining
    vision_steps: int = field(default=300, metadata=_help("stage-1 vision pretraining steps (0: none)"))
    vision_batch_size: int = field(default=128, metadata=_help("stage-1 images per step"))
    vision_lr: float = field(default=3e-3, metadata=_help("stage-1 peak learning rate"))
    vision_warmup: int = field(default=50, metadata=_help("stage-1 warm-up steps"))
    # stage 2: alignment
    align_steps: int = field(default=0, metadata=_help("stage-2 steps training only the projector (0: none)"))
    align_lr: float = field(default=1e-3, metadata=_help("stage-2 peak learning rate"))
    # stage 3: full fine-tuning
    steps: int = field(default=1200, metadata=_help("stage-3 full fine-tuning steps"))
    batch_size: int = field(default=64, metadata=_help("sequences per step"))
    lr: float = field(default=2e-3, metadata=_help("peak learning rate"))
    warmup: int = field(default=100, metadata=_help("linear warm-up steps"))
    vision_lr_scale: float = field(default=0.1, metadata=_help("learning rate of the vision tower / --lr"))
    turns: int = field(default=1, metadata=_help("questions per training conversation about one image "
                                                  "(1: single-question prompts)"))
    family_weights: tuple[float, ...] | None = field(default=None, metadata=_help(
        "comma-separated sampling weights of the families " + ",".join(QUESTION_FAMILIES)))
    # every stage
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay of matrices"))
    clip: float = field(default=1.0, metadata=_help("gradient-norm clipping"))
    min_lr_rate: float = field(default=0.1, metadata=_help("cosine decay floor, fraction of the peak lr"))
    eval_every: int = field(default=200, metadata=_help("validation every N steps (0: at the end only)"))
    val_per_family: int = field(default=30, metadata=_help("validation items per family (0: none)"))

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise InputError(f"unknown architecture {self.arch!r}; choose from {', '.join(ARCHS)}.")
        if self.steps < 1 or self.batch_size < 1 or self.turns < 1:
            raise InputError("steps, batch_size and turns must be positive.")
        if self.layout not in LAYOUTS:
            raise InputError(f"unknown prompt layout {self.layout!r}; choose from {', '.join(LAYOUTS)}.")
        if min(self.vision_steps, self.vision_batch_size, self.warmup, self.vision_warmup, self.align_steps) < 0:
            raise InputError("step counts, batch sizes and warm-ups cannot be negative.")
        if self.family_weights is not None:
            object.__setattr__(self, "family_weights", tuple(float(w) for w in self.family_weights))
            if len(self.family_weights) != len(QUESTION_FAMILIES):
                raise InputError(f"family_weights needs {len(QUESTION_FAMILIES)} weights, one per family "
                                 f"{', '.join(QUESTION_FAMILIES)}; got {len(self.family_weights)}.")
        if isinstance(self.size, Mapping):
            object.__setattr__(self, "size", ModelSize(**self.size))

    # -------------------------------------------------------------- training.json
    def to_dict(self) -> dict:
        d = asdict(self)
        d["family_weights"] = None if self.family_weights is None else dict(zip(QUESTION_FAMILIES, self.family_weights))
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """The config of a ``training.json`` (today's, or an older one: ``vision_lr_mult`` and the
        ``vision_pretrain`` log are read as ``vision_lr_scale`` and ``vision_*``, and a file without ``layout``
        was written for a question-first model); other keys are ignored."""
        d = dict(d)
        d.setdefault("layout", "question-first")
        if "vision_lr_mult" in d:
            d.setdefault("vision_lr_scale", d["vision_lr_mult"])
        if "vision_pretrain" in d and "vision_steps" not in d:  # files written before TrainConfig
            vp = d["vision_pretrain"] or {}
            d.update(vision_steps=vp.get("steps", 0), vision_batch_size=vp.get("batch_size", cls.vision_batch_size),
                     vision_lr=vp.get("lr", cls.vision_lr))
        weights = d.get("family_weights")
        if isinstance(weights, Mapping):
            d["family_weights"] = [weights[f] for f in QUESTION_FAMILIES]
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # -------------------------------------------------------------- command line
    @classmethod
    def add_arguments(cls, ap: argparse.ArgumentParser) -> None:
        """One flag per field (``--vision-steps``), defaults and help from the fields; ``size`` gives
        one flag per :class:`ModelSize` integer (``--hidden`` ...)."""
        for f, hint in _fields(cls):
            if f.name == "size":
                for g, g_hint in _fields(ModelSize):
                    if g_hint is int:
                        ap.add_argument(_flag(g.name), type=int, default=None, help=f"model size: {g.name} "
                                        f"(default {getattr(SIZES['llava'], g.name)})")
                continue
            kind = _base(hint)
            extra = {k: v for k, v in f.metadata.items() if k != "help"}
            parse = (lambda s: tuple(float(x) for x in s.split(","))) if kind is tuple else kind
            default = "" if f.default is None else f" (default {f.default})"
            ap.add_argument(_flag(f.name), type=parse, default=None, help=f.metadata.get("help", "") + default, **extra)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        given = {f.name: getattr(args, f.name) for f, _ in _fields(cls) if getattr(args, f.name, None) is not None}
        arch = given.get("arch", cls.arch)
        size = {g.name: getattr(args, g.name) for g, _ in _fields(ModelSize) if getattr(args, g.name, None) is not None}
        return cls(**given, size=replace(SIZES[arch], **size))


def _fields(cls) -> list:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in fields(cls)]


def _base(hint) -> type:
    """``int | None`` -> int, ``tuple[float, ...] | None`` -> tuple."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    hint = args[0] if args and typing.get_origin(hint) is not tuple else hint
    return typing.get_origin(hint) or hint


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------- the optimiser loop
def optimise(groups: list[dict], step_loss: Callable[[int], torch.Tensor], steps: int, *, warmup: int, clip: float,
             min_lr_rate: float, desc: str = "train", progress: bool = False,
             after_step: Callable[[int], None] | None = None) -> list[float]:
    """``steps`` AdamW steps (betas 0.9/0.98) on ``groups`` (torch param-group dicts with ``lr``) of the
    loss ``step_loss(step)``: warm-up then cosine decay to ``min_lr_rate`` of each group's lr, gradients
    clipped to norm ``clip``. ``after_step(step + 1)`` runs after each step. Returns the losses."""
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-8)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, min(warmup, steps), steps, min_lr_rate=min_lr_rate)
    losses: list[float] = []
    bar: Any = range(steps)
    if progress:
        bar = tqdm(bar, desc=desc, unit="step", mininterval=10, file=sys.stderr)
    for step in bar:
        loss = step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", refresh=False)
        if after_step is not None:
            after_step(step + 1)
    return losses


def param_groups(named: Sequence[tuple[torch.nn.Parameter, float]], weight_decay: float) -> list[dict]:
    """AdamW groups of ``(parameter, lr)`` pairs: matrices decay, vectors (biases, norms) do not."""
    groups: dict[tuple[float, bool], list] = {}
    for p, lr in named:
        groups.setdefault((lr, p.dim() >= 2), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": weight_decay if decays else 0.0}
            for (lr, decays), ps in groups.items()]


# ----------------------------------------------------------------------------- stage 1: vision pretraining
def cell_labels(data: VQASet) -> torch.Tensor:
    """``LongTensor[B, 5, N_CELLS]``: per grid cell (row-major) the digit in it, in the cell left of it and
    in the cell above it (10 where that cell is empty or off the grid), then the cell's row and column."""
    own = torch.full((len(data), N_CELLS), 10, dtype=torch.long)
    for i, m in enumerate(data.meta):
        own[i, m["cells"]] = torch.tensor(m["digits"])
    padded = torch.full((len(data), GRID + 1, GRID + 1), 10, dtype=torch.long)
    padded[:, 1:, 1:] = own.view(-1, GRID, GRID)
    left = padded[:, 1:, :-1].reshape(-1, N_CELLS)
    above = padded[:, :-1, 1:].reshape(-1, N_CELLS)
    cell = torch.arange(N_CELLS).expand(len(data), N_CELLS)
    return torch.stack([own, left, above, cell // GRID, cell % GRID], dim=1)


#: classes of the per-token targets of :func:`cell_labels`: own / left / above digit (10 = empty), row, column
TARGET_CLASSES = (11, 11, 11, GRID, GRID)


def model_parts(model) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """``{"vision": ..., "projector": ..., "language": ...}``: ``(name, parameter)`` pairs of the vision
    encoder, the projector (LLaVA ``multi_modal_projector``; Qwen2-VL ``visual.merger``) and the rest
    (language model, embeddings, LM head). Every parameter is in exactly one part."""
    if hasattr(model.model, "vision_tower"):
        part = lambda n: ("vision" if n.startswith("model.vision_tower.") else  # noqa: E731
                          "projector" if n.startswith("model.multi_modal_projector.") else "language")
    else:
        part = lambda n: ("projector" if n.startswith("model.visual.merger.") else  # noqa: E731
                          "vision" if n.startswith("model.visual.") else "language")
    parts: dict[str, list] = {"vision": [], "projector": [], "language": []}
    for name, p in model.named_parameters():
        parts[part(name)].append((name, p))
    return parts


@contextmanager
def only_trainable(model, params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Within the block, ``params`` are the only parameters of ``model`` that take gradients."""
    keep = {id(p) for p in params}
    before = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    try:
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(before[id(p)])


def vision_features(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Vision-encoder features ``[B, tokens, d]`` (before the projector) and the grid cell ``[tokens]``
    each token lies in: one token per patch.

    LLaVA: the CLIP tower's last hidden state without CLS (what the projector reads), patches row-major.
    Qwen2-VL: the last block's output (what the merger reads), patches ordered by merged token (row-major
    over cells), then within it.
    """
    vc = model.config.vision_config
    if hasattr(model.model, "vision_tower"):
        out = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        side = vc.image_size // vc.patch_size
        r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        return out.hidden_states[-1][:, 1:], ((r * GRID // side) * GRID + c * GRID // side).reshape(-1)
    out = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    feats = out.last_hidden_state.reshape(len(inputs["image_grid_thw"]), -1, vc.embed_dim)
    return feats, torch.arange(feats.shape[1]) // vc.spatial_merge_size ** 2


def vision_loss(head: torch.nn.Module, feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of the per-token targets and the accuracy of the *own digit* on occupied cells.

    ``feats [B, T, d]``, ``labels [B, T, 5]`` (:func:`cell_labels` gathered per token)."""
    logits = head(feats).split(TARGET_CLASSES, dim=-1)
    loss = sum(torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels[..., j].reshape(-1))
               for j, lg in enumerate(logits))
    occupied = labels[..., 0] < 10
    correct = (logits[0].argmax(-1) == labels[..., 0])[occupied].float().mean()
    return loss, correct


def pretrain_vision(model, processor, cfg: TrainConfig, gen: DigitScenes, *, progress: bool = False,
                    log: Callable[[str], None] = print) -> dict:
    """Stage 1: train the vision tower (and a throw-away linear head) to name, for the cell each vision
    token lies in, its digit, the digits in the cells left of and above it (11-way each: digit or
    empty/off-grid) and the cell's row and column, on fresh train-pool scenes.

    The analogue of starting LLaVA from a pretrained CLIP. The head is discarded; only the vision
    encoder's weights carry over (projector and language model untouched). Logged metric: accuracy of the
    own-cell digit over the tokens of occupied cells.
    """
    vc = model.config.vision_config
    head = torch.nn.Linear(getattr(vc, "embed_dim", None) or vc.hidden_size, sum(TARGET_CLASSES))
    rng = np.random.default_rng(cfg.seed + 7)
    accs: list[float] = []

    def step_loss(step: int) -> torch.Tensor:
        data = gen.sample(cfg.vision_batch_size, rng)
        pix = processor.image_processor([data.image(i) for i in range(len(data))], return_tensors="pt")
        feats, cells = vision_features(model, pix)
        loss, acc = vision_loss(head, feats, cell_labels(data)[:, :, cells].transpose(1, 2))
        accs.append(acc.item())
        return loss

    t0 = time.perf_counter()
    model.train()
    vision = [p for _, p in model_parts(model)["vision"]]
    groups = param_groups([(p, cfg.vision_lr) for p in [*vision, *head.parameters()]], cfg.weight_decay)
    with only_trainable(model, vision):
        losses = optimise(groups, step_loss, cfg.vision_steps, warmup=cfg.vision_warmup, clip=cfg.clip,
                          min_lr_rate=cfg.min_lr_rate, desc="vision pretrain", progress=progress)
    log(f"vision pretrain: {cfg.vision_steps} steps, last-50 occupied-cell digit accuracy {np.mean(accs[-50:]):.3f}, "
        f"loss {np.mean(losses[-50:]):.3f}")
    return dict(steps=cfg.vision_steps, batch_size=cfg.vision_batch_size, lr=cfg.vision_lr,
                targets="own, left, above digit; row; column", wall_time_s=round(time.perf_counter() - t0, 1),
                final_digit_accuracy=round(float(np.mean(accs[-50:])), 4),
                final_loss=round(float(np.mean(losses[-50:])), 4))


# ----------------------------------------------------------------------------- question answering
def conversations(processor, data: VQASet, turns: int, rng: np.random.Generator,
                  family_weights: Sequence[float] | None = None) -> tuple[dict, torch.Tensor]:
    """Processor inputs of one ``turns``-turn conversation per item of ``data`` and the answer token ids.

    Turn 1 is the item itself (its answer drawn balanced); turns 2.. ask follow-up questions about the
    same scene (:meth:`DigitScenes.ask`, families drawn with ``family_weights``). The text is the chat
    template's, so turn 1 reads exactly like an evaluation prompt. Targets are in reading order.
    """
    p = None if family_weights is None else np.asarray(family_weights, float) / np.sum(family_weights)
    texts, answers = [], []
    for question, answer, meta in zip(data.questions, data.answers, data.meta):
        qa = [(question, answer)]
        for family in rng.choice(tuple(QUESTION_FAMILIES), size=turns - 1, p=p):
            qa.append(DigitScenes.ask(meta, str(family), rng))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": qa[0][0]}]}]
        for i, (q, a) in enumerate(qa):
            if i:
                messages.append({"role": "user", "content": q})
            messages.append({"role": "assistant", "content": a})
        texts.append(processor.apply_chat_template(messages, tokenize=False))
        answers += [a for _, a in qa]
    targets = torch.tensor(processor.tokenizer.convert_tokens_to_ids(answers))
    return encode(processor, data, texts=texts), targets


def answer_positions(tokenizer, input_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask ``[B, T]`` of the positions whose next token is an answer: the ``:`` after
    ``assistant`` (``ASSISTANT:``), or ``assistant`` after ``<|im_start|>`` in ChatML (:func:`answer_cue`)."""
    first, last = answer_cue(tokenizer)
    hit = input_ids == last
    hit[:, 1:] &= input_ids[:, :-1] == first
    hit[:, 0] = False
    hit[:, -1] = False
    return hit


def answer_loss(model, processor, cfg: TrainConfig, gen: DigitScenes, rng: np.random.Generator) -> Callable[[int], torch.Tensor]:
    """``step -> loss``: cross-entropy of the answer tokens of a fresh batch of conversations."""
    def step_loss(step: int) -> torch.Tensor:
        data = gen.sample(cfg.batch_size, rng, cfg.family_weights)
        inputs, targets = conversations(processor, data, cfg.turns, rng, cfg.family_weights)
        logits = model(**inputs).logits
        positions = answer_positions(processor.tokenizer, inputs["input_ids"])
        return torch.nn.functional.cross_entropy(logits[positions].float(), targets)

    return step_loss


def align(model, processor, cfg: TrainConfig, gen: DigitScenes, rng: np.random.Generator, *,
          progress: bool = False, after_step: Callable[[int], None] | None = None) -> dict:
    """Stage 2: ``align_steps`` steps of the answer loss training only the projector (peak lr
    ``align_lr``); the vision encoder and the language model are frozen (bit-identical afterwards)."""
    t0 = time.perf_counter()
    projector = [p for _, p in model_parts(model)["projector"]]
    model.train()
    with only_trainable(model, projector):
        losses = optimise(param_groups([(p, cfg.align_lr) for p in projector], cfg.weight_decay),
                          answer_loss(model, processor, cfg, gen, rng), cfg.align_steps, warmup=cfg.warmup,
                          clip=cfg.clip, min_lr_rate=cfg.min_lr_rate, desc="align", progress=progress,
                          after_step=after_step)
    return dict(steps=cfg.align_steps, batch_size=cfg.batch_size, lr=cfg.align_lr, trained="projector",
                wall_time_s=round(time.perf_counter() - t0, 1), final_loss=round(float(np.mean(losses[-50:])), 4))


def finetune(model, processor, cfg: TrainConfig, gen: DigitScenes, rng: np.random.Generator, *,
             progress: bool = False, after_step: Callable[[int], None] | None = None) -> list[float]:
    """Stage 3: ``steps`` steps of the answer loss training every part, the vision encoder at
    ``vision_lr_scale * lr``, projector and language model at ``lr``. Returns the losses."""
    parts = model_parts(model)
    named = [(p, cfg.lr * (cfg.vision_lr_scale if part == "vision" else 1.0))
             for part, ps in parts.items() for _, p in ps if p.requires_grad]
    model.train()
    return optimise(param_groups(named, cfg.weight_decay), answer_loss(model, processor, cfg, gen, rng), cfg.steps,
                    warmup=cfg.warmup, clip=cfg.clip, min_lr_rate=cfg.min_lr_rate, desc=f"train {cfg.arch}",
                    progress=progress, after_step=after_step)


# ----------------------------------------------------------------------------- the run
@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(config: TrainConfig | str = "llava", out: str | Path | None = None, *, progress: bool = True,
          log: Callable[[str], None] = print, command: str | None = None, **overrides):
    """Train and (if ``out``) save; returns ``(model, processor, history)``.

    ``config`` is a :class:`TrainConfig`, or an architecture name; keyword ``overrides`` replace its
    fields (``train("qwen2vl", steps=40, size=ModelSize(...))``). ``history`` is a dict with the
    per-step ``loss`` list, the ``validation`` log (step, overall and per-family accuracy), the
    stage-1 log ``vision_pretrain`` and the ``config`` as run (``threads`` filled in).
    """
    cfg = TrainConfig(arch=config, **overrides) if isinstance(config, str) else replace(config, **overrides)
    if cfg.init_from is not None:  # a continued run: the saved model's sizes and layout, no vision pretraining
        saved = Path(cfg.init_from) / "training.json"
        size = ModelSize(**json.loads(saved.read_text())["size"]) if saved.exists() else cfg.size
        layout = prompt_layout(build_prompts(load_processor(cfg.init_from), ["{question}"])[0])
        cfg = replace(cfg, size=size, vision_steps=0, layout=layout)
    with _threads(cfg.threads):
        cfg = replace(cfg, threads=torch.get_num_threads())  # recorded as run
        model, processor, history, previous = _run(cfg, progress, log)
    history["config"] = cfg
    if out is not None:
        _save(model, processor, cfg, history, previous, Path(out), command)
        log(f"saved {out} ({history['wall_time_s'] / 60:.1f} min)")
    return model, processor, history


def _run(cfg: TrainConfig, progress: bool, log: Callable[[str], None]):
    set_seed(cfg.seed)
    model, processor = build(cfg.arch, cfg.size, seed=cfg.seed, layout=cfg.layout)
    previous = None
    if cfg.init_from is not None:
        init = Path(cfg.init_from)
        model = AutoModelForImageTextToText.from_pretrained(init, dtype=torch.float32)
        processor = load_processor(init)
        if (init / "training.json").exists():
            previous = json.loads((init / "training.json").read_text())
    history = run_stages(model, processor, cfg, validation_set(cfg), progress=progress, log=log)
    return model, processor, history, previous


def validation_set(cfg: TrainConfig) -> VQASet | None:
    """The validation questions logged during training: ``val_per_family`` per family from the validation
    digit pool (seed ``seed + 1``), or None."""
    return DigitScenes("validation").generate(cfg.val_per_family, seed=cfg.seed + 1) if cfg.val_per_family else None


def run_stages(model, processor, cfg: TrainConfig, val: VQASet | None, *, progress: bool = False,
               log: Callable[[str], None] = print, spent_s: float = 0.0) -> dict:
    """Stages 1-3 of ``cfg`` on ``model`` (stage 1 only if ``vision_steps``, stage 2 only if ``align_steps``),
    validating on ``val``. Returns the history (``loss``, ``validation``, ``vision_pretrain``, ``align``,
    ``wall_time_s``); ``spent_s`` seconds of earlier training are added to every logged training time.
    Leaves the model in eval mode."""
    train_gen = DigitScenes("train")
    rng = np.random.default_rng(cfg.seed)
    history: dict = {"loss": [], "validation": [], "vision_pretrain": {}, "align": {}}
    t0, validating = time.perf_counter() - spent_s, [0.0]  # wall time covers every stage; validation time is kept

    def validate(stage: str, step: int, last: int) -> None:
        if val is None or not (step == last or (stage == "full" and cfg.eval_every and step % cfg.eval_every == 0)):
            return
        v0 = time.perf_counter()
        train_time = v0 - t0 - validating[0]
        r = evaluate(model, processor, val, batch_size=128)
        fam = {row["family"]: round(row["accuracy"], 4) for row in r.by_family.to_dict(orient="records")}
        validating[0] += time.perf_counter() - v0
        history["validation"].append(dict(stage=stage, step=step, accuracy=round(r.accuracy, 4), by_family=fam,
                                          train_time_s=round(train_time, 1)))
        log(f"{stage} step {step}: validation accuracy {r.accuracy:.3f} (n={r.n}) " +
            " ".join(f"{k}={v:.2f}" for k, v in fam.items()))
        model.train()

    if cfg.vision_steps:
        history["vision_pretrain"] = pretrain_vision(model, processor, cfg, train_gen, progress=progress, log=log)
    if cfg.align_steps:
        history["align"] = align(model, processor, cfg, train_gen, rng, progress=progress,
                                 after_step=lambda step: validate("align", step, cfg.align_steps))
    history["loss"] = finetune(model, processor, cfg, train_gen, rng, progress=progress,
                               after_step=lambda step: validate("full", step, cfg.steps))
    history["wall_time_s"] = round(time.perf_counter() - t0, 1)
    model.eval()
    return history


def _save(model, processor, cfg: TrainConfig, history: dict, previous, out: Path, command: str | None) -> None:
    """``save_pretrained`` output plus ``training.json``: the config's fields at top level, then the logs."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_processor(processor, out)
    loss = history["loss"]
    meta = dict(
        cfg.to_dict(), command=command, previous=previous, vision_pretrain=history["vision_pretrain"],
        align=history["align"], prompt_layout=cfg.layout, prompt=build_prompts(processor, ["{question}"])[0],
        schedule=f"linear warm-up, cosine decay to {cfg.min_lr_rate:.0%}", optimizer="AdamW(betas=(0.9, 0.98))",
        parameters=int(sum(p.numel() for p in model.parameters())), wall_time_s=history["wall_time_s"],
        machine=platform.machine(), processor=platform.processor() or None,
        torch=torch.__version__, transformers=transformers.__version__, final_loss=float(np.mean(loss[-50:])),
        validation=history["validation"],
        loss_every_50=[round(float(np.mean(loss[i:i + 50])), 4) for i in range(0, len(loss), 50)],
    )
    (out / "training.json").write_text(json.dumps(meta, indent=1) + "\n")


# ----------------------------------------------------------------------------- reading a record
def training_records(folder: str | Path) -> list[dict]:
    """The ``training.json`` of a model folder and of every run it continued (its ``previous`` chain),
    oldest first; ``[]`` when the folder has none."""
    file = Path(folder) / "training.json"
    record = json.loads(file.read_text()) if file.exists() else None
    chain = []
    while record:
        chain.append(record)
        record = record.get("previous")
    return chain[::-1]


def validation_curve(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Every validation logged during training (:func:`training_records`'s runs, oldest first), one row
    each: ``run`` (1-based), ``stage`` (``align`` / ``full``; ``full`` in files that did not say),
    ``step`` within its stage, ``total_steps`` (optimiser steps of stages 2-3 since the first run began),
    ``accuracy``, ``n`` (validation questions: ``val_per_family`` x 7 families; NaN in files that did not
    record it), ``train_time_s`` (training
    time since the run began, stage 1 included, validation excluded; NaN in files written before it was
    logged) and one column per question family."""
    rows, done = [], 0
    for run, record in enumerate(records, start=1):
        cfg = TrainConfig.from_dict(record)
        align_steps = (record.get("align") or {}).get("steps", 0)
        n = cfg.val_per_family * len(QUESTION_FAMILIES) if "val_per_family" in record else np.nan
        for v in record.get("validation", []):
            stage = v.get("stage", "full")
            rows.append(dict(run=run, stage=stage, step=v["step"],
                             total_steps=done + v["step"] + (align_steps if stage == "full" else 0),
                             accuracy=v["accuracy"], n=n,
                             train_time_s=v.get("train_time_s", np.nan), **v.get("by_family", {})))
        done += align_steps + cfg.steps
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m skipit_core.zoo.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder to save_pretrained into (e.g. data/models/digits-llava)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    TrainConfig.add_arguments(ap)
    args = ap.parse_args(argv)
    command = "python -m skipit_core.zoo.train " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    train(TrainConfig.from_args(args), args.out, progress=not args.no_progress,
          log=lambda s: print(s, flush=True), command=command)


if __name__ == "__main__":
    main()
