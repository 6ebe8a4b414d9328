"""``skipit``: profile, evaluate and benchmark a VLM from the shell, over the library's functions.

    skipit profile  --model digits-llava --n 256 --out profile.npz
    skipit evaluate --model digits-llava --plan none --plan "early_exit(8)" --plan "late_entry(2)"
    skipit bench    --model digits-llava --plan "late_entry(2) | early_exit(10)"
    torchrun --nproc_per_node 4 -m skipit_core.cli profile --model llava-hf/llava-1.5-7b-hf --out p.npz

``--model`` is a bundled model name (``digits-llava``, ``digits-qwen2vl``), a local folder or a Hugging
Face id. ``--data`` is ``digits`` (the frozen DigitScenes test split, the default), a folder written by
``VQASet.save`` (one ``<name>.npz`` + ``<name>.jsonl`` pair) or ``pope:PATH`` (a POPE ``.jsonl``
or hub name); ``--n`` keeps its first items. Plans are written as in Python: ``none``, ``early_exit(k)``,
``late_entry(k)``, ``vision_freeze(a-b)``, ``whole_layers(3,4,7)``, combined with ``|``.

``--out``: profiles as ``.npz`` (what ``LayerProfile.load`` reads) or ``.json``; evaluations as
``.json`` or ``.parquet`` (one row per plan and item; needs pyarrow). Progress bars and a one-line
summary go to stderr, tables to stdout. Every bad argument is one ``skipit: error: ...`` line on
stderr and exit status 2, found before any model is loaded wherever it can be.

Under ``torchrun`` profile and evaluate run data-parallel: the data is cut into the batches of
``--batch-size`` one process would form, rank ``r`` of ``W`` takes batches ``r, r+W, ...``
(:func:`skipit_core.distributed.shard`), rank 0 merges and writes; the result equals one process's
(evaluation exactly, profile sums to float64 rounding). ``--device-map auto`` spreads a big checkpoint
over the devices with accelerate (one process per machine). ``--checkpoint DIR --checkpoint-every N``
makes ``profile`` resumable: rerun the same command after a crash and it continues where it stopped.
Under torchrun write ``--n-items`` for ``--n``: torchrun's own parser reads ``--n`` as an abbreviation
of its ``--nnodes``/``--nproc-per-node`` and stops before skipit sees it.
"""

from __future__ import annotations

import argparse
import atexit
import difflib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm
from transformers import AutoConfig

from . import zoo
from .bench import ideal_speedup, prompt_tokens, time_prefill
from .capture import profile
from .distributed import Checkpoint, Ranks, batch_starts, gather_items, gather_profile, process_group, shard
from .errors import InputError, PlanError, SkipitError
from .forward import check_device
from .skip import SkipPlan
from .tasks import DigitScenes, encode, evaluate, load_pope, normalize_answer, summarise

__all__ = ["main", "parse_plan", "speedup_line"]

PLAN_KINDS = ("none", "early_exit", "late_entry", "vision_freeze", "whole_layers")
_FORMS = "write none, early_exit(k), late_entry(k), vision_freeze(a-b) or whole_layers(i,j,a-b), joined with |."
_TERM = re.compile(r"^\s*(\w+)\s*(?:\((.*)\))?\s*$", re.ASCII | re.DOTALL)
_INT = re.compile(r"^\s*([0-9]+)\s*$", re.ASCII)
_RANGE = re.compile(r"^\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?$", re.ASCII)
MAX_LAYER = 100_000  # no model is deeper; bounds the lists a range like 0-999999999 would build
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_MEMORY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.ASCII)


# ---------------------------------------------------------------------------------------- plans
def parse_plan(text: str):
    """A :class:`~skipit_core.skip.SkipPlan` from its written form, e.g. ``"late_entry(2) | early_exit(10)"``.

    Indices are ASCII digits; ranges ``a-b`` are inclusive and must run upwards. Anything else raises
    :class:`InputError` (or :class:`PlanError` for terms that contradict each other).
    """
    if not isinstance(text, str) or not text.strip():
        raise InputError("the plan is empty; write none for no skipping, or e.g. early_exit(8).")
    plan = SkipPlan.none()
    for term in text.split("|"):
        if not term.strip():
            raise InputError(f"plan {text!r} has an empty term next to a '|'; remove the extra '|'.")
        plan = plan | _term(term)
    return plan


