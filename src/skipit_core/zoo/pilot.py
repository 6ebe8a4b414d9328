"""Does stage 2 (alignment) pay for itself? Two short runs from one stage-1 encoder, side by side.

    python -m skipit_core.zoo.pilot --arch qwen2vl --align-steps 150 --steps 300 --eval-every 150 \\
        --out data/models/digits-qwen2vl/stage2_pilot.json

LLaVA trains its projector alone before fine-tuning everything; whether that helps a model trained from
scratch on DigitScenes is a question to measure, not to assume. The pilot builds one model, pretrains its
vision encoder once (stage 1), copies it, and continues the two copies with the same flags and the same
training budget in steps:

- **with stage 2**: ``align_steps`` projector-only steps, then ``steps`` full fine-tuning steps;
- **without**: ``align_steps + steps`` full fine-tuning steps.

Both log validation accuracy (``val_per_family`` per family, the same questions) against the training time
spent (stage 1 included, validation excluded), so they compare as *accuracy per CPU minute*. The JSON it
writes is read by the model card (:mod:`skipit_core.zoo.card`).
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import InputError
from ..stats import wilson_interval
from ..tasks import DigitScenes
from ..utils import set_seed
from .build import build
from .train import TrainConfig, _threads, pretrain_vision, run_stages, validation_set

__all__ = ["alignment_pilot", "pilot_summary", "main"]


def alignment_pilot(cfg: TrainConfig, *, progress: bool = False, log: Callable[[str], None] = print,
                    command: str | None = None) -> dict:
    """Run the pilot of ``cfg`` (its ``align_steps`` > 0) and return the record written as JSON:
    ``config``, ``stage1`` (the shared stage-1 log), ``runs`` (``with`` / ``without``: stage-2 and stage-3
    steps, ``validation`` log, ``wall_time_s``, the stage-3 ``loss`` per step) and ``summary`` (:func:`pilot_summary`)."""
    if cfg.align_steps < 1 or not cfg.val_per_family:
        raise InputError("the pilot compares runs with and without stage 2: give --align-steps >= 1 and "
                         "--val-per-family >= 1.")
    if cfg.init_from is not None:
        raise InputError("the pilot trains a new model from scratch; drop --init-from.")
    with _threads(cfg.threads):
        cfg = replace(cfg, threads=torch.get_num_threads())
        set_seed(cfg.seed)
        model, processor = build(cfg.arch, cfg.size, seed=cfg.seed, layout=cfg.layout)
        val = validation_set(cfg)
        t0 = time.perf_counter()
        stage1 = pretrain_vision(model, processor, cfg, DigitScenes("train"), progress=progress, log=log) if cfg.vision_steps else {}
        spent = time.perf_counter() - t0
        runs = {}
        for name, align_steps, steps in (("with", cfg.align_steps, cfg.steps), ("without", 0, cfg.align_steps + cfg.steps)):
            log(f"pilot, {name} stage 2: {align_steps} alignment + {steps} full steps")
            run_cfg = replace(cfg, vision_steps=0, align_steps=align_steps, steps=steps)
            history = run_stages(copy.deepcopy(model), processor, run_cfg, val, progress=progress, log=log,
                                 spent_s=spent)
            runs[name] = dict(align_steps=align_steps, steps=steps, validation=history["validation"],
                              wall_time_s=history["wall_time_s"], loss=[round(x, 6) for x in history["loss"]])
    record = dict(command=command, config=cfg.to_dict(), n_validation=len(val), stage1=stage1, runs=runs)
    record["summary"] = pilot_summary(record)
    return record


def pilot_summary(record: dict, confidence: float = 0.95) -> dict:
    """Final validation accuracy of each run with its Wilson interval, its training time in minutes and
    accuracy gained per minute, and ``difference`` = with - without (both runs take the same number of
    optimiser steps; their times differ by what a projector-only step saves)."""
    n = int(record["n_validation"])
    out: dict = {"n": n}
    for name, run in record["runs"].items():
        last = run["validation"][-1]
        k = round(last["accuracy"] * n)
        low, high = wilson_interval(k, n, confidence)
        minutes = last["train_time_s"] / 60
        out[name] = dict(accuracy=last["accuracy"], ci_low=float(low), ci_high=float(high),
                         train_minutes=round(minutes, 2), accuracy_per_minute=round(last["accuracy"] / minutes, 4) if minutes > 0 else float("nan"))
    out["difference"] = round(out["with"]["accuracy"] - out["without"]["accuracy"], 4)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m skipit_core.zoo.pilot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write (e.g. data/models/digits-qwen2vl/stage2_pilot.json)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    TrainConfig.add_arguments(ap)
    args = ap.parse_args(argv)
    command = "python -m skipit_core.zoo.pilot " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    record = alignment_pilot(TrainConfig.from_args(args), progress=not args.no_progress,
                             log=lambda s: print(s, flush=True), command=command)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    s = record["summary"]
    for name in ("with", "without"):
        r = s[name]
        print(f"{name:>7} stage 2: validation accuracy {r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] "
              f"(n={s['n']}) after {r['train_minutes']:.1f} min of training")
    print(f"difference (with - without): {s['difference']:+.3f}")


if __name__ == "__main__":
    main()
