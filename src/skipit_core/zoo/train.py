"""Train a zoo model on DigitScenes from scratch, on a CPU.

    python -m skipit_core.zoo.train --arch llava --out data/models/digits-llava
    python -m skipit_core.zoo.train --arch qwen2vl --out data/models/digits-qwen2vl

Two stages. (1) Vision pretraining: the vision tower learns, per vision token, the digit in its grid
cell, in the cells left of and above it, and the cell's row and column (the stand-in for a pretrained
CLIP). (2) Question answering: fresh scenes every step from the *train* digit pool, one question per
sequence in the shipped chat template, exactly the prompt :func:`skipit_core.tasks.evaluate` scores; the
loss is the cross-entropy of the answer token (the next-token logits after ``ASSISTANT:``). With
``--turns N`` a sequence is instead an N-turn conversation about one image (turn 1 = the evaluation
prompt, then follow-up questions, every answer in the loss); in a trial with image-first prompts this
learned more slowly per CPU minute than single questions, and the shipped models use one turn.
AdamW, linear warm-up then cosine decay to 10% of the peak learning rate, gradient-norm clipping;
validation accuracy (validation digit pool) is logged every ``--eval-every`` steps. Seeded: the same
command on the same machine gives the same model. The folder gets ``save_pretrained`` output
(safetensors) plus ``training.json`` (arguments, sizes, wall time, the validation log). Write the
model card afterwards with ``python -m skipit_core.zoo.card``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError
from ..utils import set_seed
from ..tasks import DigitScenes
from .build import ARCHS, SIZES, ModelSize, build, save_processor

__all__ = ["train", "main"]


def _lr_lambda(warmup: int, total: int, floor: float = 0.1):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def cell_labels(data) -> "Any":
    """``LongTensor[B, 5, 16]``: per grid cell (row-major) the digit in it, in the cell left of it and in
    the cell above it (10 where that cell is empty or off the grid), then the cell's row and column."""
    import torch

    own = torch.full((len(data), 16), 10, dtype=torch.long)
    for i, m in enumerate(data.meta):
        own[i, m["cells"]] = torch.tensor(m["digits"])
    padded = torch.full((len(data), 5, 5), 10, dtype=torch.long)
    padded[:, 1:, 1:] = own.view(-1, 4, 4)
    left = padded[:, 1:, :-1].reshape(-1, 16)
    above = padded[:, :-1, 1:].reshape(-1, 16)
    row = torch.arange(16).div(4, rounding_mode="floor").expand(len(data), 16)
    col = torch.arange(16).remainder(4).expand(len(data), 16)
    return torch.stack([own, left, above, row, col], dim=1)


#: classes of the per-token targets of :func:`cell_labels`: own / left / above digit (10 = empty), row, column
TARGET_CLASSES = (11, 11, 11, 4, 4)


def vision_features(model, arch: str, inputs) -> "Any":
    """Per-cell-aligned vision features ``[B, tokens, d]`` and the cell of each token.

    LLaVA: the CLIP tower's last hidden state without CLS (what the projector reads), 8x8 patches,
    patch ``(r, c)`` lies in cell ``(r // 2, c // 2)``. Qwen2-VL: the merged tokens (one per cell).
    """
    import torch

    if arch == "llava":
        out = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        feats = out.hidden_states[-1][:, 1:]
        r, c = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
        cells = ((r // 2) * 4 + c // 2).reshape(-1)
        return feats, cells
    visual = model.model.visual
    feats = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    feats = getattr(feats, "pooler_output", feats)
    feats = feats.reshape(len(inputs["image_grid_thw"]), -1, feats.shape[-1])
    return feats, torch.arange(16)


def vision_loss(head, feats, labels) -> tuple["Any", "Any"]:
    """Summed cross-entropy of the per-token targets and the accuracy of the *own digit* on occupied cells.

    ``feats [B, T, d]``, ``labels [B, T, 5]`` (:func:`cell_labels` gathered per token)."""
    import torch

    logits = head(feats).split(TARGET_CLASSES, dim=-1)
    loss = sum(torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels[..., j].reshape(-1))
               for j, lg in enumerate(logits))
    occupied = labels[..., 0] < 10
    correct = (logits[0].argmax(-1) == labels[..., 0])[occupied].float().mean()
    return loss, correct


def pretrain_vision(model, processor, arch, gen, steps, *, batch_size=128, lr=3e-3, seed=0, clip=1.0,
                    progress=True, log=print) -> dict:
    """Stage 1: train the vision tower (and a throw-away linear head) to name, for the cell each vision
    token lies in, its digit, the digits in the cells left of and above it (11-way each: digit or
    empty/off-grid) and the cell's row and column, on fresh train-pool scenes.

    The analogue of starting LLaVA from a pretrained CLIP. The head is discarded; only the tower's
    weights carry over to stage 2 (where the answer-token loss alone trains everything). Logged metric:
    accuracy of the own-cell digit over the tokens of occupied cells.
    """
    import torch

    tower = model.model.vision_tower if arch == "llava" else model.model.visual
    feats_dim = model.config.vision_config.hidden_size
    head = torch.nn.Linear(feats_dim, sum(TARGET_CLASSES))
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(50, steps), steps))
    rng = np.random.default_rng(seed + 7)
    losses, accs = [], []
    bar = range(steps)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=f"vision pretrain {arch}", unit="step", mininterval=10, file=sys.stderr)
    tower.train()
    t0 = time.perf_counter()
    for step in bar:
        data = gen.sample(batch_size, rng)
        pix = processor.image_processor([data.image(i) for i in range(len(data))], return_tensors="pt")
        feats, cells = vision_features(model, arch, pix)
        loss, acc = vision_loss(head, feats, cell_labels(data)[:, :, cells].transpose(1, 2))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        accs.append(acc.item())
        if progress:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", digit_acc=f"{np.mean(accs[-20:]):.3f}", refresh=False)
    log(f"vision pretrain: {steps} steps, last-50 occupied-cell digit accuracy {np.mean(accs[-50:]):.3f}, "
        f"loss {np.mean(losses[-50:]):.3f}")
    return dict(steps=steps, batch_size=batch_size, lr=lr, targets="own, left, above digit; row; column",
                wall_time_s=round(time.perf_counter() - t0, 1),
                final_digit_accuracy=round(float(np.mean(accs[-50:])), 4),
                final_loss=round(float(np.mean(losses[-50:])), 4))


