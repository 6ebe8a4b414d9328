"""Realized vs ideal prefill speedup of skip plans on a LLaVA-1.5-shaped model (random init, CPU).

The model is a ``LlavaForConditionalGeneration`` with LLaVA-1.5's proportions scaled to a CPU: a Llama
backbone of 16 layers, hidden 1024, 16 heads, MLP 2752 (LLaVA-1.5-7B: 32 x 4096, MLP 11008, same
ratio), vocabulary 32000; 576 vision tokens (a 336 px image cut in 14 px patches, as CLIP ViT-L/14-336
gives) and 48 text tokens (6 before the image, 42 after). The CLIP tower is a 1-layer, 32-wide one so
that nearly all the time is the language model's, and it is timed with the rest: every number is a
whole ``model(**inputs)`` prefill as ``generate()`` runs it (KV cache on, logits of the last position).

Every configuration is timed in the same run, in rounds; in each round every row runs right after a
baseline prefill and the realized speedup is the median over rounds of these paired ratios, so load
drift on a shared machine hits both sides of a ratio alike. Rows:

* skipit plans: ``early_exit(k)``, ``late_entry(k)``, ``vision_freeze(band)``, ``whole_layers(band)``;
* ``mask early_exit(k)``: the common shortcut that attention-masks the vision keys away from layer k on
  instead of removing rows: it computes everything and saves nothing;
* ``nnsight whole_layers(band)``: nnsight's ``module.skip(module.input)`` on the same layers (on a
  deep copy: nnsight replaces every module's ``forward`` when it wraps a model).

Ideal speedup = analytic decoder FLOPs without / with the plan (:func:`skipit_core.bench.ideal_speedup`,
causal attention). Run: ``.venv/bin/python benchmarks/skip_speed.py [--rounds 5] [--layers 16] [--batch 1] [--only REGEX]``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
import transformers as tf

from skipit_core import bench
from skipit_core.models import Backbone
from skipit_core.skip import SkipPlan, skipping

IMAGE_ID = 32000
N_VISION, TEXT_BEFORE, TEXT_AFTER = 576, 6, 42


def build(n_layers: int) -> tf.LlavaForConditionalGeneration:
    """Random-init LLaVA-1.5 proportions at hidden 1024 (see the module docstring)."""
    config = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=336, patch_size=14),
        text_config=tf.LlamaConfig(hidden_size=1024, intermediate_size=2752, num_hidden_layers=n_layers,
                                   num_attention_heads=16, num_key_value_heads=16, vocab_size=32064,
                                   max_position_embeddings=2048),
        image_token_index=IMAGE_ID, vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_seq_length=N_VISION,
    )
    model = tf.LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def prompt(batch: int = 1) -> dict:
    """``batch`` prompts of the same length (no padding), each one image and 48 text tokens."""
    gen = torch.Generator().manual_seed(0)
    ids = []
    for _ in range(batch):
        text = torch.randint(2, 32000, (TEXT_BEFORE - 1 + TEXT_AFTER,), generator=gen)
        ids.append(torch.cat([torch.tensor([1]), text[:TEXT_BEFORE - 1], torch.full((N_VISION,), IMAGE_ID),
                              text[TEXT_BEFORE - 1:]]))
    ids = torch.stack(ids)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 3, 336, 336, generator=gen)}


@contextmanager
def masked_early_exit(model: torch.nn.Module, k: int, vision: torch.Tensor):
    """From layer k on, text queries may not attend to vision keys; every row is still computed."""
    bb = Backbone.of(model)
    n = vision.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    mask = (causal & (~vision[0][None, :] | torch.eye(n, dtype=torch.bool)))[None, None]

    def hook(module, args, kwargs):  # prefill only: the mask covers the n prompt positions
        kwargs["attention_mask"] = mask
        return args, kwargs
    handles = [bb.layers[i].register_forward_pre_hook(hook, with_kwargs=True) for i in range(k, bb.n_layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def nnsight_runner(model: torch.nn.Module, inputs: dict, band: range) -> Callable[[], None] | None:
    """A prefill skipping ``band`` with nnsight on a deep copy, or None when nnsight is not installed."""
    try:
        from nnsight import NNsight
    except ImportError:
        return None
    wrapped = NNsight(copy.deepcopy(model))

    def run() -> None:
        with torch.inference_mode(), wrapped.trace(**inputs, use_cache=True, logits_to_keep=1):
            for index in band:
                layer = wrapped.model.language_model.layers[index]
                layer.skip(layer.input)
    return run


def configurations(model, inputs, n_layers: int) -> list[tuple[str, str, SkipPlan | None, Callable]]:
    """(row name, kind, plan for the ideal count, one timed prefill)."""
    half, quarter = n_layers // 2, n_layers // 4
    band = range(quarter, 3 * quarter)
    vision = inputs["input_ids"] == IMAGE_ID
    extra = {"use_cache": True, "logits_to_keep": 1}

    def under(plan: SkipPlan) -> Callable[[], None]:
        def run() -> None:
            with skipping(model, plan), torch.inference_mode():
                model(**inputs, **extra)
        return run

    def masked(k: int) -> Callable[[], None]:
        def run() -> None:
            with masked_early_exit(model, k, vision), torch.inference_mode():
                model(**inputs, **extra)
        return run

    rows = [("baseline", "none", SkipPlan.none(), under(SkipPlan.none()))]
    for k in (3 * quarter, half, quarter):
        rows.append((f"early_exit({k})", "skipit", SkipPlan.early_exit(k), under(SkipPlan.early_exit(k))))
    for k in (quarter, half, 3 * quarter):
        rows.append((f"late_entry({k})", "skipit", SkipPlan.late_entry(k), under(SkipPlan.late_entry(k))))
    for lo, hi in ((quarter, 3 * quarter), (2, n_layers - 2)):
        plan = SkipPlan.vision_freeze(range(lo, hi))
        rows.append((f"vision_freeze({lo}-{hi - 1})", "skipit", plan, under(plan)))
    combo = SkipPlan.late_entry(quarter) | SkipPlan.early_exit(3 * quarter)
    rows.append((str(combo), "skipit", combo, under(combo)))
    rows.append((f"whole_layers({band.start}-{band.stop - 1})", "skipit", SkipPlan.whole_layers(band),
                 under(SkipPlan.whole_layers(band))))
    rows.append((f"mask early_exit({half})", "masking", SkipPlan.early_exit(half), masked(half)))
    nnsight = nnsight_runner(model, inputs, band)
    if nnsight is not None:
        rows.append((f"nnsight whole_layers({band.start}-{band.stop - 1})", "nnsight", SkipPlan.whole_layers(band),
                     nnsight))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="prompts per prefill (same length, no padding)")
    parser.add_argument("--only", default=None, help="regular expression: time only the rows it matches")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, inputs = build(args.layers), prompt(args.batch)
    rows = configurations(model, inputs, args.layers)
    if args.only:
        rows = rows[:1] + [row for row in rows[1:] if re.search(args.only, row[0])]
    for _, _, _, run in rows:  # warm-up
        run()
    wall: dict[str, list[float]] = {name: [] for name, *_ in rows}
    cpu: dict[str, list[float]] = {name: [] for name, *_ in rows}
    ratio_wall: dict[str, list[float]] = {name: [] for name, *_ in rows}
    ratio_cpu: dict[str, list[float]] = {name: [] for name, *_ in rows}
    baseline = rows[0][3]
    for r in range(args.rounds):  # paired: each row runs right after a baseline; the order rotates
        others = rows[1:]
        for name, _, _, run in others[r % len(others):] + others[:r % len(others)]:
            base_wall, base_cpu = _timed(baseline)
            plan_wall, plan_cpu = _timed(run)
            wall["baseline"].append(base_wall)
            cpu["baseline"].append(base_cpu)
            wall[name].append(plan_wall)
            cpu[name].append(plan_cpu)
            ratio_wall[name].append(base_wall / plan_wall)
            ratio_cpu[name].append(base_cpu / plan_cpu)
    machine = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
    print(f"# skip_speed.py  {datetime.date.today()}  {machine.split(':')[-1].strip()}  torch {torch.__version__}  "
          f"transformers {tf.__version__}  threads={args.threads}  OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}  "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"# LLaVA-1.5 proportions: {args.layers} layers x 1024, {N_VISION} vision + "
          f"{TEXT_BEFORE + TEXT_AFTER} text tokens, batch {args.batch}; {args.rounds} rounds, each row paired with a baseline run "
          "just before it; speedups are medians of the per-pair ratios; prefill = whole model")
    print("| configuration | kind | ideal (FLOPs) | CPU ms (median) | realized, CPU time | realized/ideal, CPU | "
          "wall ms (median, IQR) | realized, wall | realized/ideal, wall |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, kind, plan, _ in rows:
        ideal = bench.ideal_speedup(model, N_VISION, TEXT_BEFORE + TEXT_AFTER, plan, text_before=TEXT_BEFORE)
        t_wall, t_cpu = bench.Timing(name, tuple(wall[name]), "cpu"), bench.Timing(name, tuple(cpu[name]), "cpu")
        s_cpu, s_wall = (statistics.median(r[name]) if r[name] else 1.0 for r in (ratio_cpu, ratio_wall))
        print(f"| {name} | {kind} | {ideal:.2f}x | {t_cpu.median:.0f} | {s_cpu:.2f}x | {s_cpu / ideal:.2f} | "
              f"{t_wall.median:.0f} ({t_wall.iqr:.0f}) | {s_wall:.2f}x | {s_wall / ideal:.2f} |")


def _timed(run: Callable[[], None]) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    run()
    return (time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3


if __name__ == "__main__":
    main()
