"""``skipit``: profile, evaluate and benchmark a VLM from the shell, over the library's functions.

    skipit profile  --model digits-llava --n-samples 256 --out profile.npz
    skipit evaluate --model digits-llava --plan none --plan "early_exit(8)" --plan "late_entry(2)"
    skipit bench    --model digits-llava --plan "late_entry(2) | early_exit(10)"

``--model`` is a bundled model name (``digits-llava``, ``digits-qwen2vl``), a local folder or a Hugging
Face id. Plans are written as in Python: ``none``, ``early_exit(k)``, ``late_entry(k)``,
``vision_freeze(a-b)``, ``whole_layers(3,4,7)``, combined with ``|``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence


from .errors import InputError, SkipitError

__all__ = ["main", "parse_plan"]

_TERM = re.compile(r"^\s*(none|early_exit|late_entry|vision_freeze|whole_layers)\s*(?:\(([^)]*)\))?\s*$")


def _layers(arg: str) -> list[int]:
    """``"3-6, 9"`` -> ``[3, 4, 5, 6, 9]`` (ranges inclusive)."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in arg.split(","))):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def parse_plan(text: str):
    """A :class:`~skipit_core.skip.SkipPlan` from its written form, e.g. ``"late_entry(2) | early_exit(10)"``."""
    from .skip import SkipPlan

    plan = SkipPlan.none()
    for term in text.split("|"):
        match = _TERM.match(term)
        if match is None:
            raise InputError(f"cannot read plan term {term.strip()!r}; write none, early_exit(k), late_entry(k), "
                             "vision_freeze(a-b) or whole_layers(i,j,...), joined with |.")
        kind, arg = match.group(1), (match.group(2) or "").strip()
        if kind == "none":
            continue
        if not arg:
            raise InputError(f"plan term {kind} needs an argument, e.g. {kind}(4).")
        try:
            value = int(arg) if kind in ("early_exit", "late_entry") else _layers(arg)
        except ValueError as exc:
            raise InputError(f"plan term {term.strip()!r}: {arg!r} is not a layer index or range.") from exc
        plan = plan | getattr(SkipPlan, kind)(value)
    return plan


def _data(args, processor):
    from .tasks import DigitScenes

    data = DigitScenes.test_set()
    return data if args.n is None else data[: args.n]


def cmd_profile(args) -> None:
    from .capture import profile
    from .tasks import batches
    from .zoo import load_vlm

    model, processor = load_vlm(args.model)
    prof = profile(model, batches(processor, _data(args, processor), args.batch_size))
    table = {"d_vision": prof.mean_cos_dist("vision"), "d_text": prof.mean_cos_dist("text"),
             "VAR": prof.vision_attention("mean"), "VAR_uniform": prof.vision_attention("uniform")}
    print(f"{prof!r}\nlayer  " + "  ".join(f"{k:>11}" for k in table))
    for layer in range(prof.n_layers):
        print(f"{layer:>5}  " + "  ".join(f"{v[layer]:>11.5f}" for v in table.values()))
    if args.out:
        print(f"saved {prof.save(args.out)}")


def cmd_evaluate(args) -> None:
    from .tasks import evaluate
    from .zoo import load_vlm

    model, processor = load_vlm(args.model)
    data = _data(args, processor)
    for text in args.plan or ["none"]:
        result = evaluate(model, processor, data, parse_plan(text), batch_size=args.batch_size,
                          with_blank=args.blank)
        print(f"{text:>32}: {result}")


def cmd_bench(args) -> None:
    from .bench import ideal_speedup, prompt_tokens, time_prefill
    from .tasks import batches
    from .zoo import load_vlm

    model, processor = load_vlm(args.model)
    inputs = next(batches(processor, _data(args, processor), args.batch_size))
    n_vision, n_text = prompt_tokens(model, inputs)
    base = time_prefill(model, inputs, None, repeats=args.repeats)
    print(f"{'no skipping':>32}: {base}")
    for text in args.plan or []:
        plan = parse_plan(text)
        timed = time_prefill(model, inputs, plan, repeats=args.repeats)
        ideal = ideal_speedup(model, n_vision, n_text, plan)
        realized = base.median / timed.median
        print(f"{text:>32}: {timed}  speedup {realized:.2f}x (ideal {ideal:.2f}x, ratio {realized / ideal:.2f})")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="skipit", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name, fn, helptext in (("profile", cmd_profile, "per-layer redundancy profile"),
                               ("evaluate", cmd_evaluate, "accuracy with 95% Wilson intervals under plans"),
                               ("bench", cmd_bench, "prefill time and FLOP speedup under plans")):
        p = sub.add_parser(name, help=helptext)
        p.set_defaults(func=fn)
        p.add_argument("--model", default="digits-llava", help="bundled name, local folder or HF id")
        p.add_argument("--n", type=int, default=None, help="number of DigitScenes test items (default: all)")
        p.add_argument("--batch-size", type=int, default=32)
        if name != "profile":
            p.add_argument("--plan", action="append", help="skip plan, e.g. 'early_exit(8)'; repeatable")
    sub.choices["profile"].add_argument("--out", default=None, help="save the profile (.npz)")
    sub.choices["evaluate"].add_argument("--blank", action="store_true", help="also score blank images")
    sub.choices["bench"].add_argument("--repeats", type=int, default=10)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.func(args)
    except SkipitError as exc:
        print(f"skipit: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
