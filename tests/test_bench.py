"""skipit_core.bench: analytic FLOPs against torch's FlopCounterMode, meta-device models, timers."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from skipit_core import bench
from skipit_core.errors import InputError
from skipit_core.models import Backbone
from skipit_core.skip import LayerMode, SkipPlan, skipping
from tiny_vlms import make



@pytest.fixture(scope="module")
def llava():
    return make("llava", n_layers=4)


def layer_flops(model, run) -> list[int]:
    """FLOPs FlopCounterMode attributes to each decoder layer (its module and children) during ``run``.

    SDPA's math backend is forced: torch's CPU flash kernel has no FLOP formula, the math path is
    counted as the two matmuls it is (every (query, key) pair: a dense count).
    """
    bb = Backbone.of(model)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run()
    counts = counter.get_flop_counts()
    path = next(name for name, module in model.named_modules() if module is bb.layers)
    prefix = f"{type(model).__name__}.{path}"  # the language model's layers, not the vision tower's
    return [sum(counts.get(f"{prefix}.{i}", {}).values()) for i in range(bb.n_layers)]


PLANS = [SkipPlan.none(), SkipPlan.early_exit(2), SkipPlan.late_entry(1) | SkipPlan.early_exit(3),
         SkipPlan.vision_freeze([1, 2]), SkipPlan.whole_layers([0, 3]) | SkipPlan.vision_freeze(1)]


@pytest.mark.parametrize("plan", PLANS, ids=str)
def test_prefill_flops_match_flop_counter(llava, plan):
    inputs = llava.inputs(prompts=[(2, 3)])  # BOS + 2 text, 4 vision, 3 text
    n_vision, n_text = llava.image_tokens, inputs["input_ids"].shape[1] - llava.image_tokens

    def run():
        with skipping(llava.model, plan):
            llava.model(**inputs, use_cache=False)
    measured = layer_flops(llava.model, run)
    report = bench.flops(llava.model, n_vision, n_text, plan, attention="dense", text_before=3)
    predicted = [layer.total for layer in report.layers]
    for got, want in zip(measured, predicted):
        assert got == pytest.approx(want, rel=0.02, abs=0)
    assert sum(measured) == pytest.approx(report.total, rel=0.02)
    assert [m == 0 for m in measured] == [layer.mode is LayerMode.SKIP for layer in report.layers]


@pytest.mark.parametrize("plan", PLANS[:4], ids=str)
def test_decode_flops_match_flop_counter(llava, plan):
    inputs = llava.inputs(prompts=[(2, 3)])
    n = inputs["input_ids"].shape[1]
    with skipping(llava.model, plan), torch.no_grad():
        out = llava.model(**inputs, use_cache=True)
        step = {"input_ids": out.logits[:, -1:].argmax(-1), "past_key_values": out.past_key_values,
                "attention_mask": torch.ones(1, n + 1, dtype=torch.long)}
        measured = layer_flops(llava.model, lambda: llava.model(**step, use_cache=True))
    report = bench.flops(llava.model, llava.image_tokens, n - llava.image_tokens, plan, decode=True)
    assert measured == pytest.approx([layer.total for layer in report.layers], rel=0.02)


def test_causal_pair_count_matches_brute_force():
    for ranges_q, ranges_k in [([(0, 3), (7, 10)], [(0, 3), (3, 7), (7, 10)]), ([(2, 9)], [(0, 5), (6, 12)]),
                               ([(0, 0)], [(0, 4)]), ([(5, 8)], [(0, 3)])]:
        brute = sum(1 for q0, q1 in ranges_q for q in range(q0, q1)
                    for k0, k1 in ranges_k for k in range(k0, k1) if k <= q)
        assert bench._pairs(ranges_q, ranges_k, causal=True) == brute
        dense = sum((q1 - q0) * (k1 - k0) for q0, q1 in ranges_q for k0, k1 in ranges_k)
        assert bench._pairs(ranges_q, ranges_k, causal=False) == dense


def llava_7b_on_meta():
    """LLaVA-1.5-7B's shapes (Vicuna-7B backbone, CLIP ViT-L/14-336), built without allocating weights."""
    config = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                          num_attention_heads=16, image_size=336, patch_size=14),
        text_config=tf.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=32064),
        image_token_index=32000,
    )
    with torch.device("meta"):
        return tf.LlavaForConditionalGeneration(config)


