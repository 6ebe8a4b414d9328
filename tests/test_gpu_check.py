"""benchmarks/gpu_check.py, the prepared GPU check, run end to end on the CPU (``--device cpu --small``) so
that it cannot rot before a GPU runs it: every plan kind timed at batch 1 and 8 in prefill and decode,
the least-work and masking rows, the cache-equality checks, and the JSON it writes."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
KINDS = {"early_exit", "late_entry", "band", "vision_freeze", "whole_layers"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny tensors: one thread (see conftest.py)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--small", "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_every_plan_kind_at_both_batches_in_prefill_and_decode(run):
    result, _ = run
    rows = result["rows"]
    for batch in (1, 8):
        for phase in ("prefill", "decode"):
            here = [r for r in rows if r["batch"] == batch and r["phase"] == phase]
            assert {r["plan_kind"] for r in here if r["method"] == "skipit"} == KINDS, (batch, phase)
            assert here[0]["method"] == "none" and here[0]["name"] == "baseline"
        prefill = {r["method"] for r in rows if r["batch"] == batch and r["phase"] == "prefill"}
        assert {"reference", "masking"} <= prefill  # least work by hand, the masking shortcut
        assert ("nnsight" in prefill) == (importlib.util.find_spec("nnsight") is not None)
    if importlib.util.find_spec("nnsight") is None:
        assert any("nnsight" in s["row"] and "not importable" in s["reason"] for s in result["skipped"])


@pytest.mark.slow
def test_ratios_finite_positive_and_ideal_at_least_one(run):
    result, _ = run
    for r in result["rows"]:
        scopes = ("token",) if r["phase"] == "decode" else ("wall", "decoder")
        if r["method"] == "reference":
            scopes = ("decoder",)  # the by-hand loops are decoder-only
            assert r["skipit_decoder_over_least_work"] > 0
        assert math.isfinite(r["ideal"]) and r["ideal"] > 0
        if r["plan_kind"] != "none":  # the plan removes work
            assert r["ideal"] >= 1.0
            if r["phase"] == "prefill":
                assert r["ideal"] > 1.0
        for scope in scopes:
            timing, speed = r[f"{scope}_ms"], r[f"speedup_{scope}"]
            assert timing["n"] >= 2 and timing["median"] > 0 and timing["iqr"] >= 0
            assert isinstance(timing["noisy"], bool) and (timing["warning"] is None) == (not timing["noisy"])
            assert speed["low"] <= speed["median"] <= speed["high"]
            for x in (speed["median"], speed["low"], speed["high"], r[f"realized_over_ideal_{scope}"]):
                assert math.isfinite(x) and x > 0


@pytest.mark.slow
def test_generate_with_cache_equals_no_cache_under_every_plan(run):
    result, stdout = run
    checks = result["checks"]
    assert {c["plan_kind"] for c in checks} == KINDS | {"none"}
    assert {c["plan"] for c in checks} == {r["plan"] for r in result["rows"] if r["method"] in ("none", "skipit")}
    assert all(c["equal"] is True for c in checks)
    assert all(c["dtype"] == "float32" and c["max_logit_diff"] < 1e-3 for c in checks)
    assert stdout.count("generate with cache == without: True") == len(checks)


@pytest.mark.slow
def test_metadata_and_printed_table(run):
    result, stdout = run
    assert result["device"]["type"] == "cpu" and result["device"]["name"] and result["cuda_measured"] is False
    assert result["versions"]["torch"] and result["versions"]["transformers"]
    assert result["date"][:2] == "20" and "T" in result["date"]
    assert result["model"]["size"] == "small" and result["model"]["dtype"] == "bfloat16"
    printed = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert printed == result["table"].splitlines()[:1] + result["table"].splitlines()[2:]
    assert len(printed) == 1 + len(result["rows"])
    assert all(line.replace("\\|", "").count("|") == 13 for line in printed)  # 12 columns, composed plans too
    assert result["elapsed_s"]["total"] < 120


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # dataclasses look their module up while it loads
    spec.loader.exec_module(sys.modules["gpu_check"])
    return sys.modules["gpu_check"]


def test_size_is_chosen_from_free_device_memory(monkeypatch):
    """No GPU here: mem_get_info is faked. An H200 (139 GiB free) gets the 7B proportions, a 24 GiB card the
    8-layer model of the same width, a card too small for any size a clear exit."""
    import torch

    gc = _gpu_check_module()
    cuda = torch.device("cuda")
    need_7b = gc.bytes_needed("llava-1.5-7b", torch.bfloat16, nnsight=True)
    assert 30 * gc.GIB < need_7b < 45 * gc.GIB  # 7.06 B parameters: bf16 x 2 (nnsight copy) or bf16 + fp32
    for free, size in ((139, "llava-1.5-7b"), (24, "7b-width-8-layers"), (12, "2048x16")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, f=free: (f * gc.GIB, 141 * gc.GIB))
        assert gc.choose_size(cuda, torch.bfloat16, small=False, nnsight=True)[0] == size
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * gc.GIB, 8 * gc.GIB))
    with pytest.raises(SystemExit, match="not enough device memory"):
        gc.choose_size(cuda, torch.bfloat16, small=False, nnsight=False)
    assert gc.choose_size(cuda, torch.bfloat16, small=True, nnsight=True)[0] == "small"


def test_cuda_timing_synchronises_only_around_the_call(monkeypatch):
    """Fake CUDA events log the order of calls: a timed row (and the decoder clock's hooks inside it)
    records events without synchronising; the only synchronises are just before and just after the call."""
    import torch

    gc = _gpu_check_module()
    ss = gc.ss
    log: list[str] = []

    class Event:
        def __init__(self, enable_timing: bool = False):
            assert enable_timing
            self.t = None

        def record(self):
            self.t = len(log)
            log.append("record")

        def elapsed_time(self, end):
            assert log[-1] == "sync", "events read before the closing synchronise"
            return float(end.t - self.t)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    cuda = torch.device("cuda")

    class Clock(ss.DecoderClock):  # the hooks' part without a model
        def __init__(self):
            self.device, self._start, self._end_mark = cuda, None, None

    clock = Clock()

    def run():
        log.append("embed")
        clock._begin(None, ())
        log.append("decoder")
        clock._end(None, (), None)
        log.append("head")

    row = ss.Row("x", "skipit", gc.SkipPlan.none(), run, clock)
    wall, decoder = ss.timed(row)
    assert log == ["sync", "record", "embed", "record", "decoder", "record", "head", "record", "sync"]
    assert (wall, decoder) == (6.0, 2.0)  # event indices in the log: 1 -> 7 and 3 -> 5
    log.clear()
    bare = ss.Row("y", "reference", gc.SkipPlan.none(), lambda: log.append("run"), None, cuda)
    assert ss.timed(bare)[1] == 2.0 and log == ["sync", "record", "run", "record", "sync"]
