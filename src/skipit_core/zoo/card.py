"""Write a zoo model's card from a fresh evaluation, so the card and ``evaluate`` cannot disagree.

    python -m skipit_core.zoo.card data/models/digits-llava

Loads the folder with ``AutoProcessor`` / ``AutoModelForImageTextToText``, evaluates it on the frozen
DigitScenes test split (and on blank images) and profiles it once (per-layer vision-token cosine distance
and VAR, :func:`redundancy`), writes ``eval.json`` (every number) and ``README.md``
(generated from ``eval.json`` and ``training.json``). The tests re-run :func:`evaluation` and compare
with ``eval.json`` exactly. ``--readme-only`` rewrites ``README.md`` from the stored ``eval.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Sequence

import torch

from ..capture import profile
from ..tasks import DigitScenes, batches, build_prompts, encode, evaluate
from . import load_tiny_vlm
from .build import prompt_layout
from .train import TrainConfig, training_records

__all__ = ["EVAL_BATCH_SIZE", "evaluation", "redundancy", "write_card", "portable", "main"]

EVAL_BATCH_SIZE = 64


def evaluation(path: str | Path, batch_size: int = EVAL_BATCH_SIZE) -> dict:
    """Fresh test-split evaluation of the model in ``path`` (with blank baseline), as a dict."""
    model, processor = load_tiny_vlm(path=path)
    data = DigitScenes.test_set()
    t0 = time.perf_counter()
    with torch.no_grad():
        result = evaluate(model, processor, data, batch_size=batch_size, with_blank=True)
    d = result.to_dict()
    d["predictions"] = list(result.predictions)
    d["blank"]["predictions"] = list(result.blank.predictions)
    d.update(batch_size=batch_size, data="data/digitscenes/test (frozen)",
             eval_time_s=round(time.perf_counter() - t0, 1),
             parameters=int(sum(p.numel() for p in model.parameters())),
             model_class=type(model).__name__, processor_class=type(processor).__name__,
             vision_tokens=int((encode_one(processor, data) == model.config.image_token_id).sum()),
             prompt=build_prompts(processor, ["{question}"])[0])
    return d


def redundancy(path: str | Path, batch_size: int = EVAL_BATCH_SIZE) -> dict:
    """Per layer, from one :func:`skipit_core.capture.profile` of the frozen test split: the mean cosine
    distance between each vision token's input and output (``mean_cos_dist_vision``) and the vision
    attention ratio (``var``: attention mass on the vision keys, over the text queries that may attend one;
    ``var_ratio``: that mass over its uniform share). Reported next to the accuracy, never tuned for."""
    model, processor = load_tiny_vlm(path=path)
    prof = profile(model, batches(processor, DigitScenes.test_set(), batch_size))
    rounded = lambda a: [round(float(x), 6) for x in a]  # noqa: E731
    return dict(data="data/digitscenes/test (frozen)", batch_size=batch_size,
                mean_cos_dist_vision=rounded(prof.mean_cos_dist("vision")), var=rounded(prof.vision_attention()),
                var_ratio=rounded(prof.vision_attention("ratio")))


def _redundancy_section(ev: dict) -> str:
    r = ev.get("profile")
    if not r:
        return ""
    rows = "\n".join(f"| {layer} | {d:.4f} | {v:.3f} | {q:.2f} |" for layer, (d, v, q) in
                     enumerate(zip(r["mean_cos_dist_vision"], r["var"], r["var_ratio"])))
    return f"""
## Redundancy profile (frozen test split)

One `skipit_core.profile` of the test split (batch size {r['batch_size']}), per decoder layer: the mean
cosine distance between a vision token's input and output, and VAR, the attention mass of the text
queries that may attend a vision key on the vision keys (ratio: over its uniform share). Recorded, not
tuned for: the book reports whatever these show.