def test_flops_of_a_7b_model_on_the_meta_device():
    model = llava_7b_on_meta()
    assert next(model.parameters()).device.type == "meta"
    report = bench.flops(model, 576, 48, attention="dense")
    d, f, n = 4096, 11008, 624
    per_token = 2 * (4 * d * d + 3 * d * f)  # q, k, v, o + gated MLP, per token and layer
    per_layer = n * per_token + 4 * n * n * d
    assert report.total == 32 * per_layer
    assert report.head_per_position == 2 * d * 32064
    causal = bench.flops(model, 576, 48)
    assert causal.total < report.total and causal.text + causal.vision == causal.total
    # Early Exit at 16 of 32 layers: half the layers see 48 instead of 624 tokens
    speed = bench.ideal_speedup(model, 576, 48, SkipPlan.early_exit(16), attention="dense")
    text_layer = 48 * per_token + 4 * 48 * 48 * d
    assert speed == pytest.approx(32 * per_layer / (16 * per_layer + 16 * text_layer))
    assert bench.ideal_speedup(model, 576, 48, SkipPlan.none()) == 1.0
    assert "GFLOP" in str(report) and "layer  31" in str(report)


def test_flops_per_kind_and_decode():
    model = llava_7b_on_meta()
    freeze = bench.flops(model, 576, 48, SkipPlan.vision_freeze(range(8, 24)))
    assert freeze.layers[8].mode is LayerMode.FREEZE and freeze.layers[8].vision > 0  # K/V of vision rows
    assert freeze.layers[8].vision < bench.flops(model, 576, 48).layers[8].vision / 5
    decode = bench.flops(model, 576, 48, SkipPlan.early_exit(16), decode=True)
    full = bench.flops(model, 576, 48, decode=True)
    assert decode.total < full.total and decode.layers[0].total == full.layers[0].total
    with pytest.raises(InputError):
        bench.flops(model, 576, 48, attention="sparse")
    with pytest.raises(InputError):
        bench.flops(model, -1, 48)


def test_timers_report_median_and_iqr(llava):
    inputs = llava.inputs(prompts=[(2, 3)])
    prefill = bench.time_prefill(llava.model, inputs, SkipPlan.early_exit(2), warmup=1, repeats=3)
    assert prefill.n == 3 and prefill.median > 0 and prefill.iqr >= 0
    assert "ms median" in str(prefill) and "n=3" in str(prefill) and "cpu" in str(prefill)
    decode = bench.time_decode(llava.model, inputs, SkipPlan.late_entry(1), warmup=1, repeats=2)
    assert decode.n == 2 and decode.median > 0
    t = bench.Timing("x", (1.0, 2.0, 3.0, 4.0, 100.0), "cpu")
    assert t.median == 3.0 and t.iqr == pytest.approx(2.0)
    with pytest.raises(InputError):
        bench.time_prefill(llava.model, inputs, repeats=0)


def test_cuda_timer_brackets_each_call_with_synchronised_events(monkeypatch):
    """No GPU here: fake CUDA events record the order of calls; each timed call must sit between a
    device sync + start event and an end event + device sync, and its time is the events' elapsed time."""
    log: list[str] = []

    class Event:
        count = 0

        def __init__(self, enable_timing: bool = False):
            assert enable_timing
            Event.count += 1
            self.t = None

        def record(self):
            self.t = len(log)
            log.append("record")

        def elapsed_time(self, end):
            return float(end.t - self.t)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    samples = bench._clock(lambda: log.append("run"), torch.device("cuda"), warmup=2, repeats=3)
    assert log == ["run", "run"] + ["sync", "record", "run", "record", "sync"] * 3
    assert samples == [2.0, 2.0, 2.0] and Event.count == 6


