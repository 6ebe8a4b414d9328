"""skipit_core.cli: every bad input is one line on stderr and exit 2, checked before any model loads;
--data / --out formats, progress and summary, resumable profiles (a real subprocess killed with SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import transformers

from skipit_core import bench, cli, zoo
from skipit_core.capture import LayerProfile
from skipit_core.errors import InputError, PlanError
from skipit_core.skip import SkipPlan

FIXTURES = Path(__file__).parent / "fixtures"
SRC = Path(__file__).resolve().parents[1] / "src"


def run(argv, capsys) -> tuple[int, str, str]:
    """``skipit argv`` in this process: exit code, stdout, stderr (a traceback fails the test)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: the checks must come first."""
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")
    monkeypatch.setattr(zoo, "load_vlm", boom)
    monkeypatch.setattr(zoo, "load_tiny_vlm", boom)
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", boom)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("skipit: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------------------ --help
@pytest.mark.parametrize("argv", [["--help"], ["profile", "--help"], ["evaluate", "--help"], ["bench", "--help"]])
def test_help_of_every_subcommand_exits_0(argv, capsys):
    code, out, _ = run(argv, capsys)
    assert code == 0 and "usage: skipit" in out


def test_docstring_names_real_options():
    assert "--n-samples" not in cli.__doc__
    for option in ("--n ", "--data", "--out", "torchrun"):
        assert option in cli.__doc__


# -------------------------------------------------------------------------------------- parse_plan
BAD_PLANS = ["whole_layers(5-3)", "vision_freeze(4-2)", "whole_layers(3-)", "whole_layers(-3)", "", "   ",
             "early_exit(2)(3)", "early_exit(\u0663)", "early_exit(３)", "early_exit\uff083\uff09",
             "whole_layers(1,,2)", "whole_layers(,)", "early_exit()", "none(3)", "early_exit(3) || late_entry(1)",
             "early_exit(3) |", "Early_Exit(3)", "early_exit(-1)", "early_exit(1.5)", "early_exit(0x3)",
             "late_entry(3) | late_entry(4)", "whole_layers(2) | vision_freeze(2)", "late_entry(4) | early_exit(2)",
             "early_exit 3", "skip(3)", "early_exit(3", "whole_layers(1-2-3)"]


@pytest.mark.parametrize("text", BAD_PLANS)
def test_bad_plans_raise(text):
    with pytest.raises((InputError, PlanError)) as info:
        cli.parse_plan(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, want", [
    ("none", SkipPlan.none()), ("none()", SkipPlan.none()), ("early_exit(8)", SkipPlan.early_exit(8)),
    ("late_entry(2) | early_exit(10)", SkipPlan.late_entry(2) | SkipPlan.early_exit(10)),
    (" vision_freeze( 3 - 5 ) ", SkipPlan.vision_freeze([3, 4, 5])),
    ("whole_layers(3,4,7)", SkipPlan.whole_layers([3, 4, 7])), ("whole_layers(1-2, 5)", SkipPlan.whole_layers([1, 2, 5])),
    ("whole_layers(4-4)", SkipPlan.whole_layers(4)), ("none | early_exit(3)", SkipPlan.early_exit(3)),
])
def test_good_plans_parse(text, want):
    assert cli.parse_plan(text) == want
    assert cli.parse_plan(str(want)) == want  # the printed form reads back


def test_plan_typo_suggests_the_name():
    with pytest.raises(InputError, match="early_exit"):
        cli.parse_plan("erly_exit(3)")


# ------------------------------------------------------------------- exit 2, one line, no model loaded
BAD_ARGS = [
    ["evaluate", "--plan", "whole_layers(5-3)"],
    ["evaluate", "--plan", "vision_freeze(4-2)"],
    ["evaluate", "--plan", "whole_layers(3-)"],
    ["evaluate", "--plan", ""],
    ["evaluate", "--plan", "early_exit(2)(3)"],
    ["evaluate", "--plan", "early_exit(\u0663)"],
    ["bench", "--plan", "late_entry(4) | early_exit(2)"],
    ["evaluate", "--n", "-836"],
    ["evaluate", "--n", "0"],
    ["evaluate", "--n", "abc"],
    ["evaluate", "--n", "1.5"],
    ["evaluate", "--n", "\u0663"],
    ["evaluate", "--n", "100000"],
    ["bench", "--n", "0"],
    ["profile", "--batch-size", "0"],
    ["profile", "--batch-size", "-3"],
    ["bench", "--repeats", "0"],
    ["bench", "--repeats", "-1"],
    ["bench", "--warmup", "-1"],
    ["profile", "--out", "missing/dir/p.npz"],
    ["profile", "--out", "p.txt"],
    ["profile", "--out", "."],
    ["evaluate", "--out", "r.csv"],
    ["profile", "--model", "digits-lava"],
    ["profile", "--model", "/does/not/exist"],
    ["profile", "--model", "no-such-org/no-such-model"],
    ["profile", "--model", ""],
    ["profile", "--model", "digits-llav\u0430"],  # Cyrillic a: huggingface_hub rejects the id
    ["profile", "--model", "~no-such-user-xyz/model"],
    ["profile", "--model", "/"],
    ["profile", "--data", "digitz"],
    ["profile", "--data", "pope:/does/not/exist.jsonl"],
    ["profile", "--data", "pope:"],
    ["profile", "--checkpoint-every", "0", "--checkpoint", "ck"],
    ["profile", "--checkpoint-every", "3"],
    ["profile", "--device-map", "everywhere"],
    ["profile", "--max-memory", "cpu=1GiB"],
    ["profile", "--device-map", "auto", "--max-memory", "cpu=lots"],
    ["profile", "--dtype", "float8"],
    ["profile", "--device", "tpu"],
    ["profile", "--unknown-flag"],
    ["bench", "--threads", "0"],
    [],
]


@pytest.mark.parametrize("argv", BAD_ARGS, ids=lambda a: " ".join(a) or "no command")
def test_bad_input_is_one_line_exit_2_before_loading(argv, capsys, no_model_load, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(argv, capsys)
    assert code == 2
    one_error_line(err)


def test_unknown_model_lists_the_bundled_names(capsys, no_model_load):
    t0 = time.perf_counter()
    code, _, err = run(["profile", "--model", "digits-lava"], capsys)
    line = one_error_line(err)
    assert code == 2 and time.perf_counter() - t0 < 5
    assert all(name in line for name in zoo.MODELS)


def test_folder_without_config_and_file_as_checkpoint(capsys, no_model_load, tmp_path):
    code, _, err = run(["profile", "--model", tmp_path], capsys)
    assert code == 2 and "config.json" in one_error_line(err)
    (tmp_path / "file").write_text("x")
    code, _, err = run(["profile", "--checkpoint", tmp_path / "file"], capsys)
    assert code == 2 and "folder" in one_error_line(err)


def test_damaged_data_and_read_only_out(capsys, no_model_load, tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    (tmp_path / "bad.jsonl").write_text("{}\n")
    code, _, err = run(["profile", "--data", tmp_path / "bad"], capsys)
    assert code == 2 and "cannot read" in one_error_line(err)
    rows = tmp_path / "pope.jsonl"
    rows.write_text(json.dumps({"image": "missing.png", "question": "Is it?", "answer": "yes"}) + "\n")
    code, _, err = run(["evaluate", "--data", f"pope:{rows}"], capsys)
    assert code == 2 and "missing.png" in one_error_line(err)
    rows.write_text("")
    code, _, err = run(["evaluate", "--data", f"pope:{rows}"], capsys)
    assert code == 2
    one_error_line(err)
    if os.geteuid() != 0:  # root writes anyway
        (tmp_path / "ro.npz").write_bytes(b"")
        (tmp_path / "ro.npz").chmod(0o444)
        code, _, err = run(["profile", "--out", tmp_path / "ro.npz"], capsys)
        assert code == 2 and "read-only" in one_error_line(err)


def test_missing_out_dir_named_with_the_fix(capsys, no_model_load, tmp_path):
    code, _, err = run(["profile", "--out", tmp_path / "missing" / "dir" / "p.npz"], capsys)
    assert code == 2 and "mkdir" in one_error_line(err)


@pytest.mark.parametrize("argv", [["bench"], ["profile", "--n", "3", "--batch-size", "1"],
                                  ["evaluate", "--n", "2", "--batch-size", "1"]])
def test_world_size_checks_before_loading(argv, capsys, no_model_load, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    code, _, err = run(argv, capsys)
    assert code == 2
    one_error_line(err)


def test_only_rank_0_reports_a_preflight_error(capsys, no_model_load, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    code, _, err = run(["profile", "--n", "2"], capsys)
    assert code == 2 and err == ""


def test_plan_deeper_than_the_model_exits_2_before_loading(capsys, no_model_load):
    for plan in ("early_exit(99)", "whole_layers(12)", "vision_freeze(3-40)"):
        code, _, err = run(["evaluate", "--n", "2", "--plan", plan], capsys)
        assert code == 2 and "12 layers" in one_error_line(err)


# ------------------------------------------------------------------------------------- bench noise
def test_bench_warns_when_a_timing_is_too_noisy(capsys):
    quiet = bench.Timing("prefill none()", (10.0, 10.1, 10.2, 10.1, 9.9), "cpu")
    noisy = bench.Timing("prefill early_exit(6)", (2.0, 9.0, 3.0, 20.0, 4.0, 30.0), "cpu")
    assert noisy.iqr > noisy.median and noisy.noisy and not quiet.noisy
    line = cli.speedup_line("early_exit(6)", quiet, noisy, ideal=2.0)
    _, err = capsys.readouterr()
    assert "noisy" in line and "skipit: warning:" in err and "prefill early_exit(6)" in err
    assert "noisy" not in cli.speedup_line("x", quiet, quiet, ideal=1.0)
    capsys.readouterr()
    fast = bench.Timing("prefill late_entry(2)", (0.5, 0.5, 0.5), "cpu")  # 20x from a plan worth 1.4x
    line = cli.speedup_line("late_entry(2)", quiet, fast, ideal=1.4)
    assert "do not read" in line and "FLOP bound" in capsys.readouterr().err


# ---------------------------------------------------------------------------- end to end on digits
def test_profile_writes_npz_and_json_with_summary(capsys, tmp_path):
    code, out, err = run(["profile", "--n", "4", "--batch-size", "2", "--out", tmp_path / "p.npz"], capsys)
    assert code == 0, err
    prof = LayerProfile.load(tmp_path / "p.npz")
    assert prof.n_samples == 4 and prof.n_layers == 12
    assert "profile" in err and "4 samples" in err.strip().splitlines()[-1]  # progress + summary on stderr
    code, _, err = run(["profile", "--n", "4", "--batch-size", "2", "--out", tmp_path / "p.json"], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["meta"]["n_layers"] == 12 and doc["arrays"]["n_samples"] == 4
    np.testing.assert_allclose(np.array(doc["summary"]["d_vision"], dtype=float), prof.mean_cos_dist("vision"))


def test_evaluate_pope_fixture_and_outputs(capsys, tmp_path):
    data = f"pope:{FIXTURES / 'pope' / 'pope.jsonl'}"
    code, out, err = run(["evaluate", "--data", data, "--plan", "none", "--plan", "early_exit(6)",
                          "--batch-size", "2", "--out", tmp_path / "r.json"], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [r["plan"] for r in doc["results"]] == ["none", "early_exit(6)"]
    assert all(r["n"] == 3 and len(r["items"]) == 3 for r in doc["results"])
    assert "early_exit(6)" in out and "3 items" in err.strip().splitlines()[-1]
    pytest.importorskip("pyarrow")
    code, _, err = run(["evaluate", "--data", data, "--batch-size", "2", "--out", tmp_path / "r.parquet"], capsys)
    assert code == 0, err
    import pandas as pd

    table = pd.read_parquet(tmp_path / "r.parquet")
    assert len(table) == 3 and set(table["answer"]) <= {"yes", "no"} and table["correct"].dtype == bool


def test_evaluate_reads_a_frozen_folder(capsys, tmp_path):
    from skipit_core.tasks import DigitScenes

    DigitScenes.freeze(DigitScenes.test_set()[:3], tmp_path / "set" / "mine")
    code, out, err = run(["evaluate", "--data", tmp_path / "set", "--batch-size", "3"], capsys)
    assert code == 0, err and "n=3" in out


# --------------------------------------------------------------------------------------- resumable
def _profile_cmd(ck: Path, out: Path, n: int = 24) -> list[str]:
    return [sys.executable, "-m", "skipit_core.cli", "profile", "--n", str(n), "--batch-size", "1",
            "--checkpoint", str(ck), "--checkpoint-every", "1", "--out", str(out), "--quiet"]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def _batches_done(ck: Path) -> int:
    files = list(ck.glob("*.npz"))
    if not files:
        return 0
    try:
        return LayerProfile.load(files[0]).meta["checkpoint"]["batches_done"]
    except Exception:  # noqa: BLE001 - a file being replaced: read it next time
        return 0


def assert_same_profile(a: LayerProfile, b: LayerProfile, rtol: float) -> float:
    """Integer arrays equal, float arrays within ``rtol``; returns the largest absolute difference."""
    assert set(a.arrays) == set(b.arrays)
    worst = 0.0
    for key, x in a.arrays.items():
        y = b.arrays[key]
        if np.issubdtype(x.dtype, np.integer):
            np.testing.assert_array_equal(x, y, err_msg=key)
        else:
            np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol, err_msg=key)
            finite = np.isfinite(x)
            worst = max(worst, float(np.abs(x[finite] - y[finite]).max(initial=0.0)))
    return worst


@pytest.mark.slow
def test_profile_killed_with_sigkill_resumes_without_double_counting(tmp_path, capsys):
    ck, out = tmp_path / "ck", tmp_path / "resumed.npz"
    proc = subprocess.Popen(_profile_cmd(ck, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while _batches_done(ck) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = _batches_done(ck)
    assert 3 <= done < 24 and not out.exists()
    resumed = subprocess.run(_profile_cmd(ck, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed at batch {done}" in resumed.stderr
    code, _, err = run(["profile", "--n", "24", "--batch-size", "1", "--out", tmp_path / "full.npz"], capsys)
    assert code == 0, err
    whole, again = LayerProfile.load(tmp_path / "full.npz"), LayerProfile.load(out)
    assert again.n_samples == 24 and "checkpoint" not in again.meta
    assert_same_profile(whole, again, rtol=1e-9)
    # the same folder with other arguments is refused
    code, _, err = run(["profile", "--n", "24", "--batch-size", "2", "--checkpoint", ck], capsys)
    assert code == 2 and "--batch-size" in one_error_line(err)
