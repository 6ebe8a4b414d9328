"""One prepared GPU check: realized vs ideal vs least-work speedup of every skip-plan kind, prefill and decode.

Builds a random-init ``LlavaForConditionalGeneration`` with LLaVA-1.5-7B's proportions in bfloat16 from a
config (nothing is downloaded): Llama backbone 32 x 4096, 32 heads, gated MLP 11008, vocabulary 32064,
a CLIP ViT-L/14-336 tower (576 image tokens); prompts of 576 image and 48 text tokens
(``benchmarks/skip_speed.py``'s prompts). When ``torch.cuda.mem_get_info`` says the card cannot hold it
(bf16 weights, nnsight's deep copy, the KV cache of batch 8, and the float32 copy of the correctness
check), it takes the first smaller size that fits: 8 layers of the same width, then 16 x 2048.

At batch 1 and 8, in one run and side by side (interleaved rounds: every row right after a baseline
call, the order rotating; a speedup is the median of the paired ratios, with a 95 % percentile bootstrap
interval):

* prefill of every plan kind: ``early_exit``, ``late_entry``, a band ``late_entry | early_exit``,
  ``vision_freeze``, ``whole_layers`` (``skip_speed.configurations``), the by-hand least-work loops for
  the deepest Early Exit / Late Entry cuts, the attention-masking shortcut and nnsight's whole-layer
  skip (when nnsight is importable; otherwise the row is left out with the reason printed);
  wall time of the whole call and decoder time (the language model alone, the scope of the FLOP ideal);
* decode: time per generated token (greedy, KV cache, ``--decode-steps`` steps after an untimed prefill)
  under every skipit plan.

Ideal speedups are :func:`skipit_core.bench.ideal_speedup` (decoder FLOPs on the config shapes; decode:
summed over the timed steps with the cache each plan leaves). Timing: CUDA events with a synchronise
before and after each timed call, none inside it (on a CPU ``time.perf_counter``); a timing whose IQR is
above :data:`skipit_core.bench.NOISY_IQR_RATIO` of its median is flagged NOISY as
:class:`skipit_core.bench.Timing` does. Finally, in float32 (so that rounding cannot flip a greedy
token), ``generate()`` with the KV cache must give the same tokens as ``generate(use_cache=False)``
under every plan.

Prints one table and writes it, with the device, versions and date, as JSON (``--out``).

    .venv/bin/python benchmarks/gpu_check.py                               # on a GPU, < 5 minutes
    .venv/bin/python benchmarks/gpu_check.py --device cpu --small --out /tmp/g.json   # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import skip_speed as ss  # the sibling benchmark: model, prompts, rows, paired timing

from skipit_core import bench
from skipit_core.forward import move_inputs
from skipit_core.information import bootstrap_ci
from skipit_core.skip import SkipPlan, skipping

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14)
TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=336, patch_size=14)
SMALL_TOWER = {**TINY_TOWER, "image_size": 168}  # 144 image tokens: the CPU smoke run
#: sizes tried in order on a GPU (the first that fits); ``small`` is ``--small``
SIZES = {
    "llava-1.5-7b": dict(n_layers=32, hidden=4096, intermediate=11008, heads=32, vision=CLIP_L_336),
    "7b-width-8-layers": dict(n_layers=8, hidden=4096, intermediate=11008, heads=32, vision=CLIP_L_336),
    "2048x16": dict(n_layers=16, hidden=2048, intermediate=5504, heads=16, vision=TINY_TOWER),
    "small": dict(n_layers=12, hidden=64, intermediate=172, heads=4, vision=SMALL_TOWER),
}
BATCHES = (1, 8)
N_TEXT = ss.TEXT_BEFORE + ss.TEXT_AFTER
GIB = 2 ** 30


def config_of(size: str) -> tf.LlavaConfig:
    s = SIZES[size]
    return ss.llava_config(s["n_layers"], s["hidden"], s["intermediate"], s["heads"],
                           tf.CLIPVisionConfig(**s["vision"]))


def bytes_needed(size: str, dtype: torch.dtype, nnsight: bool) -> int:
    """Device memory the run needs at ``size``: weights (twice with nnsight's copy), the KV cache of the
    largest batch (twice: baseline and plan), 4 GiB of activations and allocator slack; or, for the
    correctness check, the float32 weights next to the 16-bit ones they are cast from, whichever is more.
    Parameters counted on the meta device."""
    with torch.device("meta"):
        model = tf.LlavaForConditionalGeneration(config_of(size))
    n_params = sum(p.numel() for p in model.parameters())
    s = SIZES[size]
    width = torch.finfo(dtype).bits // 8
    kv = 2 * s["n_layers"] * max(BATCHES) * (ss.N_VISION + N_TEXT + 64) * s["hidden"] * width
    timing = n_params * width * (2 if nnsight else 1) + 2 * kv + 4 * GIB
    return max(timing, n_params * (width + 4) + 2 * GIB)


def choose_size(device: torch.device, dtype: torch.dtype, small: bool, nnsight: bool) -> tuple[str, str]:
    """(size, why) from the free device memory."""
    if small:
        return "small", "--small"
    if device.type != "cuda":
        return "llava-1.5-7b", f"{device.type}: memory not checked"
    free, total = torch.cuda.mem_get_info(device)
    for size in list(SIZES)[:-1]:
        need = bytes_needed(size, dtype, nnsight)
        if need <= 0.9 * free:
            return size, f"needs {need / GIB:.1f} GiB, {free / GIB:.1f} of {total / GIB:.1f} GiB free"
    raise SystemExit(f"not enough device memory: {free / GIB:.1f} GiB free, the smallest size needs "
                     f"{bytes_needed(list(SIZES)[-2], dtype, nnsight) / GIB:.1f} GiB")


def plan_kind(plan: SkipPlan) -> str:
    """``none``, ``whole_layers``, ``vision_freeze``, ``band`` (Late Entry and Early Exit), ``late_entry``,
    ``early_exit`` (whole layers and freeze win when mixed)."""
    if plan.whole:
        return "whole_layers"
    if plan.freeze:
        return "vision_freeze"
    if plan.entry and plan.exit is not None:
        return "band"
    if plan.entry:
        return "late_entry"
    return "early_exit" if plan.exit is not None else "none"


# ------------------------------------------------------------------------------------------ decode
@dataclass
class DecodeRow:
    name: str
    plan: SkipPlan


def decode_timer(model: torch.nn.Module, inputs: dict, steps: int):
    """``timed(row) -> (ms per generated token,)``: an untimed prefill under the row's plan, a synchronise,
    then ``steps`` greedy decode steps between two marks (the next token stays on the device; positions
    and attention masks are made before the first mark), a synchronise."""
    device = inputs["input_ids"].device
    b, n = inputs["input_ids"].shape
    mask = torch.ones(b, n + steps, dtype=inputs["attention_mask"].dtype, device=device)
    positions = torch.arange(n, n + steps, device=device).expand(b, -1)

    def timed(row: DecodeRow) -> tuple[float]:
        with skipping(model, row.plan), torch.inference_mode():
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            ss.synchronize(device)
            start = ss.mark(device)
            for s in range(steps):
                out = model(input_ids=token, attention_mask=mask[:, :n + s + 1], position_ids=positions[:, s:s + 1],
                            past_key_values=cache, use_cache=True, logits_to_keep=1)
                token = out.logits[:, -1:].argmax(-1)
            end = ss.mark(device)
            ss.synchronize(device)
        return (ss.elapsed_ms(start, end) / steps,)
    return timed


def ideal_decode(model: torch.nn.Module, n_vision: int, plan: SkipPlan, steps: int) -> float:
    """Decoder FLOPs of ``steps`` decode steps without / with ``plan`` (step s: 48 + s text positions cached)."""
    def total(p):
        return sum(bench.flops(model, n_vision, N_TEXT + s, p, decode=True).total for s in range(steps))
    return total(None) / total(plan)


# ------------------------------------------------------------------------------------------ summary
def timing_summary(name: str, samples: list[float], device: str) -> dict | None:
    if not samples or any(math.isnan(x) for x in samples):
        return None
    t = bench.Timing(name, tuple(samples), device)
    return {"median": t.median, "iqr": t.iqr, "n": t.n, "noisy": t.noisy, "warning": t.warning}


def speedup_summary(ratios: list[float]) -> dict | None:
    """Median of the paired ratios with a 95 % percentile bootstrap interval (one sample: no interval)."""
    if not ratios or any(not math.isfinite(r) for r in ratios):
        return None
    med = statistics.median(ratios)
    if len(ratios) < 2 or min(ratios) == max(ratios):
        return {"median": med, "low": min(ratios), "high": max(ratios), "n": len(ratios)}
    ci = bootstrap_ci(np.median, np.asarray(ratios, dtype=float), n_boot=400, level=0.95, seed=0)
    return {"median": med, "low": ci.low, "high": ci.high, "n": len(ratios)}


def summarise(batch: int, phase: str, rows, kinds: dict, ideals: dict, times: dict, ratios: dict,
              scopes: tuple[str, ...], device: str) -> list[dict]:
    out = []
    for row in rows:
        entry = {"batch": batch, "phase": phase, "name": row.name, "method": kinds[row.name], "plan": str(row.plan),
                 "plan_kind": plan_kind(row.plan), "ideal": ideals[row.name]}
        for scope in scopes:
            entry[f"{scope}_ms"] = timing_summary(f"batch {batch} {phase} {row.name} ({scope})",
                                                  times[row.name][scope], device)
            speed = ({"median": 1.0, "low": 1.0, "high": 1.0, "n": len(times[row.name][scope])}
                     if row is rows[0] else speedup_summary(ratios[row.name][scope]))
            if entry[f"{scope}_ms"] is None:
                speed = None
            entry[f"speedup_{scope}"] = speed
            entry[f"realized_over_ideal_{scope}"] = speed["median"] / entry["ideal"] if speed else None
        entry["noisy"] = any((entry[f"{s}_ms"] or {}).get("noisy", False) for s in scopes)
        out.append(entry)
    return out


def least_work(entries: list[dict]) -> None:
    """Add to each by-hand row how skipit's decoder time for the same plan compares with it (1 = as fast)."""
    for hand in [e for e in entries if e["method"] == "reference"]:
        twin = next((e for e in entries if e["method"] == "skipit" and e["plan"] == hand["plan"]
                     and e["batch"] == hand["batch"] and e["phase"] == hand["phase"]), None)
        if twin and twin["decoder_ms"] and hand["decoder_ms"]:
            hand["skipit_decoder_over_least_work"] = twin["decoder_ms"]["median"] / hand["decoder_ms"]["median"]


# ------------------------------------------------------------------------------------------ check
def cache_checks(model: torch.nn.Module, plans: list[SkipPlan], prompts: dict, new_tokens: int
                 ) -> tuple[list[dict], str]:
    """Greedy ``generate()`` with the KV cache vs without, under every plan, with the model cast to float32
    (its memory is counted in :func:`bytes_needed`)."""
    dtype = torch.float32
    model.float()
    torch.set_float32_matmul_precision("highest")  # no TF32: the two routes must round alike
    inputs = move_inputs(prompts, next(model.parameters()).device, dtype)
    batch = inputs["input_ids"].shape[0]
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, suppress_tokens=[ss.IMAGE_ID], pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True)
    out = []
    for plan in plans:
        with skipping(model, plan), torch.inference_mode():
            cached = model.generate(**inputs, **kwargs)
            uncached = model.generate(**inputs, **kwargs, use_cache=False)
        equal = torch.equal(cached.sequences, uncached.sequences)
        diff = None
        if len(cached.logits) == len(uncached.logits):
            diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(cached.logits, uncached.logits))
        out.append({"plan": str(plan), "plan_kind": plan_kind(plan), "batch": batch, "new_tokens": new_tokens,
                    "dtype": str(dtype).removeprefix("torch."), "equal": equal, "max_logit_diff": diff,
                    "tokens": cached.sequences[:, -new_tokens:].tolist()})
    return out, str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------ output
