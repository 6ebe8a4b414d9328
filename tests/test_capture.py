"""capture.profile against plain references on every supported class (tiny random-init models)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from skipit_core.capture import LayerProfile, profile
from skipit_core.errors import InputError, NumericalError, SkipitError, UnsupportedModelError
from skipit_core.models import Backbone, TokenKind
from tiny_vlms import BUILDERS, PAD_ID, layer_io, make

FIXTURES = Path(__file__).parent / "fixtures"

NAMES = list(BUILDERS)
KIND = {"text": [TokenKind.TEXT], "vision": [TokenKind.VISION], "sink": [TokenKind.SINK],
        "all": [TokenKind.TEXT, TokenKind.VISION, TokenKind.SINK]}
PROMPTS = [(2, 3), (0, 5), (1, 1)]


def collate(singles: list[dict], pad_left: bool = True) -> dict:
    """Stack single-sample inputs into one padded batch as a processor would (pixels concatenated)."""
    width = max(s["input_ids"].shape[1] for s in singles)
    out = {}
    for key in singles[0]:
        parts = [s[key] for s in singles]
        if key in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"):
            fill = PAD_ID if key == "input_ids" else 0
            rows = []
            for p in parts:
                pad = torch.full((1, width - p.shape[1]), fill, dtype=p.dtype)
                rows.append(torch.cat([pad, p] if pad_left else [p, pad], 1))
            out[key] = torch.cat(rows, 0)
        else:
            out[key] = torch.cat(parts, 0)
    return out


def singles_of(tiny, prompts=PROMPTS, seed=0, images=None):
    images = images or [True] * len(prompts)
    return [tiny.inputs(prompts=[p], images=[im], seed=seed + i) for i, (p, im) in enumerate(zip(prompts, images))]


def reference(model, inputs):
    """Per-layer (x_in, x_out) in float64 from plain hooks, and the token kinds."""
    pairs, _ = layer_io(model, inputs)
    return pairs, Backbone.of(model).token_kinds(inputs["input_ids"], inputs["attention_mask"])


def ref_stats(pairs, kinds, modality):
    sel = torch.isin(kinds, torch.tensor(KIND[modality]))
    mean, var, ratio, dists = [], [], [], []
    for x_in, x_out in pairs:
        a, b = x_in[sel], x_out[sel]
        d = 1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        mean.append(d.mean().item())
        var.append(d.var(unbiased=False).item())
        ratio.append((b.norm(dim=-1) / a.norm(dim=-1)).mean().item())
        dists.append(d)
    return np.array(mean), np.array(var), np.array(ratio), dists




@pytest.fixture(scope="module", params=NAMES)
def case(request):
    """One tiny model per class, a left-padded batch of 3 prompts and its profile."""
    tiny = make(request.param)
    batch = collate(singles_of(tiny))
    return tiny, batch, profile(tiny.model, [batch], keep=3)


def test_cos_dist_matches_plain_reference(case):
    tiny, batch, prof = case
    pairs, kinds = reference(tiny.model, batch)
    for modality in ("text", "vision", "sink", "all"):
        mean, var, ratio, dists = ref_stats(pairs, kinds, modality)
        assert np.allclose(prof.mean_cos_dist(modality), mean, atol=1e-5, rtol=0), modality
        assert np.allclose(prof.var_cos_dist(modality), var, atol=1e-5, rtol=0), modality
        assert np.allclose(prof.norm_ratio(modality), ratio, atol=1e-5, rtol=1e-5), modality
        assert (prof.count(modality) == len(dists[0])).all()
        assert (prof.count(modality) == int(torch.isin(kinds, torch.tensor(KIND[modality])).sum())).all()
        for eps in (1e-3, 0.01, 0.1):
            exact = np.array([(d > eps).double().mean().item() for d in dists])
            assert np.allclose(prof.tail_prob(eps, modality), exact, atol=1e-12), (modality, eps)
        q = np.array([np.quantile(d.numpy(), 0.5, method="inverted_cdf") for d in dists])
        width = 2 * np.sqrt(2 * np.maximum(q, 0)) / prof.meta["n_bins"] + 4 / prof.meta["n_bins"] ** 2
        assert np.all(np.abs(prof.quantile(0.5, modality) - q) <= width + 1e-6), modality
        assert np.allclose(prof.quantile(1.0, modality), [d.max().item() for d in dists], atol=1e-6)


def test_vision_attention_matches_eager_attentions(case):
    tiny, batch, prof = case
    eager = make(tiny.name, attn="eager").model
    with torch.no_grad():
        att = eager(**batch, output_attentions=True).attentions
    kinds = Backbone.of(eager).token_kinds(batch["input_ids"], batch["attention_mask"])
    vision, text = kinds == TokenKind.VISION, kinds == TokenKind.TEXT
    variants = ("mean", "last", "uniform", "mean_all", "uniform_all")
    ref = {k: [] for k in variants}
    for a in att:  # [B, H, N, N]
        mass = (a.double() * vision[:, None, None, :]).sum(-1).mean(1)  # [B, N]
        allowed = (a[:, 0] > 0) | (a.sum(1) > 0)  # keys the query may attend (probabilities > 0)
        uni = (allowed & vision[:, None]).sum(-1) / allowed.sum(-1).clamp_min(1)
        sees = (allowed & vision[:, None]).any(-1)  # [B, N]: the query may attend some vision key
        per = {k: [] for k in variants}
        for b in range(a.shape[0]):
            t = text[b].nonzero()[:, 0]
            s = t[sees[b, t]]
            per["mean"].append(mass[b, s].mean().item())
            per["uniform"].append(uni[b, s].double().mean().item())
            per["last"].append(mass[b, t[-1]].item())
            per["mean_all"].append(mass[b, t].mean().item())
            per["uniform_all"].append(uni[b, t].double().mean().item())
        for k in ref:
            ref[k].append(np.mean(per[k]))
    for k in ref:
        assert np.allclose(prof.vision_attention(k), ref[k], atol=1e-4, rtol=0), k
    assert np.allclose(prof.vision_attention("ratio"), np.array(ref["mean"]) / np.array(ref["uniform"]), atol=1e-3)
    assert np.allclose(prof.vision_attention("ratio_all"), np.array(ref["mean_all"]) / np.array(ref["uniform_all"]),
                       atol=1e-3)


def test_pooled_states_match_reference(case):
    tiny, batch, prof = case
    pairs, kinds = reference(tiny.model, batch)
    vis = (kinds == TokenKind.VISION).double()
    last = torch.where(kinds == TokenKind.TEXT, torch.arange(kinds.shape[1]), -1).amax(1)
    for l, (x_in, x_out) in enumerate(pairs):
        for name, x in (("in", x_in), ("out", x_out)):
            vmean = torch.einsum("bn,bnd->bd", vis, x) / vis.sum(1, keepdim=True)
            assert np.allclose(prof.pooled[f"vision_{name}"][:, l], vmean.numpy(), atol=1e-5)
            assert np.allclose(prof.pooled[f"text_{name}"][:, l], x[torch.arange(3), last].numpy(), atol=1e-5)
    assert prof.pooled["vision_in"].dtype == np.float32 and prof.pooled["vision_in"].shape == (3, 4, 32)


def test_batch_equals_single_runs_and_merge_equals_one_pass(case):
    tiny, batch, prof = case
    parts = [profile(tiny.model, [s], keep=3) for s in singles_of(tiny)]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert_profiles_close(merged, prof, atol=1e-5)
    assert merged.n_samples == 3


def assert_profiles_close(a: LayerProfile, b: LayerProfile, atol: float) -> None:
    assert a.n_samples == b.n_samples
    for mod in ("text", "vision", "sink", "all"):
        assert (a.count(mod) == b.count(mod)).all()
        for stat in ("mean_cos_dist", "var_cos_dist", "norm_ratio"):
            assert np.allclose(getattr(a, stat)(mod), getattr(b, stat)(mod), atol=atol, rtol=0), (mod, stat)
        for eps in a.eps_grid:
            est_a, up_a = a.tail_prob(eps, mod, confidence=0.9)
            est_b, up_b = b.tail_prob(eps, mod, confidence=0.9)
            assert np.allclose(est_a, est_b, atol=atol) and np.allclose(up_a, up_b, atol=atol)
    for variant in ("mean", "last", "uniform"):
        assert np.allclose(a.vision_attention(variant), b.vision_attention(variant), atol=atol, rtol=0)
    assert set(a.pooled) == set(b.pooled)
    for key in a.pooled:
        assert np.allclose(a.pooled[key], b.pooled[key], atol=atol, equal_nan=True)


def test_merge_of_shards_equals_one_pass_exactly_on_counts():
    tiny = make("llava")
    b1 = tiny.inputs(prompts=[(2, 3), (1, 4)], seed=1)
    b2 = tiny.inputs(prompts=[(0, 2)], seed=2)
    b3 = tiny.inputs(prompts=[(3, 1), (2, 2)], images=[True, False], seed=3)
    one = profile(tiny.model, [b1, b2, b3], keep=4)
    merged = profile(tiny.model, [b1], keep=4).merge(profile(tiny.model, iter([b2, b3]), keep=4))
    assert set(one.arrays) == set(merged.arrays)
    for key, value in one.arrays.items():  # counters and extremes exactly, float sums to rounding
        if value.dtype.kind == "i" or key in ("min_d", "max_d"):
            assert np.array_equal(value, merged.arrays[key]), key
        else:
            assert np.allclose(value, merged.arrays[key], rtol=1e-12, atol=1e-12), key
    assert merged.pooled["text_in"].shape[0] == 4
    assert np.array_equal(one.pooled["text_in"], merged.pooled["text_in"])
    assert one.sample_count("vision") == 4 and one.sample_count("text") == 5
    with pytest.raises(InputError, match="different n_layers"):
        one.merge(profile(make("llava", n_layers=2).model, [b1]))


def test_tail_confidence_is_hoeffding_over_sample_fractions():
    tiny = make("llava_next")
    batch = tiny.inputs(prompts=[(2, 3), (0, 5), (4, 1), (1, 1)], seed=5)
    prof = profile(tiny.model, batch)  # a single dict counts as one batch
    pairs, kinds = reference(tiny.model, batch)
    eps = 0.2
    est, upper = prof.tail_prob(eps, "vision", confidence=0.95)
    sel = kinds == TokenKind.VISION
    for l, (x_in, x_out) in enumerate(pairs):
        d = 1 - torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)
        fracs = [((d[b] > eps) & sel[b]).sum().item() / sel[b].sum().item() for b in range(4)]
        assert est[l] == pytest.approx(np.mean(fracs), abs=1e-12)
        assert upper[l] == pytest.approx(min(1, np.mean(fracs) + math.sqrt(math.log(20) / 8)), abs=1e-12)
        anyfrac = np.mean([((d[b] > eps) & sel[b]).any().item() for b in range(4)])
        assert prof.any_exceeds(eps, "vision")[l] == pytest.approx(anyfrac)
    assert (prof.any_exceeds(eps, "vision", confidence=0.95)[1] >= prof.any_exceeds(eps, "vision")).all()
    with pytest.raises(InputError, match="grid"):
        prof.tail_prob(0.123, "vision", confidence=0.95)
    off_grid = prof.tail_prob(0.123, "vision")  # histogram interpolation, close to the exact count
    exact = [((1 - torch.nn.functional.cosine_similarity(a, b, dim=-1))[sel] > 0.123).double().mean().item()
             for a, b in pairs]
    assert np.allclose(off_grid, exact, atol=0.05)


def test_save_load_round_trip_and_frame(tmp_path, case):
    tiny, batch, prof = case
    path = prof.save(tmp_path / "p.npz")
    back = LayerProfile.load(path)
    assert back.meta == prof.meta
    assert set(back.arrays) == set(prof.arrays) and set(back.pooled) == set(prof.pooled)
    for key in prof.arrays:
        assert np.array_equal(back.arrays[key], prof.arrays[key]) and back.arrays[key].dtype == prof.arrays[key].dtype
    for key in prof.pooled:
        assert np.array_equal(back.pooled[key], prof.pooled[key], equal_nan=True)
    frame = back.frame
    assert list(frame.columns) == ["layer", "modality", "statistic", "value"]
    assert set(frame["modality"]) == {"text", "vision", "sink", "all"}
    got = frame.query("modality == 'vision' and statistic == 'mean_cos_dist'").sort_values("layer")["value"]
    assert np.allclose(got.to_numpy(), prof.mean_cos_dist("vision"))
    assert {"vision_attention_mean", "vision_attention_last", "q50", "tail_prob@0.01"} <= set(frame["statistic"])
    assert isinstance(frame, pd.DataFrame) and frame["layer"].max() == 3
    text = repr(back)
    assert type(tiny.model).__name__ in text and "3 samples" in text and "4 layers" in text


def test_memory_does_not_grow_with_samples_and_model_left_as_it_was():
    tiny = make("qwen2_vl")
    model = tiny.model
    model.train()  # profile must evaluate in eval mode and give the mode back
    model.model.rope_deltas = "sentinel"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [tiny.inputs(prompts=[(1, 2), (2, 1)], seed=s) for s in range(3)]
    small, big = profile(model, batches[:1]), profile(model, batches)
    assert {k: v.shape for k, v in small.arrays.items()} == {k: v.shape for k, v in big.arrays.items()}
    assert big.n_samples == 6 and small.n_samples == 2
    assert model.training and all(m.training for m in model.modules())
    assert model.model.rope_deltas == "sentinel"
    bb = Backbone.of(model)
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in bb.layers)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    model.model.rope_deltas = None
    # a profile in train mode would differ only through dropout; eval mode gives the same numbers
    assert np.allclose(profile(model, batches[:1]).mean_cos_dist("vision"), small.mean_cos_dist("vision"))


# ------------------------------------------------------------------------------------ bad input
def test_vision_statistics_without_images_raise():
    tiny = make("llava")
    prof = profile(tiny.model, [tiny.inputs(prompts=[(2, 3), (1, 1)], images=[False, False])])
    assert prof.count("vision").sum() == 0
    prof.mean_cos_dist("text")  # text statistics are fine
    for call in (lambda: prof.mean_cos_dist("vision"), lambda: prof.tail_prob(0.01, "vision"),
                 lambda: prof.vision_attention("mean"), lambda: prof.quantile(0.5, "vision")):
        with pytest.raises(InputError, match="no image tokens.*pass images.*image_token_id"):
            call()
    with pytest.raises(InputError, match="unknown modality"):
        prof.mean_cos_dist("audio")


def test_nan_in_a_layer_output_names_the_layer():
    tiny = make("llava")
    bb = Backbone.of(tiny.model)
    with torch.no_grad():
        bb.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="layer 2 .*NaN/inf.*(text|vision|sink)"):
        profile(tiny.model, [tiny.inputs()])
    assert not bb.layers[2]._forward_hooks  # hooks removed on the error path too


def test_empty_batches_raise():
    tiny = make("llava")
    with pytest.raises(InputError, match="no batch"):
        profile(tiny.model, [])
    with pytest.raises(InputError, match="no batch"):
        profile(tiny.model, iter(()))


def test_qwen_without_mm_token_type_ids_raises():
    tiny = make("qwen2_5_vl")
    inputs = tiny.inputs()
    del inputs["mm_token_type_ids"]
    with pytest.raises(InputError, match="mm_token_type_ids"):
        profile(tiny.model, [inputs])


def test_unsupported_model_raises():
    with pytest.raises(UnsupportedModelError, match="Linear.*Supported"):
        profile(torch.nn.Linear(3, 3), [{"input_ids": torch.ones(1, 2, dtype=torch.long)}])
    with pytest.raises(SkipitError, match="keep"):
        profile(make("llava").model, [], keep=-1)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_right_padding_equals_left_padding(name):
    tiny = make(name)
    kw = dict(prompts=[(2, 3), (0, 1), (1, 4)], seed=13)
    left = profile(tiny.model, [tiny.inputs(pad_left=True, **kw)], keep=3)
    right = profile(tiny.model, [tiny.inputs(pad_left=False, **kw)], keep=3)
    assert_profiles_close(left, right, atol=1e-5)


def test_profile_saved_by_skipit_0_1_0_loads_with_named_statistics():
    """tests/fixtures/profile_format1_llava.npz was written by the positional-array code of commit c73830e
    for this very tiny model and batch: every statistic it holds must read the same as a fresh profile."""
    tiny = make("llava")
    fresh = profile(tiny.model, [tiny.inputs(prompts=[(2, 3), (1, 4)], seed=1)], keep=2)
    old = LayerProfile.load(FIXTURES / "profile_format1_llava.npz")
    for modality in ("text", "vision", "sink", "all"):
        for stat in ("mean_cos_dist", "var_cos_dist", "norm_ratio", "count"):
            assert np.allclose(getattr(old, stat)(modality), getattr(fresh, stat)(modality), atol=1e-6), stat
        assert np.allclose(old.tail_prob(0.01, modality, confidence=0.9)[1],
                           fresh.tail_prob(0.01, modality, confidence=0.9)[1], atol=1e-6)
        assert np.allclose(old.quantile(0.5, modality), fresh.quantile(0.5, modality), atol=1e-6)
    for variant in ("mean_all", "uniform_all", "last", "ratio_all"):
        assert np.allclose(old.vision_attention(variant), fresh.vision_attention(variant), atol=1e-6), variant
    with pytest.raises(InputError, match="mean_all"):
        old.vision_attention()  # its positional "mean" was over every text query: say so, never substitute
    with pytest.raises(InputError, match="before VAR was split"):
        old.merge(fresh)
    assert set(old.frame["statistic"]) == set(fresh.frame["statistic"]) - {"vision_attention_mean",
                                                                           "vision_attention_uniform"}


def test_default_var_ignores_queries_that_cannot_see_the_image():
    """Question before the image: text queries placed before every vision key put no mass on it and must
    not dilute VAR; the *_all variant counts them as 0 (so it shrinks as the question grows)."""
    tiny = make("llava")
    short = profile(tiny.model, tiny.inputs(prompts=[(1, 3)], seed=4))
    long = profile(tiny.model, tiny.inputs(prompts=[(9, 3)], seed=4))  # 8 more text tokens before the image
    assert np.all(long.vision_attention("mean_all") < short.vision_attention("mean_all"))
    seeing_share = 3 / 12  # 3 of the 12 text queries (BOS is the sink) follow the image
    assert np.allclose(long.vision_attention("mean_all"), seeing_share * long.vision_attention("mean"), rtol=1e-6)
