"""predict_band: a plan from measures alone, its certificate, and the Lipschitz constants it uses."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import skipit_core as sk
from skipit_core.band import band_lipschitz, empirical_bernstein_upper, predict_band
from skipit_core.capture import DEFAULT_EPS, LayerProfile, N_BINS, SAMPLE_STATS, VAR_VARIANTS, profile
from skipit_core.errors import InputError
from skipit_core.skip import SkipPlan
from tiny_vlms import make


def synthetic_profile(d: np.ndarray, var: np.ndarray, n: int = 2000, n_vision: int = 16) -> LayerProfile:
    """A profile of ``n`` identical images whose ``n_vision`` vision tokens all move by ``d[l]`` in layer ``l``
    and whose seeing text queries put mass ``var[l]`` on them (the counters profile() would produce)."""
    L, E, grid = len(d), len(DEFAULT_EPS), np.asarray(DEFAULT_EPS)
    per_image = np.zeros((L, 4, E))
    per_image[:, 1, :] = d[:, None] > grid[None, :]  # vision column; a fraction of 0 or 1 per image
    arrays = {"token_count": np.tile([[n * 5, n * n_vision, n]], (L, 1)).astype(np.int64),
              "sum_d": np.stack([np.zeros(L), n * n_vision * d, np.zeros(L)], 1),
              "sum_d2": np.stack([np.zeros(L), n * n_vision * d**2, np.zeros(L)], 1),
              "sum_norm_ratio": np.tile([[n * 5.0, n * n_vision, n]], (L, 1)),
              "hist": np.zeros((L, 3, N_BINS), dtype=np.int64),
              "min_d": np.stack([np.zeros(L), d, np.zeros(L)], 1), "max_d": np.stack([np.zeros(L), d, np.zeros(L)], 1),
              "n_above": (n * n_vision * per_image[:, :3]).astype(np.int64),
              "sample_n": np.full((L, 4), n, dtype=np.int64), "n_samples": np.array(n)}
    arrays.update({name: n * per_image for name in SAMPLE_STATS})
    arrays["sample_any"] = arrays["sample_any"].astype(np.int64)
    for v in VAR_VARIANTS:
        arrays.update({f"var_sum.{v}": n * var, f"var_sumsq.{v}": n * var**2, f"var_n.{v}": np.full(L, n)})
    meta = {"model_class": "Synthetic", "n_layers": L, "hidden_size": 8, "n_bins": N_BINS, "eps_grid": list(grid),
            "keep": 0, "attention": True, "image_token_id": 9, "format": 2}
    return LayerProfile(meta, arrays)


def _stretches(L=12, early=2, late=9):
    quiet = np.r_[np.arange(L) < early] | (np.arange(L) >= late)
    return np.where(quiet, 1e-5, 0.3), np.where(quiet, 0.02, 0.5)


def test_synthetic_profile_reads_back_what_was_put_in():
    d, var = _stretches()
    prof = synthetic_profile(d, var)
    assert np.allclose(prof.mean_cos_dist("vision"), d) and np.allclose(prof.vision_attention(), var)
    assert np.array_equal(prof.any_exceeds(1e-4, "vision"), (d > 1e-4).astype(float))


def test_known_redundant_stretches_give_exactly_that_band():
    d, var = _stretches(early=2, late=9)
    pred = predict_band(synthetic_profile(d, var), alpha=1.0)
    assert pred.plan == SkipPlan.late_entry(2) | SkipPlan.early_exit(9)
    assert pred.band == (0, 1, 9, 10, 11)
    # the bound is the rule's own arithmetic: eps = 1e-4 in each band layer, |V| = 16
    assert pred.bound == pytest.approx(5 * np.sqrt(2 * 16 * 1e-4))
    ev = pred.evidence.set_index("layer")
    assert ev["in_band"].tolist() == [l in pred.band for l in range(12)]
    assert ev.loc[list(pred.band), "pass_cross_modal"].all() and not ev.loc[2:8, "pass_cross_modal"].any()
    assert "0-1, 9-11" in pred.certificate and "0.95" in pred.certificate and "nats" in pred.rule


@pytest.mark.parametrize("early, late", [(0, 7), (4, 12), (0, 12)])
def test_one_sided_and_empty_stretches(early, late):
    d, var = _stretches(early=early, late=late)
    pred = predict_band(synthetic_profile(d, var), alpha=1.0)
    expected = tuple(range(early)) + tuple(range(late, 12))
    assert pred.band == expected
    if not expected:
        assert pred.plan == SkipPlan.none() and "No band is certified" in pred.certificate


def test_each_condition_alone_is_not_enough():
    """Geometric redundancy with a text stream that reads the image, and the converse: no band."""
    L = 12
    still, read = np.full(L, 1e-5), np.full(L, 0.5)
    assert predict_band(synthetic_profile(still, read), alpha=1.0).band == ()
    moving, ignored = np.full(L, 0.3), np.full(L, 0.01)
    assert predict_band(synthetic_profile(moving, ignored), alpha=1.0).band == ()


def test_band_shrinks_as_tolerance_tightens_and_as_alpha_grows():
    d, var = _stretches(early=3, late=8)
    prof = synthetic_profile(d, var)
    widths = [len(predict_band(prof, alpha=1.0, tolerance=t).band) for t in (0.05, 0.2, 0.5, 2.0)]
    assert widths == sorted(widths) and widths[0] < widths[-1]
    assert len(predict_band(prof, alpha=100.0).band) < len(predict_band(prof, alpha=1.0).band)


def test_few_images_certify_nothing():
    """The certificate's union bound needs images: 50 images cannot vouch for a 5-layer band at tail 0.05."""
    d, var = _stretches()
    assert predict_band(synthetic_profile(d, var, n=50), alpha=1.0).band == ()


