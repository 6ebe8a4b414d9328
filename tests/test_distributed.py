"""skipit_core.distributed and the CLI under torchrun (2 CPU processes, gloo) and accelerate offloading.

Real torch.distributed (``python -m torch.distributed.run``), real accelerate hooks (weights offloaded
to disk and replaced by ``meta`` tensors in place), no mocks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from skipit_core import cli
from skipit_core.capture import LayerProfile, profile
from skipit_core.distributed import Checkpoint, Ranks, batch_starts, execution_device, shard
from skipit_core.errors import InputError
from skipit_core.skip import SkipPlan, skipping
from skipit_core.tasks import DigitScenes, batches, evaluate
from skipit_core.zoo import load_vlm, model_path
from test_cli import assert_same_profile, run

SRC = Path(__file__).resolve().parents[1] / "src"
PLANS = [SkipPlan.none(), SkipPlan.early_exit(5), SkipPlan.late_entry(2), SkipPlan.vision_freeze([3, 4, 9]),
         SkipPlan.whole_layers([4, 10]),
         SkipPlan.late_entry(1) | SkipPlan.early_exit(8) | SkipPlan.vision_freeze(3) | SkipPlan.whole_layers(5)]


# ----------------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("n, batch, world", [(9, 2, 2), (8, 2, 2), (24, 4, 3), (5, 5, 1), (7, 1, 7)])
def test_shard_deals_whole_batches_strided_and_covers_every_item_once(n, batch, world):
    parts = [shard(n, batch, Ranks(r, world)) for r in range(world)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))
    starts = batch_starts(n, batch)
    for r, part in enumerate(parts):  # rank r holds batches r, r + W, ... of the one-process run, in order
        want = [i for s in starts[r::world] for i in range(s, min(s + batch, n))]
        assert part.tolist() == want


def test_more_processes_than_batches_is_an_input_error():
    with pytest.raises(InputError, match="at most 2 process"):
        shard(3, 2, Ranks(0, 4))


def test_ranks_from_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert Ranks.from_env() == Ranks(1, 2, 1, 2)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(InputError, match="torchrun"):
        Ranks.from_env()


def test_checkpoint_is_refused_for_other_arguments(tmp_path):
    model, processor = load_vlm("digits-llava", device="cpu")
    prof = profile(model, batches(processor, DigitScenes.test_set()[:2], 2))
    ck = Checkpoint(tmp_path, Ranks(), {"batch_size": 2, "n": 2})
    ck.check_folder()
    ck.save(prof, 1)
    again, done = Checkpoint(tmp_path, Ranks(), {"batch_size": 2, "n": 2}).load()
    assert done == 1 and "checkpoint" not in again.meta
    assert_same_profile(prof, again, rtol=0)
    with pytest.raises(InputError, match="--batch-size"):
        Checkpoint(tmp_path, Ranks(), {"batch_size": 4, "n": 2}).load()
    with pytest.raises(InputError, match="another number of processes"):
        Checkpoint(tmp_path, Ranks(0, 2), {"batch_size": 2, "n": 2}).check_folder()
    assert not list(tmp_path.glob("*.tmp*"))  # the temporary file was renamed away


# ---------------------------------------------------------------------------------------- torchrun
def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "skipit_core.cli", *args, "--quiet"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_gloo_processes_give_one_process_profile_and_evaluation(tmp_path, capsys):
    common = ["--n-items", "9", "--batch-size", "2"]  # (torchrun reads a bare --n as its own) 5 batches: rank 0 takes 3 (with the short one), rank 1 two
    two = _torchrun(["profile", *common, "--out", "p2.npz", "--checkpoint", "ck", "--checkpoint-every", "2"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stderr and two.stdout.count("LayerProfile") == 1  # rank 0 alone prints
    assert sorted(p.name for p in (tmp_path / "ck").glob("*.npz")) == ["profile-rank0-of-2.npz",
                                                                        "profile-rank1-of-2.npz"]
    code, _, err = run(["profile", *common, "--out", tmp_path / "p1.npz", "--quiet"], capsys)
    assert code == 0, err
    one, both = LayerProfile.load(tmp_path / "p1.npz"), LayerProfile.load(tmp_path / "p2.npz")
    assert both.n_samples == 9
    worst = assert_same_profile(one, both, rtol=1e-6)
    with capsys.disabled():
        print(f"\nmax |1-process - 2-process| over the profile arrays: {worst:.3g}")

    plans = ["--plan", "none", "--plan", "early_exit(6)", "--plan", "vision_freeze(2-4) | whole_layers(9)"]
    two = _torchrun(["evaluate", *common, *plans, "--blank", "--out", "e2.json"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    code, _, err = run(["evaluate", *common, *plans, "--blank", "--out", tmp_path / "e1.json", "--quiet"], capsys)
    assert code == 0, err
    e1, e2 = (json.loads((tmp_path / f).read_text()) for f in ("e1.json", "e2.json"))
    assert e1["results"] == e2["results"]  # every item, prediction, count and interval


def test_world_size_above_the_data_exits_2_with_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(SRC), HF_HUB_OFFLINE="1", WORLD_SIZE="4", RANK="0", LOCAL_RANK="0")
    out = subprocess.run([sys.executable, "-m", "skipit_core.cli", "evaluate", "--n", "3"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "at most 1 process" in out.stderr


# -------------------------------------------------------------------------------------- accelerate
def _offloaded(name: str, tmp_path: Path, on_disk=(3, 4, 9)):
    """``name`` dispatched by accelerate: decoder layers ``on_disk`` offloaded to ``tmp_path`` (their
    parameters are ``meta``; hooks load them for each call), everything else on the CPU."""
    from transformers import AutoModelForImageTextToText

    path = model_path(name)
    model, processor = load_vlm(name, device="cpu")
    prefix = "model.language_model.layers"
    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "lm_head": "cpu",
                  "model.language_model.embed_tokens": "cpu", "model.language_model.norm": "cpu",
                  "model.language_model.rotary_emb": "cpu"}
    if name == "digits-qwen2vl":
        device_map = {k.replace("model.vision_tower", "model.visual"): v for k, v in device_map.items()
                      if "projector" not in k}
    device_map.update({f"{prefix}.{i}": "disk" if i in on_disk else "cpu" for i in range(12)})
    dispatched = AutoModelForImageTextToText.from_pretrained(path, device_map=device_map, offload_folder=tmp_path,
                                                             dtype=torch.float32).eval()
    assert dispatched.model.language_model.layers[on_disk[0]].mlp.up_proj.weight.device.type == "meta"
    return model, dispatched, processor


@pytest.mark.parametrize("name", ["digits-llava", "digits-qwen2vl"])
def test_offloaded_model_profiles_and_skips_as_the_plain_one(name, tmp_path):
    plain, dispatched, processor = _offloaded(name, tmp_path)
    data = DigitScenes.test_set()[:6]
    worst = assert_same_profile(profile(plain, batches(processor, data, 3)),
                                profile(dispatched, batches(processor, data, 3)), rtol=1e-6)
    inputs = next(batches(processor, data, 3))
    gaps = {}
    for plan in PLANS:
        with torch.no_grad():
            with skipping(plain, plan):
                want = plain(**inputs).logits
                want_gen = plain.generate(**inputs, max_new_tokens=3, do_sample=False)
            with skipping(dispatched, plan):
                got = dispatched(**inputs).logits
                got_gen = dispatched.generate(**inputs, max_new_tokens=3, do_sample=False)
        gaps[str(plan)] = float((want - got).abs().max())
        assert gaps[str(plan)] <= 1e-6 and torch.equal(want_gen, got_gen), plan
        a = evaluate(plain, processor, data, plan, batch_size=3)
        b = evaluate(dispatched, processor, data, plan, batch_size=3)
        assert a.predictions == b.predictions
    print(f"{name}: max profile gap {worst:.3g}; max logit gap per plan {gaps}")


def test_fully_offloaded_model_profiles(tmp_path):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_path("digits-llava"), device_map={"": "disk"},
                                                        offload_folder=tmp_path, dtype=torch.float32).eval()
    assert execution_device(model) == torch.device("cpu")
    plain, processor = load_vlm("digits-llava", device="cpu")
    data = DigitScenes.test_set()[:2]
    got, want = profile(model, batches(processor, data, 2)), profile(plain, batches(processor, data, 2))
    assert np.allclose(got.mean_cos_dist("vision"), want.mean_cos_dist("vision"), atol=1e-6, rtol=0)
    assert np.allclose(got.vision_attention(), want.vision_attention(), atol=1e-6, rtol=0)


def test_cli_device_map_auto_with_disk_offload_matches_the_plain_run(tmp_path, capsys, caplog):
    common = ["profile", "--n", "4", "--batch-size", "2", "--quiet"]
    code, _, err = run([*common, "--out", tmp_path / "plain.npz"], capsys)
    assert code == 0, err
    code, _, err = run([*common, "--device-map", "auto", "--max-memory", "cpu=3MB", "--offload-folder",
                        tmp_path / "off", "--out", tmp_path / "off.npz"], capsys)
    assert code == 0, err
    assert "meta device because they were offloaded" in caplog.text and "disk" in caplog.text  # accelerate offloaded
    assert_same_profile(LayerProfile.load(tmp_path / "plain.npz"), LayerProfile.load(tmp_path / "off.npz"), 1e-6)
    code, out, err = run(["evaluate", "--n", "4", "--batch-size", "2", "--quiet", "--device-map", "auto",
                          "--max-memory", "cpu=3MB", "--plan", "early_exit(6)", "--plan", "vision_freeze(2-3)"], capsys)
    assert code == 0 and out.count("accuracy") == 2, err