def test_decode_timer_steps_match_generate_for_mrope():
    """The decode step time_decode builds (positions as generate makes them) gives generate's token."""
    t = make("qwen2_vl", n_layers=2)
    inputs = t.inputs(prompts=[(2, 3), (1, 2)], images=[True, False])
    with torch.no_grad():
        gen = t.model.generate(**inputs, max_new_tokens=2, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
        out = t.model(**inputs, use_cache=True)
        step = bench._decode_inputs(t.model, inputs, out)
        second = t.model(**step).logits[:, -1]
    torch.testing.assert_close(second, gen.logits[1], atol=1e-5, rtol=0)


def test_skip_speed_script_runs_and_its_by_hand_reference_matches_skipit():
    """The benchmark script end to end at 4 layers, one round. At start-up it checks that its hand-written
    least-work loops for early_exit(1) and late_entry(3) give skipit's final states (it raises otherwise)."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "skip_speed.py"
    out = subprocess.run([sys.executable, str(script), "--layers", "4", "--rounds", "1", "--threads", "1",
                          "--only", r"^early_exit\(1\)|by hand"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0][2:] for line in table[1:]] == [
        "baseline", "early_exit(1)", "by hand early_exit(1)", "by hand late_entry(3)"]
    assert all(line.count("|") == 10 for line in table)


def test_prompt_tokens_leave_padding_out():
    tiny = make("llava")
    for prompts, n_text in ((((2, 3), (0, 1)), 6), (((0, 1), (2, 3)), 2)):  # BOS + text before + text after
        inputs = tiny.inputs(prompts=prompts, seed=15)
        assert bench.prompt_tokens(tiny.model, inputs) == (tiny.image_tokens, n_text)


def test_cli_bench_prints_realized_and_ideal(capsys):
    from skipit_core import cli
    from skipit_core.tasks import DigitScenes, batches
    from skipit_core.zoo import load_vlm

    cli.main(["bench", "--model", "digits-llava", "--n", "8", "--batch-size", "8", "--repeats", "1",
              "--plan", "early_exit(6)"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].strip().startswith("no skipping:") and lines[1].strip().startswith("early_exit(6):")
    model, processor = load_vlm("digits-llava")
    inputs = next(batches(processor, DigitScenes.test_set()[:8], 8))
    ideal = bench.ideal_speedup(model, *bench.prompt_tokens(model, inputs), SkipPlan.early_exit(6))
    assert f"(ideal {ideal:.2f}x, ratio " in lines[1]


def test_timing_flags_noise_above_the_documented_ratio():
    """A median is unreadable when its IQR is above NOISY_IQR_RATIO of it (the heavy-load case: IQR > median)."""
    loaded = bench.Timing("prefill early_exit(6)", (2.0, 9.0, 3.0, 20.0, 4.0, 30.0), "cpu")
    assert loaded.iqr > loaded.median and loaded.noisy and "NOISY" in str(loaded)
    assert "too noisy" in loaded.warning and "prefill early_exit(6)" in loaded.warning
    edge = bench.Timing("x", (10.0, 10.0, 12.5, 12.5), "cpu")  # IQR / median = 2.5 / 11.25 = 0.22
    assert edge.spread == pytest.approx(2.5 / 11.25) and not edge.noisy and edge.warning is None
    assert not bench.Timing("one", (5.0,), "cpu").noisy
    assert bench.Timing("x", (10.0, 10.0, 13.0, 13.0), "cpu").spread > bench.NOISY_IQR_RATIO


def test_timers_move_inputs_to_the_models_device_and_dtype(llava):
    """Inputs given on another dtype (float64 pixels) are moved/cast as the model needs."""
    inputs = {k: (v.double() if v.is_floating_point() else v) for k, v in llava.inputs(prompts=[(2, 3)]).items()}
    assert bench.time_prefill(llava.model, inputs, warmup=0, repeats=1).n == 1
