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
  deep copy: nnsight replaces every module's ``forward`` when it wraps a model);
* ``by hand early_exit(k)`` / ``by hand late_entry(k)`` (batch 1 only): the deepest cuts written out as
  a plain loop over the decoder layers on pre-sliced tensors, the least work the plan can do on this
  hardware; checked at start-up to give skipit's result. Their time is decoder time only.

Ideal speedup = analytic decoder FLOPs without / with the plan (:func:`skipit_core.bench.ideal_speedup`,
causal attention). It counts the decoder (the language model without ``lm_head``) only, so the table gives
two realized speedups: of the whole prefill (what a user waits for; the vision tower, projector and
``lm_head`` run unchanged under every plan) and of the decoder alone (the same scope as the ideal, timed
between hooks on the language model; skipit's own bookkeeping falls inside it).

Run: ``.venv/bin/python benchmarks/skip_speed.py [--rounds 5] [--layers 16] [--batch 1] [--only REGEX]``;
``--layer-rows [--threads T]`` instead times one decoder layer alone on 48-624 rows against its FLOP share.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import transformers as tf

from skipit_core import bench
from skipit_core.models import Backbone
from skipit_core.skip import SkipPlan, skipping

IMAGE_ID = 32000
N_VISION, TEXT_BEFORE, TEXT_AFTER = 576, 6, 42


def llava_config(n_layers: int, hidden: int = 1024, intermediate: int = 2752, heads: int = 16,
                 vision: tf.CLIPVisionConfig | None = None) -> tf.LlavaConfig:
    """LLaVA-1.5's layout (Llama backbone, vocabulary 32064, one image token per patch: 576 at 336 px) at
    the given sizes; the default vision tower is the 1-layer, 32-wide one of the module docstring."""
    vision = vision or tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=336, patch_size=14)
    return tf.LlavaConfig(
        vision_config=vision,
        text_config=tf.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=n_layers,
                                   num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32064,
                                   max_position_embeddings=2048),
        image_token_index=IMAGE_ID, vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
    )


def build(n_layers: int, config: tf.LlavaConfig | None = None, device: str | torch.device = "cpu",
          dtype: torch.dtype = torch.float32) -> tf.LlavaForConditionalGeneration:
    """Random-init LLaVA-1.5 proportions at hidden 1024 (see the module docstring), or ``config``; the
    weights are created on ``device`` in ``dtype`` (a 7B model is initialised on the GPU, not copied there)."""
    config = config or llava_config(n_layers)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = tf.LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(before)
    model.set_attn_implementation("sdpa")
    return model


def prompt(batch: int = 1, image_size: int = 336, patch_size: int = 14) -> dict:
    """``batch`` prompts of the same length (no padding), each one image (``(image_size / patch_size)^2``
    image tokens, 576 by default) and 48 text tokens."""
    n_vision = (image_size // patch_size) ** 2
    gen = torch.Generator().manual_seed(0)
    ids = []
    for _ in range(batch):
        text = torch.randint(2, 32000, (TEXT_BEFORE - 1 + TEXT_AFTER,), generator=gen)
        ids.append(torch.cat([torch.tensor([1]), text[:TEXT_BEFORE - 1], torch.full((n_vision,), IMAGE_ID),
                              text[TEXT_BEFORE - 1:]]))
    ids = torch.stack(ids)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 3, image_size, image_size, generator=gen)}