def _fmt_ms(t: dict | None) -> str:
    if t is None:
        return "-"
    digits = 2 if t["median"] < 100 else 0
    return f"{t['median']:.{digits}f} ({t['iqr']:.{digits}f})"


def _fmt_speed(s: dict | None) -> str:
    return "-" if s is None else f"{s['median']:.2f}x [{s['low']:.2f}, {s['high']:.2f}]"


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(entries: list[dict]) -> str:
    head = ("| batch | phase | configuration | method | ideal (FLOPs) | wall ms (median, IQR) | realized, wall [95% CI] "
            "| realized/ideal, wall | decoder ms (median, IQR) | realized, decoder [95% CI] | realized/ideal, decoder "
            "| flags |")
    lines = [head, "|" + "---|" * 4 + "---:|" * 7 + "---|"]
    for e in entries:
        wall = "wall" if e["phase"] == "prefill" else "token"
        flags = ["NOISY"] if e["noisy"] else []
        name = e["name"].replace("|", "\\|")  # a composed plan's "|" must not open a column
        if "skipit_decoder_over_least_work" in e:
            flags.append(f"skipit/least work {e['skipit_decoder_over_least_work']:.2f}")
        lines.append(
            f"| {e['batch']} | {e['phase']} | {name} | {e['method']} | {e['ideal']:.2f}x | {_fmt_ms(e[f'{wall}_ms'])} "
            f"| {_fmt_speed(e[f'speedup_{wall}'])} | {_fmt_ratio(e[f'realized_over_ideal_{wall}'])} "
            f"| {_fmt_ms(e.get('decoder_ms'))} | {_fmt_speed(e.get('speedup_decoder'))} "
            f"| {_fmt_ratio(e.get('realized_over_ideal_decoder'))} | {', '.join(flags)} |")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lscpu = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
        name = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "")
    except (OSError, subprocess.SubprocessError):
        name = ""
    return name or platform.processor() or platform.machine()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny sizes (12 x 64): a CPU smoke run in seconds")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--rounds", type=int, default=None, help="prefill rounds (default 15; --small 3)")
    parser.add_argument("--decode-rounds", type=int, default=None, help="decode rounds (default 7; --small 2)")
    parser.add_argument("--decode-steps", type=int, default=None, help="tokens per decode sample (default 8; --small 3)")
    parser.add_argument("--check-tokens", type=int, default=4, help="greedy tokens of the cache check")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the timed phases (default 170; --small 25): no new round starts past it "
                             "once 3 are done")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device; use --device cpu --small for a CPU run")
    dtype = getattr(torch, args.dtype)
    rounds = args.rounds or (3 if args.small else 15)
    decode_rounds = args.decode_rounds or (2 if args.small else 7)
    steps = args.decode_steps or (3 if args.small else 8)
    warmup = 1 if args.small else 2
    budget = args.budget or (25.0 if args.small else 170.0)
    has_nnsight = importlib.util.find_spec("nnsight") is not None
    skipped = [] if has_nnsight else [{"row": "nnsight whole_layers", "reason": "nnsight is not importable "
                                       "(pip install nnsight); row left out"}]
    skipped.append({"row": "masking and nnsight rows, decode", "reason": "prefill only: the mask hook covers the "
                    "prompt positions and nnsight traces one call; decode is timed for the skipit plans"})
    for s in skipped:
        print(f"# skipped: {s['row']}: {s['reason']}")

    size, why = choose_size(device, dtype, args.small, has_nnsight)
    torch.manual_seed(0)
    n_layers = SIZES[size]["n_layers"]
    model = ss.build(n_layers, config_of(size), device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    n_vision = model.config.image_seq_length
    tower = SIZES[size]["vision"]

    def prompt(batch: int) -> dict:
        return ss.prompt(batch, tower["image_size"], tower["patch_size"])
    print(f"# model {size} ({why}): {n_params / 1e6:.1f} M parameters, {dtype}, {device_name(device)}; "
          f"built in {time.perf_counter() - t_start:.0f} s")

    entries: list[dict] = []
    plans: dict[str, SkipPlan] = {}
    phases_left = 2 * len(BATCHES)
    for batch in BATCHES:
        inputs = move_inputs(prompt(batch), device, dtype)
        try:
            rows = ss.configurations(model, inputs, n_layers, by_hand=True)
        except RuntimeError as error:  # the by-hand loop's start-up check against skipit failed
            if "hand-sliced" not in str(error):
                raise
            skipped.append({"row": f"by hand rows, batch {batch}", "reason": str(error)})
            print(f"# skipped: by hand rows, batch {batch}: {error}")
            rows = ss.configurations(model, inputs, n_layers, by_hand=False)  # (the failed call's clock
            # hooks stay registered: one more timestamp per forward, read by nobody)
        kinds = {row.name: row.kind for row in rows}
        ideals = {row.name: bench.ideal_speedup(model, n_vision, N_TEXT, row.plan, text_before=ss.TEXT_BEFORE)
                  for row in rows}
        for row in list(rows):  # warm-up (kernel selection, caches)
            try:
                for _ in range(warmup):
                    row.run()
            except Exception as error:  # nnsight's API moves between versions: its row must not sink the run
                if row.kind != "nnsight":
                    raise
                rows.remove(row)
                skipped.append({"row": f"{row.name}, batch {batch}", "reason": f"{type(error).__name__}: {error}"})
                print(f"# skipped: {row.name}, batch {batch}: {type(error).__name__}: {error}")
        deadline = time.perf_counter() + max(0.0, budget - (time.perf_counter() - t_start)) / phases_left
        times, ratios = ss.paired_rounds(rows, rounds, ss.timed, ("wall", "decoder"), deadline, min_rounds=3)
        phases_left -= 1
        entries += summarise(batch, "prefill", rows, kinds, ideals, times, ratios, ("wall", "decoder"), device.type)
        for row in rows:
            if row.clock is not None:
                row.clock.remove()
        plans.update({str(row.plan): row.plan for row in rows if row.kind in ("none", "skipit")})
        drows = [DecodeRow(row.name, row.plan) for row in rows if row.kind in ("none", "skipit")]
        del rows, row  # the last row may be nnsight's, holding the deep copy
        free_memory(device)

        timed = decode_timer(model, inputs, steps)
        for row in drows:
            for _ in range(warmup):
                timed(row)
        deadline = time.perf_counter() + max(0.0, budget - (time.perf_counter() - t_start)) / phases_left
        times, ratios = ss.paired_rounds(drows, decode_rounds, timed, ("token",), deadline, min_rounds=3)
        phases_left -= 1
        kinds = {row.name: "none" if row is drows[0] else "skipit" for row in drows}
        ideals = {row.name: ideal_decode(model, n_vision, row.plan, steps) for row in drows}
        entries += summarise(batch, "decode", drows, kinds, ideals, times, ratios, ("token",), device.type)
        free_memory(device)
    least_work(entries)
    t_timed = time.perf_counter() - t_start

    checks, check_dtype = cache_checks(model, list(plans.values()), prompt(2), args.check_tokens)
    result = {
        "script": "benchmarks/gpu_check.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cuda_measured": device.type == "cuda",
        "device": {"type": device.type, "name": device_name(device),
                   **({"memory_total_gib": torch.cuda.get_device_properties(device).total_memory / GIB}
                      if device.type == "cuda" else {"threads": torch.get_num_threads()})},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": tf.__version__,
                     "nnsight": _version("nnsight") if has_nnsight else None,
                     "cuda": torch.version.cuda},
        "model": {"size": size, "chosen": why, "parameters": n_params, "dtype": str(dtype).removeprefix("torch."),
                  **{k: v for k, v in SIZES[size].items() if k != "vision"}, "vision_tower": SIZES[size]["vision"],
                  "vocab": 32064},
        "prompt": {"n_vision": n_vision, "n_text": N_TEXT, "text_before": ss.TEXT_BEFORE, "batches": list(BATCHES)},
        "settings": {"rounds_max": rounds, "decode_rounds_max": decode_rounds, "decode_steps": steps,
                     "budget_s": budget, "noisy_iqr_ratio": bench.NOISY_IQR_RATIO,
                     "interval": "95% percentile bootstrap of the median paired ratio",
                     "timer": "CUDA events, synchronise before and after each call" if device.type == "cuda"
                     else "time.perf_counter"},
        "rows": entries,
        "skipped": skipped,
        "checks": checks,
        "check_dtype": check_dtype,
        "warnings": [t["warning"] for e in entries for k, t in e.items() if k.endswith("_ms") and t and t["warning"]],
        "elapsed_s": {"timings": t_timed, "total": time.perf_counter() - t_start},
    }
    text = table(entries)
    print(f"# gpu_check.py  {result['date']}  {result['device']['name']}  torch {torch.__version__}  "
          f"transformers {tf.__version__}  model {size} ({dtype}); {n_vision} vision + {N_TEXT} text tokens; "
          "speedups: median of paired ratios [95% bootstrap CI]; decode rows: ms per generated token")
    print(text)
    for check in checks:
        diff = "-" if check["max_logit_diff"] is None else f"{check['max_logit_diff']:.1e}"
        print(f"# cache check {check['plan']}: generate with cache == without: {check['equal']} "
              f"(max |logit diff| {diff}, {check['dtype']}, batch {check['batch']})")
    for warning in result["warnings"]:
        print(f"# {warning}")
    print(f"# {time.perf_counter() - t_start:.0f} s in all; JSON in {args.out}")
    result["table"] = text
    Path(args.out).write_text(json.dumps(result, indent=1))
    if not all(c["equal"] for c in checks):
        raise SystemExit("generate() with the KV cache differs from generate(use_cache=False) under some plan")
    return result


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
