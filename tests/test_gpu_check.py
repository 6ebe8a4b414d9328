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
    assert result["elapsed_s"]["total"] < 120