def test_empirical_bernstein_is_valid_and_tighter_than_hoeffding_for_small_variance():
    rng = np.random.default_rng(0)
    delta, n, mean, misses = 0.05, 200, 0.1, 0
    for _ in range(400):
        x = np.clip(rng.normal(mean, 0.02, n), 0, 1)
        up = empirical_bernstein_upper(x.sum(), (x**2).sum(), n, delta)
        misses += up < mean
        assert up < x.mean() + np.sqrt(np.log(1 / delta) / (2 * n))  # Hoeffding is looser here
    assert misses / 400 <= delta
    with pytest.raises(InputError, match="at least 2"):
        empirical_bernstein_upper(np.array([1.0]), np.array([1.0]), np.array([1]), 0.05)


@pytest.fixture(scope="module")
def tiny():
    return make("llava")


def test_bad_input_raises(tiny):
    d, var = _stretches()
    prof = synthetic_profile(d, var)
    for kwargs in ({"tolerance": 0.0}, {"tolerance": -1.0}, {"tail": 1.5}, {"var_max": 0.0}, {"confidence": 1.0}):
        with pytest.raises(InputError):
            predict_band(prof, alpha=1.0, **kwargs)
    with pytest.raises(InputError, match="one per layer"):
        predict_band(prof, alpha=np.ones(5))
    with pytest.raises(InputError, match="not on this model"):
        predict_band(prof, alpha=1.0, model=tiny.model)
    text_only = profile(tiny.model, tiny.inputs(prompts=[(2, 3)], images=[False]))
    with pytest.raises(InputError, match="no vision statistics"):
        predict_band(text_only, alpha=1.0)
    with pytest.raises(InputError, match="LayerProfile"):
        predict_band({"layers": 4}, alpha=1.0)