def conversations(processor, data, turns: int, rng: np.random.Generator,
                  family_weights: Sequence[float] | None = None) -> tuple[dict, "Any"]:
    """Processor inputs of one ``turns``-turn conversation per item of ``data`` and the answer token ids.

    Turn 1 is the item itself (its answer drawn balanced); turns 2.. ask follow-up questions about the
    same scene (:meth:`DigitScenes.ask`, families drawn with ``family_weights``). The text is the chat
    template's, so turn 1 reads exactly like an evaluation prompt. Targets are in reading order.
    """
    import torch

    from ..tasks import QUESTION_FAMILIES, encode

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


def answer_positions(tokenizer, input_ids) -> "Any":
    """Boolean mask of the positions whose next token is an answer: the ``:`` after ``assistant``."""
    assistant, colon = tokenizer.convert_tokens_to_ids(["assistant", ":"])
    hit = (input_ids == colon)
    hit[:, 1:] &= input_ids[:, :-1] == assistant
    hit[:, 0] = False
    hit[:, -1] = False
    return hit


def train(arch: str = "llava", out: str | Path | None = None, *, steps: int = 1200, batch_size: int = 64,
          lr: float = 2e-3, warmup: int = 100, weight_decay: float = 0.01, clip: float = 1.0, seed: int = 0,
          eval_every: int = 200, val_per_family: int = 30, threads: int | None = None,
          size: ModelSize | None = None, progress: bool = True, log=print, command: str | None = None,
          vision_steps: int = 0, vision_batch_size: int = 128, vision_lr: float = 3e-3,
          vision_lr_mult: float = 0.1, init_from: str | Path | None = None,
          family_weights: Sequence[float] | None = None, turns: int = 1):
    """Train and (if ``out``) save; returns ``(model, processor, history)``.

    ``history`` is a dict with the per-step ``loss`` list and the ``validation`` log
    (step, overall and per-family accuracy).
    """
    import torch

    from ..tasks import evaluate

    if arch not in ARCHS:
        raise InputError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}.")
    if steps < 1 or batch_size < 1 or turns < 1:
        raise InputError("steps, batch_size and turns must be positive.")
    if threads:
        torch.set_num_threads(int(threads))
    set_seed(seed)
    size = size or SIZES[arch]
    model, processor = build(arch, size, seed=seed)
    previous = None
    if init_from is not None:
        from transformers import AutoModelForImageTextToText

        from .build import load_processor

        init_from = Path(init_from)
        model = AutoModelForImageTextToText.from_pretrained(init_from, dtype=torch.float32)
        processor = load_processor(init_from)
        if (init_from / "training.json").exists():
            previous = json.loads((init_from / "training.json").read_text())
            size = ModelSize(**previous["size"])
        vision_steps = 0
    tok = processor.tokenizer
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    tower = model.model.vision_tower if arch == "llava" else model.model.visual
    in_tower = {id(p) for p in tower.parameters()}
    groups = []
    for is_tower in (False, True):
        for decays in (True, False):
            ps = [p for p in params if (id(p) in in_tower) == is_tower and (p.dim() >= 2) == decays]
            groups.append({"params": ps, "weight_decay": weight_decay if decays else 0.0,
                           "lr": lr * (vision_lr_mult if is_tower else 1.0)})
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(warmup, steps), steps))
    train_gen = DigitScenes("train")
    val = DigitScenes("validation").generate(val_per_family, seed=seed + 1) if val_per_family else None
    rng = np.random.default_rng(seed)
    history: dict = {"loss": [], "validation": [], "vision_pretrain": {}}
    t0 = time.perf_counter()  # wall time covers both stages
    if vision_steps:
        history["vision_pretrain"] = pretrain_vision(model, processor, arch, train_gen, vision_steps,
                                                     batch_size=vision_batch_size, lr=vision_lr, seed=seed,
                                                     clip=clip, progress=progress, log=log)

    def validate(step: int) -> None:
        if val is None:
            return
        r = evaluate(model, processor, val, batch_size=128)
        fam = {row["family"]: round(row["accuracy"], 4) for row in r.by_family.to_dict(orient="records")}
        history["validation"].append(dict(step=step, accuracy=round(r.accuracy, 4), by_family=fam))
        log(f"step {step}: validation accuracy {r.accuracy:.3f} (n={r.n}) " +
            " ".join(f"{k}={v:.2f}" for k, v in fam.items()))
        model.train()

    bar = range(steps)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=f"train {arch}", unit="step", mininterval=10, file=sys.stderr)
    for step in bar:
        data = train_gen.sample(batch_size, rng, family_weights)
        inputs, targets = conversations(processor, data, turns, rng, family_weights)
        logits = model(**inputs).logits
        positions = answer_positions(tok, inputs["input_ids"])
        loss = torch.nn.functional.cross_entropy(logits[positions].float(), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        history["loss"].append(loss.item())
        if progress:
            bar.set_postfix(loss=f"{np.mean(history['loss'][-20:]):.3f}", refresh=False)
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            validate(step + 1)
    validate(steps)
    wall = time.perf_counter() - t0
    model.eval()
    history["wall_time_s"] = round(wall, 1)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        save_processor(processor, out)
        meta = dict(
            arch=arch, command=command, seed=seed, steps=steps, batch_size=batch_size, turns=turns, lr=lr, warmup=warmup,
            init_from=str(init_from) if init_from else None, previous=previous,
            family_weights=None if family_weights is None else dict(zip(train_gen.families, family_weights)),
            weight_decay=weight_decay, clip=clip, vision_lr_mult=vision_lr_mult, vision_pretrain=history["vision_pretrain"], schedule="linear warm-up, cosine decay to 10%",
            optimizer="AdamW(betas=(0.9, 0.98))", size=size.to_dict(),
            parameters=int(sum(p.numel() for p in model.parameters())),
            wall_time_s=round(wall, 1), threads=torch.get_num_threads(), machine=platform.machine(),
            processor=platform.processor() or None, torch=torch.__version__,
            transformers=__import__("transformers").__version__,
            final_loss=float(np.mean(history["loss"][-50:])), validation=history["validation"],
            loss_every_50=[round(float(np.mean(history["loss"][i:i + 50])), 4)
                           for i in range(0, len(history["loss"]), 50)],
        )
        (out / "training.json").write_text(json.dumps(meta, indent=1) + "\n")
        log(f"saved {out} ({wall / 60:.1f} min)")
    return model, processor, history


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m skipit_core.zoo.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=ARCHS, default="llava")
    ap.add_argument("--out", required=True, help="folder to save_pretrained into (e.g. data/models/digits-llava)")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--val-per-family", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vision-steps", type=int, default=300, help="stage-1 vision pretraining steps (0: none)")
    ap.add_argument("--vision-batch-size", type=int, default=128)
    ap.add_argument("--vision-lr", type=float, default=3e-3)
    ap.add_argument("--vision-lr-mult", type=float, default=0.1, help="stage-2 lr of the vision tower / --lr")
    for name, value in ModelSize().to_dict().items():
        if isinstance(value, int):
            ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    ap.add_argument("--init-from", default=None, help="continue training a saved model (no vision pretraining)")
    ap.add_argument("--family-weights", default=None,
                    help="comma-separated sampling weights of the families cell,count,present,largest,smallest,left,above")
    ap.add_argument("--turns", type=int, default=1,
                    help="questions per training conversation about one image (1: single-question prompts)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    base = SIZES[args.arch].to_dict()
    for name in list(base):
        v = getattr(args, name, None)
        if v is not None:
            base[name] = v
    command = "python -m skipit_core.zoo.train " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    train(args.arch, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
          weight_decay=args.weight_decay, clip=args.clip, seed=args.seed, eval_every=args.eval_every,
          val_per_family=args.val_per_family, threads=args.threads, size=ModelSize(**base),
          progress=not args.no_progress, log=lambda s: print(s, flush=True), command=command,
          vision_steps=args.vision_steps, vision_batch_size=args.vision_batch_size, vision_lr=args.vision_lr,
          vision_lr_mult=args.vision_lr_mult, init_from=args.init_from,
          family_weights=None if args.family_weights is None else [float(x) for x in args.family_weights.split(",")],
          turns=args.turns)


if __name__ == "__main__":
    main()