def _term(term: str):
    match = _TERM.match(term)
    if match is None or match.group(1) not in PLAN_KINDS:
        name = match.group(1) if match else term.strip().split("(")[0]
        close = difflib.get_close_matches(name.lower(), PLAN_KINDS, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise InputError(f"cannot read plan term {term.strip()!r}{hint}; {_FORMS}")
    kind, arg = match.group(1), match.group(2)
    if kind == "none":
        if arg is not None and arg.strip():
            raise InputError(f"none takes no argument, got {term.strip()!r}; write none or none().")
        return SkipPlan.none()
    if arg is None or not arg.strip():
        raise InputError(f"plan term {kind} needs an argument, e.g. {kind}(4).")
    if kind in ("early_exit", "late_entry"):
        k = _INT.match(arg)
        if k is None:
            raise InputError(f"{kind}(k) takes one non-negative layer index in ASCII digits, e.g. {kind}(4); "
                             f"got {term.strip()!r}.")
        return getattr(SkipPlan, kind)(int(k.group(1)))
    return getattr(SkipPlan, kind)(_layers(kind, arg))


def _layers(kind: str, arg: str) -> list[int]:
    """``"3-6, 9"`` -> ``[3, 4, 5, 6, 9]`` (ranges inclusive, upwards)."""
    out: list[int] = []
    for part in arg.split(","):
        match = _RANGE.match(part)
        if match is None:
            raise InputError(f"{kind}({arg.strip()}): {part.strip()!r} is not a layer index or a range a-b; "
                             f"write e.g. {kind}(3,5-7).")
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        if hi < lo:
            raise InputError(f"{kind}({arg.strip()}): the range {lo}-{hi} runs backwards; write {hi}-{lo}.")
        if hi > MAX_LAYER:
            raise InputError(f"{kind}({arg.strip()}): layer {hi} is beyond any model; layers count from 0.")
        out += range(lo, hi + 1)
    return out


# -------------------------------------------------------------------------------- argument checks
def _count(minimum: int):
    """argparse type: a whole number >= ``minimum`` in ASCII digits."""
    def parse(text: str) -> int:
        t = text.strip()
        if not re.fullmatch(r"-?[0-9]+", t, re.ASCII) or int(t) < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {text!r}")
        return int(t)
    parse.__name__ = "count"
    return parse


def _check_out(path: str | None, suffixes: tuple[str, ...], what: str) -> Path | None:
    """``--out`` as a path whose folder exists and is writable, with one of ``suffixes``."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.suffix.lower() not in suffixes:
        raise InputError(f"--out {path}: {what} are written as {' or '.join(suffixes)}; give a file name ending "
                         "in one of them.")
    if p.is_dir():
        raise InputError(f"--out {path} is a folder; give a file name such as {p / ('result' + suffixes[0])}.")
    parent = p.parent
    if p.exists() and not os.access(p, os.W_OK):
        raise InputError(f"--out {path} exists and is read-only; pick another path or make it writable.")
    if not parent.is_dir():
        raise InputError(f"--out {path}: folder {parent} does not exist; create it (mkdir -p {parent}) or pick "
                         "another path.")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise InputError(f"--out {path}: cannot write in {parent} ({exc.strerror}); pick a writable folder.") from None
    if p.suffix.lower() == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise InputError("writing .parquet needs pyarrow (pip install pyarrow); or write .json.") from None
    return p


def _resolve(name: str):
    """Where ``--model`` is (:func:`skipit_core.zoo.resolve_model`), plus a folder's ``config.json``."""
    if not name.strip():
        raise InputError(f"--model is empty. Bundled models: {', '.join(zoo.MODELS)}.")
    try:
        source = zoo.resolve_model(name)
    except SkipitError:
        raise
    except (ValueError, RuntimeError, OSError) as exc:  # e.g. huggingface_hub's HFValidationError, ~user
        raise InputError(f"--model {name!r} is not a bundled model, an existing folder or a valid Hugging Face id "
                         f"({type(exc).__name__}: {exc}). Bundled models: {', '.join(zoo.MODELS)}.") from None
    if source.kind == "folder" and not (Path(source.where) / "config.json").exists():
        raise InputError(f"--model {name}: no config.json in {source.where}; pass the folder save_pretrained "
                         f"wrote. Bundled models: {', '.join(zoo.MODELS)}.")
    return source


def _where(source) -> Any:
    return zoo.model_path(source.where) if source.kind == "zoo" else source.where


def _check_depth(plans: list, source, name: str) -> None:
    """Plans checked against the depth in the model's config, before its weights load."""
    try:
        config = AutoConfig.from_pretrained(_where(source), local_files_only=source.local_only)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_layers = int(text.num_hidden_layers)
    except Exception:  # noqa: BLE001 - no readable config: the check on the loaded model still runs
        return
    _fit(plans, n_layers, name)


def _fit(plans: list, target: Any, name: str) -> None:
    """``plan.validate(target)`` for every ``(text, plan)``, naming the model on failure."""
    for text, plan in plans:
        try:
            plan.validate(target)
        except PlanError as exc:
            n = target if isinstance(target, int) else None
            depth = f" ({n} layers)" if n is not None else ""
            raise PlanError(f"plan {text!r} does not fit {name}{depth}: {exc}") from None


def _pope(path: str):
    if not path.strip():
        raise InputError("--data pope: needs a source, e.g. pope:tests/fixtures/pope/pope.jsonl or pope:lmms-lab/POPE.")
    p = Path(path).expanduser()
    if p.suffix == ".jsonl" and not p.is_file():
        raise InputError(f"--data pope:{path}: no file {p}; give an existing .jsonl of POPE rows or a hub name.")
    return load_pope(p if p.exists() else path)


def _frozen(spec: str):
    p = Path(spec).expanduser()
    if p.is_dir():
        stems = sorted({f.with_suffix("") for f in p.glob("*.npz") if f.with_suffix(".jsonl").exists()})
        if len(stems) != 1:
            found = ", ".join(s.name for s in stems) or "none"
            raise InputError(f"--data {spec}: a data folder holds one <name>.npz + <name>.jsonl pair (written by "
                             f"VQASet.save); found {found}. Give the folder/name of one.")
        return DigitScenes.load(stems[0])
    if p.with_suffix(".npz").is_file() and p.with_suffix(".jsonl").is_file():
        return DigitScenes.load(p)
    raise InputError(f"--data {spec!r} is not digits, pope:PATH, nor a folder or <name>.npz/.jsonl written by "
                     "VQASet.save; give one of those.")


def _load_data(spec: str, n: int | None):
    """The items of ``--data``, the first ``n`` when given (more than there are is an error)."""
    try:
        if spec == "digits":
            data = DigitScenes.test_set()
        elif spec.startswith("pope:"):
            data = _pope(spec[len("pope:"):])
        else:
            data = _frozen(spec)
    except SkipitError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a damaged file, a missing image ...
        raise InputError(f"--data {spec}: cannot read it ({type(exc).__name__}: {exc}); check the files.") from None
    if len(data) == 0:
        raise InputError(f"--data {spec} has no items; give a data set with at least one.")
    if n is not None and n > len(data):
        raise InputError(f"--n {n} but {data.name} has {len(data)} items; pass --n {len(data)} or less, or leave "
                         "--n out to use them all.")
    return data if n is None else data[:n]


def _memory(text: str | None) -> dict | None:
    """``--max-memory "0=20GiB,cpu=60GiB"`` -> ``{0: "20GiB", "cpu": "60GiB"}``."""
    if text is None:
        return None
    out: dict = {}
    for part in text.split(","):
        key, _, size = part.partition("=")
        key = key.strip()
        if not (key.isascii() and (key.isdigit() or key in ("cpu", "disk", "mps"))) or not _MEMORY.match(size):
            raise InputError(f"--max-memory {text!r}: write device=size pairs such as 0=20GiB,cpu=60GiB "
                             "(devices: GPU numbers, cpu; sizes in B/KB/MB/GB/KiB/MiB/GiB).")
        out[int(key) if key.isdigit() else key] = size.strip().replace(" ", "")
    return out


def _device_map(text: str | None):
    if text is None or text in DEVICE_MAPS:
        return text
    p = Path(text).expanduser()
    if p.suffix == ".json" and p.is_file():
        try:
            return dict(json.loads(p.read_text()))
        except (ValueError, TypeError):
            raise InputError(f"--device-map {text}: not a JSON object of module name -> device.") from None
    raise InputError(f"--device-map {text!r}: use {', '.join(DEVICE_MAPS)} or a .json file mapping module names "
                     "to devices (0, 'cpu', 'disk').")


def _check_common(args, ranks: Ranks) -> None:
    """Checks that need no file: device options, flags that go together, the launch."""
    if args.device is not None:
        check_device(args.device, "--device")
    args.device_map = _device_map(args.device_map)
    args.max_memory = _memory(args.max_memory)
    if args.device_map is None and (args.max_memory or args.offload_folder):
        raise InputError("--max-memory and --offload-folder go with --device-map (e.g. --device-map auto).")
    if args.device_map is not None and args.device is not None:
        raise InputError("--device and --device-map both given: --device-map places the model itself; drop one.")
    if args.device_map is not None and ranks.local_world > 1:
        raise InputError("--device-map spreads one model over this machine's devices: launch one process per "
                         "machine (torchrun --nproc_per_node 1 --nnodes N), or drop --device-map for data parallel.")
    if getattr(args, "checkpoint_every", None) is not None and args.checkpoint is None:
        raise InputError("--checkpoint-every needs --checkpoint DIR (the folder the checkpoints go to).")


# ------------------------------------------------------------------------------------ the model
_DTYPES = ("float32", "bfloat16", "float16")


def _load_model(args, source, device: str):
    """``(model, processor)`` by :func:`skipit_core.zoo.load_vlm`; with ``--device-map`` dispatched by
    accelerate (``--max-memory``, ``--offload-folder``, default a scratch folder)."""
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.device_map is None:
        return zoo.load_vlm(args.model, device=device, dtype=dtype)
    return zoo.load_vlm(args.model, dtype=dtype, device_map=args.device_map, max_memory=args.max_memory,
                        offload_folder=args.offload_folder or _scratch("skipit-offload-"))


def _scratch(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _prepare(args, ranks: Ranks, plan_texts: Sequence[str] = ()):
    """Everything that can fail before a model loads: ``(plans, source, data)``."""
    _check_common(args, ranks)
    plans = [(text, parse_plan(text)) for text in plan_texts]
    source = _resolve(args.model)
    _check_depth(plans, source, args.model)
    return plans, source, _load_data(args.data, args.n)


def _progress(args, ranks: Ranks) -> bool:
    return ranks.is_main and not args.quiet


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ commands
def cmd_profile(args, ranks: Ranks) -> None:
    out = _check_out(args.out, (".npz", ".json"), "profiles")
    _, source, data = _prepare(args, ranks)
    index = shard(len(data), args.batch_size, ranks)
    mine = data[index]
    ck, partial, done = _checkpoint(args, ranks, data)
    device = ranks.device(args.device)
    t0 = time.perf_counter()
    with process_group(ranks, device):
        model, processor = _load_model(args, source, device)
        args.stage = "run"
        starts = batch_starts(len(mine), args.batch_size)
        bar = tqdm(total=len(starts), initial=done, desc=f"profile {data.name}", unit="batch", file=sys.stderr,
                   disable=not _progress(args, ranks))
        prof = _profile_batches(model, processor, mine, starts[done:], args, ck, partial, done, bar)
        bar.close()
        merged = gather_profile(prof, ranks)
    if not ranks.is_main:
        return
    _print_profile(merged)
    saved = f"; saved {_write_profile(merged, out)}" if out else ""
    resumed = f", resumed at batch {done}" if done else ""
    _say(f"skipit: profile of {merged.n_samples} samples of {data.name} ({len(batch_starts(len(data), args.batch_size))} "
         f"batches{resumed}, {ranks.world} process(es)) in {time.perf_counter() - t0:.1f} s{saved}")


def _checkpoint(args, ranks: Ranks, data):
    """``(Checkpoint | None, partial profile | None, batches done)`` for ``--checkpoint``."""
    if args.checkpoint is None:
        return None, None, 0
    identity = {"model": args.model, "data": args.data, "n": len(data), "batch_size": args.batch_size,
                "dtype": args.dtype, "device_map": args.device_map if isinstance(args.device_map, str) else
                json.dumps(args.device_map, sort_keys=True)}
    ck = Checkpoint(args.checkpoint, ranks, identity)
    ck.check_folder()
    partial, done = ck.load()
    return ck, partial, done


def _profile_batches(model, processor, data, starts: list[int], args, ck, prof, done: int, bar):
    """:func:`skipit_core.capture.profile` over the batches at ``starts``, merged into ``prof``; with a
    checkpoint, one pass per ``--checkpoint-every`` batches, each saved before the next."""
    def inputs(chunk):
        for s in chunk:
            yield encode(processor, data, s, min(s + args.batch_size, len(data)))
            bar.update(1)
    step = (args.checkpoint_every or 10) if ck else max(len(starts), 1)
    for i in range(0, len(starts), step):
        chunk = starts[i:i + step]
        part = profile(model, inputs(chunk))
        prof = part if prof is None else prof.merge(part)
        if ck is not None:
            ck.save(prof, done + i + len(chunk))
    return prof


def _profile_table(prof) -> dict[str, np.ndarray]:
    return {"d_vision": prof.mean_cos_dist("vision"), "d_text": prof.mean_cos_dist("text"),
            "VAR": prof.vision_attention("mean"), "VAR_uniform": prof.vision_attention("uniform")}


def _print_profile(prof) -> None:
    table = _profile_table(prof)
    print(f"{prof!r}\nlayer  " + "  ".join(f"{k:>11}" for k in table))
    for layer in range(prof.n_layers):
        print(f"{layer:>5}  " + "  ".join(f"{v[layer]:>11.5f}" for v in table.values()))


def _clean(obj: Any) -> Any:
    """JSON-ready: arrays to lists, non-finite floats to ``None``."""
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _write_profile(prof, path: Path) -> Path:
    """``.npz`` via :meth:`LayerProfile.save`; ``.json``: meta, every array (non-finite as null) and the
    per-layer summary the table shows."""
    if path.suffix.lower() == ".npz":
        return prof.save(path)
    doc = {"meta": prof.meta, "arrays": prof.arrays,
           "summary": {"layer": list(range(prof.n_layers)), **_profile_table(prof)}}
    path.write_text(json.dumps(_clean(doc), allow_nan=False))
    return path


def cmd_evaluate(args, ranks: Ranks) -> None:
    out = _check_out(args.out, (".json", ".parquet"), "evaluation results")
    plans, source, data = _prepare(args, ranks, args.plan or ["none"])
    index = shard(len(data), args.batch_size, ranks)
    mine = data[index]
    device = ranks.device(args.device)
    t0 = time.perf_counter()
    results = []
    with process_group(ranks, device):
        model, processor = _load_model(args, source, device)
        _fit(plans, model, args.model)
        args.stage = "run"
        for text, plan in plans:
            part = evaluate(model, processor, mine, plan, batch_size=args.batch_size, with_blank=args.blank,
                            progress=_progress(args, ranks))
            result = _gather_result(part, data, index, ranks)
            if ranks.is_main:
                print(f"{text:>32}: {result}", flush=True)
                results.append((text, plan, result))
    if ranks.is_main:
        saved = f"; saved {_write_eval(results, data, args, out)}" if out else ""
        _say(f"skipit: evaluated {len(plans)} plan(s) on {len(data)} items of {data.name} ({ranks.world} "
             f"process(es)) in {time.perf_counter() - t0:.1f} s{saved}")


def _gather_result(part, data, index: np.ndarray, ranks: Ranks):
    """The one-process :class:`EvalResult` of ``data`` from every rank's result on its items."""
    if not ranks.distributed:
        return part
    def whole(result, items):
        preds = gather_items(index, result.predictions, len(items), ranks)
        if preds is None:
            return None
        correct = np.array([p == normalize_answer(a) for p, a in zip(preds, items.answers)], dtype=bool)
        return summarise(list(items.families), correct, preds, result.confidence)
    result = whole(part, data)
    blank = whole(part.blank, data.blank()) if part.blank is not None else None
    if result is not None:
        result.blank = blank
    return result


def _eval_rows(results, data) -> list[dict]:
    rows = []
    for text, plan, result in results:
        for i in range(len(data)):
            row = dict(plan=text, plan_parsed=str(plan), index=i, family=data.families[i],
                       question=data.questions[i], answer=data.answers[i], prediction=result.predictions[i],
                       correct=bool(result.correct[i]))
            if result.blank is not None:
                row.update(blank_prediction=result.blank.predictions[i], blank_correct=bool(result.blank.correct[i]))
            rows.append(row)
    return rows


def _write_eval(results, data, args, path: Path) -> Path:
    """``.parquet``: one row per plan and item; ``.json``: per plan the summary and its items."""
    rows = _eval_rows(results, data)
    if path.suffix.lower() == ".parquet":
        pd.DataFrame(rows).to_parquet(path, engine="pyarrow", index=False)
        return path
    doc = {"model": args.model, "data": data.name, "n": len(data), "batch_size": args.batch_size, "results": [
        dict(plan=text, plan_parsed=str(plan), **result.to_dict(), items=[r for r in rows if r["plan"] == text])
        for text, plan, result in results]}
    path.write_text(json.dumps(_clean(doc), allow_nan=False, indent=1))
    return path


#: a realized speedup above this multiple of the FLOP-ideal one measures something else than the plan
#: (thread contention, a loaded machine, a first run paying for allocation)
SUSPECT_RATIO = 1.25


def speedup_line(text: str, base, timed, ideal: float) -> str:
    """One bench row: the timing under ``text``, realized and ideal speedup. A noisy timing
    (:attr:`skipit_core.bench.Timing.noisy`) or a speedup above ``SUSPECT_RATIO`` x the ideal one gets
    a warning on stderr and the row says not to read it."""
    if timed.warning:
        _say(f"skipit: warning: {timed.warning}")
    realized = base.median / timed.median
    ratio = realized / ideal
    row = f"{text:>32}: {timed}  speedup {realized:.2f}x (ideal {ideal:.2f}x, ratio {ratio:.2f})"
    if ratio > SUSPECT_RATIO:
        _say(f"skipit: warning: {text}: realized speedup {realized:.2f}x is above the FLOP bound {ideal:.2f}x: the "
             "timings measure something else (threads fighting over cores, a loaded machine); rerun with "
             "--threads 1 or on a quiet machine.")
        return row + "  [above the FLOP bound: do not read this speedup]"
    return row + ("  [noisy: do not read this speedup]" if base.noisy or timed.noisy else "")


def cmd_bench(args, ranks: Ranks) -> None:
    if ranks.distributed:
        raise InputError("bench times one process; run it without torchrun (processes would share the machine "
                         "and time each other).")
    plans, source, data = _prepare(args, ranks, args.plan or [])
    device = ranks.device(args.device)
    t0 = time.perf_counter()
    model, processor = _load_model(args, source, device)
    _fit(plans, model, args.model)
    args.stage = "run"
    inputs = encode(processor, data, 0, min(args.batch_size, len(data)))
    n_vision, n_text = prompt_tokens(model, inputs)
    bar = tqdm(total=1 + len(plans), desc="bench", unit="plan", file=sys.stderr, disable=not _progress(args, ranks))
    base = time_prefill(model, inputs, None, warmup=args.warmup, repeats=args.repeats)
    bar.update(1)
    if base.warning:
        _say(f"skipit: warning: {base.warning}")
    rows = [f"{'no skipping':>32}: {base}"]
    for text, plan in plans:
        timed = time_prefill(model, inputs, plan, warmup=args.warmup, repeats=args.repeats)
        rows.append(speedup_line(text, base, timed, ideal_speedup(model, n_vision, n_text, plan)))
        bar.update(1)
    bar.close()
    print("\n".join(rows))
    _say(f"skipit: timed {len(plans)} plan(s) and the baseline on a batch of {inputs['input_ids'].shape[0]} "
         f"in {time.perf_counter() - t0:.1f} s")


# --------------------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are :class:`InputError` (one line, exit 2 in :func:`main`)."""

    def error(self, message: str):  # type: ignore[override]
        raise InputError(f"{message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="skipit", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True, metavar="{profile,evaluate,bench}")
    for name, fn, helptext in (("profile", cmd_profile, "per-layer redundancy profile (torchrun: data parallel)"),
                               ("evaluate", cmd_evaluate, "accuracy with 95%% Wilson intervals under plans"),
                               ("bench", cmd_bench, "prefill time and FLOP speedup under plans")):
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.set_defaults(func=fn)
        _common(p)
        if name != "profile":
            p.add_argument("--plan", action="append", help="skip plan, e.g. 'early_exit(8)'; repeatable")
    prof, ev, be = (sub.choices[k] for k in ("profile", "evaluate", "bench"))
    prof.add_argument("--out", default=None, help="save the profile (.npz for LayerProfile.load, or .json)")
    prof.add_argument("--checkpoint", default=None, metavar="DIR", help="folder of resumable checkpoints")
    prof.add_argument("--checkpoint-every", type=_count(1), default=None, metavar="N",
                      help="write a checkpoint every N batches (default 10 with --checkpoint)")
    ev.add_argument("--out", default=None, help="save the results (.json, or .parquet with pyarrow)")
    ev.add_argument("--blank", action="store_true", help="also score blank images")
    be.add_argument("--repeats", type=_count(1), default=10, help="timed runs per plan (default 10)")
    be.add_argument("--warmup", type=_count(0), default=2, help="untimed runs first (default 2)")
    return ap


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="digits-llava", help="bundled name, local folder or HF id")
    p.add_argument("--data", default="digits", help="digits (default), a VQASet.save folder, or pope:PATH")
    p.add_argument("--n", "--n-items", dest="n", type=_count(1), default=None, metavar="N",
                   help="use the first N items (default: all); under torchrun write --n-items")
    p.add_argument("--batch-size", type=_count(1), default=32, help="items per forward pass (default 32)")
    p.add_argument("--dtype", choices=_DTYPES, default=None, help="weights dtype (default: the loader's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK if any, else cpu)")
    p.add_argument("--device-map", default=None, help="accelerate device map: auto, balanced, sequential or a .json")
    p.add_argument("--max-memory", default=None, help="with --device-map, e.g. '0=20GiB,cpu=60GiB'")
    p.add_argument("--offload-folder", default=None, help="with --device-map: where disk-offloaded weights go")
    p.add_argument("--threads", type=_count(1), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv``; returns the exit status (2 for any :class:`SkipitError`)."""
    args = argparse.Namespace(stage="preflight")
    ranks = Ranks()
    try:
        ranks = Ranks.from_env()
        args = _parser().parse_args(argv, namespace=args)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        args.func(args, ranks)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except KeyboardInterrupt:
        _say("skipit: interrupted" + (" (rerun the same command to resume from --checkpoint)"
                                      if getattr(args, "checkpoint", None) else ""))
        return 130
    except SkipitError as exc:
        if ranks.is_main or args.stage == "run":  # the same pre-flight error on every rank: say it once
            who = f"[rank {ranks.rank}] " if ranks.distributed and args.stage == "run" else ""
            _say(f"skipit: error: {who}{' '.join(str(exc).split())}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