| layer | mean cos dist (vision) | VAR | VAR ratio |
|---|---|---|---|
{rows}
"""


def encode_one(processor, data):
    return encode(processor, data, 0, 1)["input_ids"]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


LAYOUT_TEXT = {
    "image-first": "The image comes before the question, as in LLaVA-1.5 and Qwen2-VL, so every question "
                   "token can read the vision tokens.",
    "question-first": "The question comes before the image: only the tokens after the image (`ASSISTANT:`) "
                      "can read the vision tokens, unlike LLaVA-1.5 and Qwen2-VL, which put the image first.",
}


def _recipe(chain: list[dict], targets: str, pilot: dict | None = None) -> str:
    """The stages of every run of ``chain`` (oldest first) as a markdown list, then what the stage-2
    ``pilot`` (:mod:`skipit_core.zoo.pilot`'s JSON) measured, if there is one."""
    lines = []
    for i, record in enumerate(chain):
        cfg = TrainConfig.from_dict(record)
        run = f"run {i + 1}, " if len(chain) > 1 else ""
        legacy = cfg.arch == "qwen2vl" and "align_steps" not in record  # written before the 3-stage recipe
        vision = "the vision tower (its merger included)" if legacy else "the vision encoder"
        if (record.get("vision_pretrain") or {}).get("steps"):
            lines.append(f"- {run}stage 1, pretraining {vision}: {cfg.vision_steps} steps of batch "
                         f"{cfg.vision_batch_size} at peak lr {cfg.vision_lr}; per vision token, for the grid cell it "
                         f"lies in: {targets} (the stand-in for a pretrained CLIP; that head is discarded).")
        if (record.get("align") or {}).get("steps"):
            after = [v for v in record.get("validation", []) if v.get("stage") == "align"]
            lines.append(f"- {run}stage 2, alignment: {cfg.align_steps} steps of batch {cfg.batch_size} at peak lr "
                         f"{cfg.align_lr}; only the projector trains, the vision encoder and the language model are "
                         "frozen." + "".join(f" Validation accuracy afterwards {_pct(v['accuracy'])} after "
                                             f"{v['train_time_s'] / 60:.1f} min of training." for v in after))
        turns = f" ({cfg.turns}-turn conversations)" if cfg.turns > 1 else ""
        lines.append(f"- {run}stage 3, full fine-tuning: {cfg.steps} steps of batch {cfg.batch_size}{turns} at peak "
                     f"lr {cfg.lr}, {vision} at {cfg.vision_lr_scale} x that; loss = cross-entropy of the answer "
                     "tokens only.")
    if not lines:
        return "(training.json missing)"
    return "\n".join(lines) + "\n\n" + _pilot_text(chain, pilot)


def _pilot_text(chain: list[dict], pilot: dict | None) -> str:
    """Whether stage 2 was used, and the side-by-side pilot that measured it (or that none was made)."""
    used = any((r.get("align") or {}).get("steps") for r in chain)
    head = "Stage 2 (alignment) is " + ("part of this model's recipe" if used else "not part of this model's recipe")
    if pilot is None:
        return head + ("; it is LLaVA's recipe, not a measured gain here: no run without it at the same budget has "
                       "been made." if used else "; no pilot measured it for this model.")
    s, cfg = pilot["summary"], pilot["config"]
    runs = pilot["runs"]
    fmt = lambda r: f"{_pct(r['accuracy'])} [{_pct(r['ci_low'])}, {_pct(r['ci_high'])}]"  # noqa: E731
    arch = chain[-1].get("arch") if chain else None
    where = "" if cfg["arch"] == arch else f", run on the sibling architecture {cfg['arch']}, not on {arch} itself"
    return (f"{head}. Measured in a side-by-side pilot (`stage2_pilot.json`{where}; `{pilot.get('command')}`): one "
            f"stage-1 encoder, then {runs['with']['align_steps']} projector-only + {runs['with']['steps']} full steps "
            f"against {runs['without']['steps']} full steps ({cfg['arch']}, batch {cfg['batch_size']}, "
            f"{cfg['turns']}-turn conversations). Validation accuracy (n = {s['n']}, Wilson 95%): "
            f"{fmt(s['with'])} with stage 2 after {s['with']['train_minutes']:.1f} min of training, {fmt(s['without'])} "
            f"without it after {s['without']['train_minutes']:.1f} min; difference {100 * s['difference']:+.1f} "
            "points.")


def portable(command: str, name: str) -> str:
    """``command`` with every ``--out`` / ``--init-from`` folder written as ``data/models/<name>`` (runs of a
    chain continue one another in that folder; scratch folders of the machine that trained it are not shown)."""
    return re.sub(r"--(out|init-from)[ =]\S+", lambda m: f"--{m.group(1)} data/models/{name}", command)


def write_card(path: str | Path, batch_size: int = EVAL_BATCH_SIZE, *, evaluate: bool = True) -> Path:
    """Evaluate, then write ``eval.json`` and ``README.md`` into ``path``; ``evaluate=False`` writes the
    README from the stored ``eval.json`` (same numbers, no re-evaluation)."""
    path = Path(path)
    if evaluate:
        ev = evaluation(path, batch_size)
        ev["profile"] = redundancy(path, batch_size)
        (path / "eval.json").write_text(json.dumps(ev, indent=1) + "\n")
    else:
        ev = json.loads((path / "eval.json").read_text())
    tr_file = path / "training.json"
    tr = json.loads(tr_file.read_text()) if tr_file.exists() else {}
    cfg = json.loads((path / "config.json").read_text())
    text_cfg, vis_cfg = cfg.get("text_config", {}), cfg.get("vision_config", {})
    blank = ev["blank"]
    bfam = {r["family"]: r for r in blank["by_family"]}
    rows = "\n".join(
        f"| {r['family']} | {r['n']} | {_pct(r['accuracy'])} [{_pct(r['ci_low'])}, {_pct(r['ci_high'])}] | "
        f"{_pct(bfam[r['family']]['accuracy'])} | {_pct(r['chance'])} |"
        for r in ev["by_family"])
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    name = path.name
    chain = training_records(path)
    vp = (chain[0].get("vision_pretrain") if chain else None) or {}
    commands = "\n".join(portable(str(c.get("command")), name) for c in chain) or "(training.json missing)"
    total_wall = sum(c.get("wall_time_s", 0.0) for c in chain)
    chain_note = (f"Each run after the first continues the one before it (`--init-from data/models/{name}`); run "
                  "the commands in order. " if len(chain) > 1 else "")
    weights_note = ("Runs with `--family-weights` sample the families cell, count, present, largest, smallest, "
                    "left, above with those weights (evaluation stays balanced). The over-sampled families need "
                    "the question and the image *combined* (a position or a digit named in the question, looked "
                    "up in the image); neither alone says anything about the answer, and under uniform sampling "
                    "they lag far behind the set-level families (count, largest, smallest)."
                    if any(c.get("family_weights") for c in chain) else "")
    targets = vp.get("targets", "own, left, above digit")
    threads = {c.get("threads") for c in chain}
    threads_text = f"{threads.pop()} CPU thread(s)" if len(threads) == 1 else "CPU threads " + "/".join(map(str, threads))
    pilot_file = path / "stage2_pilot.json"
    recipe = _recipe(chain, targets, json.loads(pilot_file.read_text()) if pilot_file.exists() else None)
    layout = prompt_layout(ev["prompt"])
    layout_text = (LAYOUT_TEXT[layout] if layout in LAYOUT_TEXT else layout)
    card = f"""# {name}

A small vision-language model trained from scratch (on a CPU) to answer DigitScenes questions
(`skipit_core.tasks.DigitScenes`), shipped so the skipit book has a real model to measure and skip.
Load it like any Hugging Face checkpoint:

```python
from transformers import AutoModelForImageTextToText, AutoProcessor
processor = AutoProcessor.from_pretrained("data/models/{name}")
model = AutoModelForImageTextToText.from_pretrained("data/models/{name}")
# or: model, processor = skipit_core.load_tiny_vlm("{name}")
```

## Architecture

- class: `{ev['model_class']}`, processor `{ev['processor_class']}`; {ev['parameters']:,} parameters,
  float32 safetensors ({size / 2**20:.1f} MiB).
- LLM backbone: {text_cfg.get('model_type')} with {text_cfg.get('num_hidden_layers')} decoder layers, hidden size
  {text_cfg.get('hidden_size')}, {text_cfg.get('num_attention_heads')} heads, MLP {text_cfg.get('intermediate_size')}.
- vision tower: {vis_cfg.get('model_type')}, {vis_cfg.get('num_hidden_layers', vis_cfg.get('depth'))} layers,
  64x64 input, patch {vis_cfg.get('patch_size')}; **{ev['vision_tokens']} vision tokens** per image.
- tokenizer: word-level `PreTrainedTokenizerFast` ({text_cfg.get('vocab_size')} tokens); prompt
  `{ev['prompt'].replace(chr(10), chr(92) + 'n')}` (the chat template saved with the processor,
  `chat_template.jinja`; the image token expands to {ev['vision_tokens']} vision tokens); the answer is
  the next token.
- prompt layout: **{layout}**. {layout_text}

## Data

DigitScenes: 64x64 scenes of 2-6 real handwritten digits (scikit-learn's `load_digits`, distinct
classes, one per cell of a 4x4 grid, light noise); seven single-token question families (cell, count,
present, largest, smallest, left, above). Training scenes are drawn fresh every step from the *train*
pool of source images; validation and test use disjoint pools (split by source image).

## Training

```
{commands}
```

{recipe}

Seed {chain[0].get('seed') if chain else None}; AdamW, {chain[0].get('schedule') if chain else ''} (per stage), gradient
clipping {chain[0].get('clip') if chain else ''}. Total wall time
{total_wall / 60:.1f} min (every stage included) on {threads_text} of a 2-core machine, torch {tr.get('torch')},
transformers {tr.get('transformers')}. Full logs (validation accuracy during training) are in `training.json`.
{chain_note}{weights_note}

## Evaluation (frozen test split, n = {ev['n']})

Written by `python -m skipit_core.zoo.card data/models/{name}` from a fresh `evaluate(...)`
(batch size {ev['batch_size']}, full-vocabulary argmax of the next token, CPU float32); every number is in
`eval.json`. Intervals are Wilson 95%. "blank" = the same questions on blank images (what the model
gets without looking); "chance" = uniform over the family's answers (answers are balanced).

**Test accuracy: {_pct(ev['accuracy'])} [{_pct(ev['ci_low'])}, {_pct(ev['ci_high'])}]**; blank-image
baseline {_pct(blank['accuracy'])} [{_pct(blank['ci_low'])}, {_pct(blank['ci_high'])}].

| family | n | accuracy [95% CI] | blank | chance |
|---|---|---|---|---|
{rows}
{_redundancy_section(ev)}
## Limits

A toy: a closed vocabulary of {text_cfg.get('vocab_size')} words, only these question templates, 64x64 grey
scenes. It exists to be measured (layer redundancy, skipping), not to be used as a VQA model.
"""
    (path / "README.md").write_text(card)
    return path / "README.md"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m skipit_core.zoo.card", description=__doc__.split("\n\n")[0])
    ap.add_argument("path")
    ap.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE)
    ap.add_argument("--readme-only", action="store_true",
                    help="rewrite README.md from the stored eval.json (no re-evaluation)")
    args = ap.parse_args(argv)
    out = write_card(args.path, args.batch_size, evaluate=not args.readme_only)
    ev = json.loads((Path(args.path) / "eval.json").read_text())
    print(f"wrote {out}: test accuracy {ev['accuracy']:.4f} (n={ev['n']}), blank {ev['blank']['accuracy']:.4f}")


if __name__ == "__main__":
    main()