def test_end_to_end_on_a_real_model_gives_a_valid_plan(tiny):
    batches = [tiny.inputs(prompts=[(2, 3), (2, 3)], seed=s) for s in range(2)]
    prof = profile(tiny.model, batches)
    alphas = band_lipschitz(tiny.model, batches, n_random=2)
    assert len(alphas) == prof.n_layers and all(a.along_given is not None and a.max > 0 for a in alphas)
    assert all(a.per_sample.shape == (4,) for a in alphas)  # pooled over both batches
    pred = predict_band(prof, alphas, model=tiny.model, tolerance=1e3, tail=0.5, var_max=0.99)
    pred.plan.validate(tiny.model)
    assert pred.ideal_speedup >= 1.0
    assert set(pred.evidence.columns) >= {"layer", "eps", "tail_upper", "alpha", "var_upper", "pass_geometric",
                                          "pass_cross_modal", "in_band"}


def test_answers_play_no_part():
    """Shuffling the answers of the profiled set changes nothing the predictor sees."""
    model, processor = sk.zoo.load_vlm("digits-llava", device="cpu")
    data = sk.tasks.DigitScenes.test_set()[:8]
    shuffled = dataclasses.replace(data, answers=list(np.random.default_rng(0).permutation(data.answers)))
    assert shuffled.answers != data.answers
    preds = []
    for items in (data, shuffled):
        batches = list(sk.tasks.batches(processor, items, batch_size=4))
        prof = profile(model, batches)
        alphas = band_lipschitz(model, batches, n_random=1, layers=None)
        preds.append((prof, alphas, predict_band(prof, alphas, model=model)))
    (p1, a1, b1), (p2, a2, b2) = preds
    assert all(np.array_equal(p1.arrays[k], p2.arrays[k]) for k in p1.arrays)
    assert [a.max for a in a1] == [a.max for a in a2]
    assert b1.plan == b2.plan and b1.bound == b2.bound and b1.evidence.equals(b2.evidence)


def test_lipschitz_needs_equal_vision_counts(tiny):
    batch = tiny.inputs(prompts=[(2, 3), (2, 3)], images=[True, False])
    with pytest.raises(InputError, match="same, non-zero number of vision tokens"):
        band_lipschitz(tiny.model, batch)


def test_lipschitz_along_skip_direction_matches_a_direct_finite_difference(tiny):
    """alpha's skip-direction ratio equals |s(X + h u) - s(X - h u)| / 2h computed here with plain torch hooks:
    X the unit-normalised vision rows at layer 1's input, u the layer's own move of them, s = log p(top token)."""
    model, layer, h = tiny.model, 1, 1e-2
    batch = tiny.inputs(prompts=[(1, 2)], seed=3)
    est = band_lipschitz(model, batch, layers=[layer], n_random=0)[0]
    bb = sk.Backbone.of(model)
    vis = batch["input_ids"][0] == bb.image_token_id
    seen = {}
    grab = bb.layers[layer].register_forward_hook(lambda m, a, k, out: seen.update(x=a[0] if a else k["hidden_states"],
                                                                                  y=out[0] if isinstance(out, tuple) else out),
                                                 with_kwargs=True)
    with torch.no_grad():
        logits = model(**batch).logits[0, -1]
    grab.remove()
    x, y = seen["x"][0, vis], seen["y"][0, vis]
    r = x.norm(dim=-1, keepdim=True)
    x_hat, u = x / r, y / y.norm(dim=-1, keepdim=True) - x / r
    u = u / u.norm()
    top = logits.argmax()

    def score(block):
        def put(m, args, kwargs):
            hs = (args[0] if args else kwargs["hidden_states"]).clone()
            hs[0, vis] = block * r
            return ((hs, *args[1:]), kwargs) if args else (args, dict(kwargs, hidden_states=hs))
        handle = bb.layers[layer].register_forward_pre_hook(put, with_kwargs=True)
        try:
            with torch.no_grad():
                return torch.log_softmax(model(**batch).logits[0, -1].double(), -1)[top]
        finally:
            handle.remove()

    direct = abs(float(score(x_hat + h * u) - score(x_hat - h * u))) / (2 * h)
    assert est.ratios.shape == (1, 1)
    assert est.along_given == pytest.approx(direct, rel=1e-3)  # float32 forwards: rounding ~1e-4 relative