@contextmanager
def masked_early_exit(model: torch.nn.Module, k: int, vision: torch.Tensor):
    """From layer k on, text queries may not attend to vision keys; every row is still computed."""
    bb = Backbone.of(model)
    n = vision.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=vision.device).tril()
    mask = (causal & (~vision[0][None, :] | torch.eye(n, dtype=torch.bool, device=vision.device)))[None, None]

    def hook(module, args, kwargs):  # prefill only: the mask covers the n prompt positions
        kwargs["attention_mask"] = mask
        return args, kwargs
    handles = [bb.layers[i].register_forward_pre_hook(hook, with_kwargs=True) for i in range(k, bb.n_layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def nnsight_runner(model: torch.nn.Module, inputs: dict, band: range) -> tuple[Callable[[], None], torch.nn.Module] | None:
    """A prefill skipping ``band`` with nnsight on a deep copy (and the copy), or None without nnsight."""
    try:
        from nnsight import NNsight
    except ImportError:
        return None
    clone = copy.deepcopy(model)
    wrapped = NNsight(clone)

    def run() -> None:
        with torch.inference_mode(), wrapped.trace(**inputs, use_cache=True, logits_to_keep=1):
            for index in band:
                layer = wrapped.model.language_model.layers[index]
                layer.skip(layer.input)
    return run, clone


def decoder_inputs(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The ``inputs_embeds`` the VLM hands its language model (image features merged in)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = kwargs["inputs_embeds"]
    handle = Backbone.of(model).text_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(**inputs, use_cache=True, logits_to_keep=1)
    finally:
        handle.remove()
    return seen["x"]


def hand_sliced(model: torch.nn.Module, inputs: dict, kind: str, k: int) -> Callable[[], None]:
    """The least work ``early_exit(k)`` / ``late_entry(k)`` can do, written out by hand (prompts that share
    the first one's layout, as :func:`prompt` makes them).

    The decoder layers run directly on pre-sliced tensors: all rows in the layers that keep the vision
    tokens, the text rows (with their rotary rows) in the others, a fresh ``DynamicCache`` as in a
    prefill, SDPA's causal path everywhere (the text rows are in order, so causal among them is exact),
    then the final norm. No hooks, no masks, no bookkeeping: what is left between this and skipit's
    decoder time is skipit's own cost.
    """
    bb = Backbone.of(model)
    x0 = decoder_inputs(model, inputs)
    n = x0.shape[1]
    pos = torch.arange(n, device=x0.device)[None]
    text = (inputs["input_ids"][0] != IMAGE_ID).nonzero()[:, 0]
    pe_all = bb.text_model.rotary_emb(x0, pos)
    pe_text = tuple(p[:, text] for p in pe_all)
    full_layers = range(k) if kind == "early_exit" else range(k, bb.n_layers)

    def run() -> torch.Tensor:
        cache = tf.DynamicCache(config=bb.text_model.config)
        x = x0 if kind == "early_exit" else x0[:, text]
        with torch.inference_mode():
            for i, layer in enumerate(bb.layers):
                if kind == "early_exit" and i == k:
                    x = x[:, text]
                if kind == "late_entry" and i == k:
                    x = x0.index_copy(1, text, x)  # vision rows enter with their embedding states
                rows_pe, rows_pos = (pe_all, pos) if i in full_layers else (pe_text, pos[:, text])
                x = layer(x, attention_mask=None, position_ids=rows_pos, past_key_values=cache, use_cache=True,
                          position_embeddings=rows_pe)
            return bb.norm(x)

    _check_same_result(model, inputs, getattr(SkipPlan, kind)(k), run()[:, -1])
    return run


def _check_same_result(model: torch.nn.Module, inputs: dict, plan: SkipPlan, last: torch.Tensor) -> None:
    """The hand-written loop must compute what skipit computes: last position's final state to 1e-4 in
    float32; in a 16-bit dtype to 1% of its largest entry (the two routes round in different orders)."""
    seen = {}
    handle = Backbone.of(model).text_model.register_forward_hook(
        lambda module, args, output: seen.update(x=output.last_hidden_state[:, -1]))
    try:
        with skipping(model, plan), torch.inference_mode():
            model(**inputs, use_cache=True, logits_to_keep=1)
    finally:
        handle.remove()
    err = (seen["x"].float() - last.float()).abs().max().item()
    tol = 1e-4 if last.dtype == torch.float32 else 1e-2 * max(1.0, last.float().abs().max().item())
    if err > tol:
        raise RuntimeError(f"hand-sliced {plan} differs from skipit's result by {err:.2e}")


def mark(device: torch.device):
    """A point in time: a recorded CUDA event on a GPU (no host sync), ``perf_counter`` elsewhere."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def elapsed_ms(start, end) -> float:
    """Milliseconds between two :func:`mark` s (CUDA events: only after a synchronise that follows ``end``)."""
    if isinstance(start, float):
        return (end - start) * 1e3
    return start.elapsed_time(end)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DecoderClock:
    """Wall time of the language model's forward inside a whole-model call (CPU: ``perf_counter``; GPU:
    CUDA events recorded in the hooks, read after the caller's synchronise).

    The pre-hook is prepended so that it runs before any hook a skip session adds later; the
    post-hook runs before the session's (which only closes its step record).
    """

    def __init__(self, model: torch.nn.Module):
        text_model = Backbone.of(model).text_model
        self.device = next(text_model.parameters()).device
        self._start = self._end_mark = None
        self._handles = [text_model.register_forward_pre_hook(self._begin, prepend=True),
                         text_model.register_forward_hook(self._end)]

    def reset(self) -> None:
        self._start = self._end_mark = None

    @property
    def ms(self) -> float:
        """Time of the last forward since :meth:`reset`; NaN if the hooks did not fire."""
        if self._start is None or self._end_mark is None:
            return math.nan
        return elapsed_ms(self._start, self._end_mark)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _begin(self, module, args) -> None:
        self._start = mark(self.device)

    def _end(self, module, args, output) -> None:
        self._end_mark = mark(self.device)


@dataclass
class Row:
    name: str
    kind: str
    plan: SkipPlan  # what the ideal FLOP count is taken of
    run: Callable[[], None]
    clock: "DecoderClock | None"  # times the decoder inside a whole prefill; None: ``run`` is the decoder only
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where a clock-less row runs


def configurations(model, inputs, n_layers: int, by_hand: bool | None = None) -> list[Row]:
    """The rows of the table; ``by_hand`` (default: at batch 1 only) adds the least-work references."""
    half, quarter = n_layers // 2, n_layers // 4
    band = range(quarter, 3 * quarter)
    vision = inputs["input_ids"] == IMAGE_ID
    extra = {"use_cache": True, "logits_to_keep": 1}
    clock = DecoderClock(model)  # registered before any session: its pre-hook runs first

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

    def plan_row(plan: SkipPlan, name: str | None = None) -> Row:
        return Row(name or str(plan), "skipit", plan, under(plan), clock)

    rows = [Row("baseline", "none", SkipPlan.none(), under(SkipPlan.none()), clock)]
    rows += [plan_row(SkipPlan.early_exit(k)) for k in (3 * quarter, half, quarter)]
    rows += [plan_row(SkipPlan.late_entry(k)) for k in (quarter, half, 3 * quarter)]
    for lo, hi in ((quarter, 3 * quarter), (2, n_layers - 2)):
        rows.append(plan_row(SkipPlan.vision_freeze(range(lo, hi)), f"vision_freeze({lo}-{hi - 1})"))
    rows.append(plan_row(SkipPlan.late_entry(quarter) | SkipPlan.early_exit(3 * quarter)))
    rows.append(plan_row(SkipPlan.whole_layers(band), f"whole_layers({band.start}-{band.stop - 1})"))
    if inputs["input_ids"].shape[0] == 1 if by_hand is None else by_hand:
        for kind, k in (("early_exit", quarter), ("late_entry", 3 * quarter)):
            rows.append(Row(f"by hand {kind}({k})", "reference", getattr(SkipPlan, kind)(k),
                            hand_sliced(model, inputs, kind, k), None, clock.device))
    rows.append(Row(f"mask early_exit({half})", "masking", SkipPlan.early_exit(half), masked(half), clock))
    nnsight = nnsight_runner(model, inputs, band)
    if nnsight is not None:
        run, clone = nnsight
        rows.append(Row(f"nnsight whole_layers({band.start}-{band.stop - 1})", "nnsight", SkipPlan.whole_layers(band),
                        run, DecoderClock(clone)))
    return rows


def layer_rows(threads: int, rows: tuple[int, ...] = (48, 96, 192, 624), repeats: int = 15) -> None:
    """One decoder layer of the benchmark model timed alone on M rows (median of ``repeats`` calls), next to
    the time its FLOP share of the ``rows[-1]``-row call predicts; efficiency = predicted / measured."""
    torch.set_num_threads(threads)
    model = build(1)
    bb = Backbone.of(model)
    ms = {}
    with torch.inference_mode():
        for m in rows:
            x, pos = torch.randn(1, m, bb.hidden_size), torch.arange(m)[None]
            kwargs = {"attention_mask": None, "position_ids": pos, "position_embeddings": bb.text_model.rotary_emb(x, pos)}
            for _ in range(2):
                bb.layers[0](x, **kwargs)
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                bb.layers[0](x, **kwargs)
                samples.append((time.perf_counter() - t0) * 1e3)
            ms[m] = statistics.median(samples)
    full = bench.flops(model, 0, rows[-1]).total
    print(f"| rows | threads | ms (median of {repeats}) | FLOP-predicted ms | efficiency |")
    print("|---:|---:|---:|---:|---:|")
    for m in rows:
        predicted = ms[rows[-1]] * bench.flops(model, 0, m).total / full
        print(f"| {m} | {threads} | {ms[m]:.1f} | {predicted:.1f} | {predicted / ms[m]:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="prompts per prefill (same length, no padding)")
    parser.add_argument("--only", default=None, help="regular expression: time only the rows it matches")
    parser.add_argument("--layer-rows", action="store_true",
                        help="instead: time one decoder layer alone on 48-624 rows against its FLOP share")
    args = parser.parse_args()
    if args.layer_rows:
        layer_rows(args.threads)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, inputs = build(args.layers), prompt(args.batch)
    rows = configurations(model, inputs, args.layers)
    if args.only:
        rows = rows[:1] + [row for row in rows[1:] if re.search(args.only, row.name)]
    for row in rows:  # warm-up
        row.run()
    scopes = ("wall", "decoder")
    times, ratios = paired_rounds(rows, args.rounds, timed, scopes)
    machine = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
    print(f"# skip_speed.py  {datetime.date.today()}  {machine.split(':')[-1].strip()}  torch {torch.__version__}  "
          f"transformers {tf.__version__}  threads={args.threads}  OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}  "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"# LLaVA-1.5 proportions: {args.layers} layers x 1024, {N_VISION} vision + "
          f"{TEXT_BEFORE + TEXT_AFTER} text tokens, batch {args.batch}; {args.rounds} rounds, each row paired with a baseline "
          "run just before it; speedups are medians of the per-pair ratios; wall = whole prefill, decoder = language "
          "model only")
    print("| configuration | kind | ideal (FLOPs) | wall ms (median, IQR) | realized, wall | realized/ideal, wall | "
          "decoder ms (median, IQR) | realized, decoder | realized/ideal, decoder |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        ideal = bench.ideal_speedup(model, N_VISION, TEXT_BEFORE + TEXT_AFTER, row.plan, text_before=TEXT_BEFORE)
        cells = [_cells(row.name, times[row.name][scope], ratios[row.name][scope], ideal) for scope in scopes]
        print(f"| {row.name} | {row.kind} | {ideal:.2f}x | {cells[0]} | {cells[1]} |")


def _cells(name: str, times: list[float], ratios: list[float], ideal: float) -> str:
    """``median (IQR) | speedup | speedup / ideal`` for one scope, dashes where it was not measured."""
    if not times or any(math.isnan(t) for t in times):
        return "- | - | -"
    t = bench.Timing(name, tuple(times), "cpu")
    speedup = statistics.median(ratios) if ratios else 1.0
    return f"{t.median:.0f} ({t.iqr:.0f}) | {speedup:.2f}x | {speedup / ideal:.2f}"


def paired_rounds(rows: list, rounds: int, timed: Callable[..., tuple[float, ...]], scopes: tuple[str, ...],
                  deadline: float | None = None, min_rounds: int = 1) -> tuple[dict, dict]:
    """Time ``rows[1:]`` in ``rounds`` rounds, each call right after a call of the baseline ``rows[0]``
    (the order of the rows rotates from round to round); ``timed(row)`` gives one time per scope.

    Returns ``times[name][scope]`` (ms, every call; the baseline's pooled over all pairs) and
    ``ratios[name][scope]`` (baseline / row of each pair). With a ``deadline`` (``time.perf_counter``
    seconds) no new round starts after it once ``min_rounds`` rounds are done.
    """
    times = {row.name: {scope: [] for scope in scopes} for row in rows}
    ratios = {row.name: {scope: [] for scope in scopes} for row in rows}
    baseline, others = rows[0], rows[1:]
    for r in range(rounds):  # paired: each row runs right after a baseline; the order rotates
        if deadline is not None and r >= min_rounds and time.perf_counter() > deadline:
            break
        for row in others[r % len(others):] + others[:r % len(others)]:
            base, plan = timed(baseline), timed(row)
            for i, scope in enumerate(scopes):
                times[baseline.name][scope].append(base[i])
                times[row.name][scope].append(plan[i])
                ratios[row.name][scope].append(base[i] / plan[i])
    return times, ratios


def timed(row: Row) -> tuple[float, float]:
    """(wall ms of the whole prefill, wall ms of its decoder) of one call of ``row``; NaN: not measured.

    On a GPU: a synchronise, CUDA events around the call (and in the decoder hooks), one synchronise at
    the end, the events read after it; nothing inside the call waits for the device.
    """
    device = row.clock.device if row.clock is not None else row.device
    if row.clock is not None:
        row.clock.reset()  # stays NaN if the hooks did not fire
    synchronize(device)
    start = mark(device)
    row.run()
    end = mark(device)
    synchronize(device)
    elapsed = elapsed_ms(start, end)
    return (elapsed, row.clock.ms) if row.clock is not None else (math.nan, elapsed)


if __name__ == "__main__":
    main()
