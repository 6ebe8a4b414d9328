"""The validation chapter's library pieces: sweeps, paired tests of a sweep, Holm, profile_and_predict."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest

import skipit_core as sk
from skipit_core.band import BandStudy, predict_band, profile_and_predict
from skipit_core.capture import profile
from skipit_core.errors import InputError
from skipit_core.skip import SkipPlan
from skipit_core.stats import holm, mcnemar_exact
from skipit_core.tasks import (STRATEGIES, DigitScenes, batches, evaluate, kept_window, paired_sweep, sweep,
                               sweep_frame)


@pytest.fixture(scope="module")
def tiny():
    from skipit_core.zoo.build import ModelSize, build

    size = ModelSize(hidden=32, layers=3, heads=2, kv_heads=2, intermediate=64, vision_hidden=32,
                     vision_layers=1, vision_heads=2, vision_intermediate=64)
    model, processor = build("llava", size, seed=0, layout="image-first")
    return model.eval(), processor


@pytest.fixture(scope="module")
def data():
    return DigitScenes("validation").generate(3, seed=5)  # 21 items, 7 families


# ------------------------------------------------------------------------------------------- sweep
def test_sweep_scores_every_boundary_and_reuses_the_reference_for_no_ops(tiny, data):
    model, processor = tiny
    ref = evaluate(model, processor, data, batch_size=8)
    out = sweep(model, processor, data, reference=ref, batch_size=8)
    assert list(out) == list(STRATEGIES) and all(list(by_k) == [0, 1, 2, 3] for by_k in out.values())
    assert out["Late Entry"][0] is ref and out["Early Exit"][3] is ref  # the no-ops are not run again
    for name, make in STRATEGIES.items():
        for k in (1, 2):
            direct = evaluate(model, processor, data, make(k), batch_size=8)
            assert out[name][k].predictions == direct.predictions
            assert np.array_equal(out[name][k].correct, direct.correct)
    # what it reuses is what a run gives: the no-op plans are bit-identical to no skipping
    run = evaluate(model, processor, data, SkipPlan.late_entry(0), batch_size=8)
    assert run.predictions == ref.predictions
    # without a reference it computes one, once, and both no-ops share it
    alone = sweep(model, processor, data, [0, 3], batch_size=8)
    assert alone["Late Entry"][0] is alone["Early Exit"][3] and alone["Late Entry"][0].predictions == ref.predictions
    frame = sweep_frame(out)
    assert len(frame) == 8 and set(frame["strategy"]) == set(STRATEGIES)
    assert (frame["k_correct"] / frame["n"] == frame["accuracy"]).all()
    a, b = kept_window(out["Early Exit"], out["Late Entry"], ref.accuracy)
    assert 0 <= a <= b <= 3


def test_sweep_rejects_bad_boundaries_and_a_foreign_reference(tiny, data):
    model, processor = tiny
    for ks in ([4], [-1], [1, 1], []):
        with pytest.raises(InputError, match="layer boundaries"):
            sweep(model, processor, data, ks)
    other = evaluate(model, processor, data[:5], batch_size=8)
    with pytest.raises(InputError, match="same 21 items"):
        sweep(model, processor, data, [0], reference=other)


def test_correct_vector_is_one_entry_per_item_in_order(tiny, data):
    model, processor = tiny
    r = evaluate(model, processor, data, SkipPlan.early_exit(1), batch_size=8)
    assert r.correct.dtype == bool and r.correct.shape == (len(data),) and int(r.correct.sum()) == r.k
    # item i of a slice is item i of the whole, whatever the batching
    part = evaluate(model, processor, data[5:13], SkipPlan.early_exit(1), batch_size=3)
    assert np.array_equal(part.correct, r.correct[5:13])
    fam = np.array(data.families)
    for row in r.by_family.itertuples():
        assert row.k == int(r.correct[fam == row.family].sum())


# ------------------------------------------------------------------------------------- paired_sweep
def _result(correct) -> SimpleNamespace:
    c = np.asarray(correct, bool)
    lo, hi = sk.tasks.wilson(int(c.sum()), len(c))
    return SimpleNamespace(correct=c, accuracy=c.mean(), ci_low=lo, ci_high=hi, confidence=0.95)


def test_paired_sweep_is_mcnemar_per_plan_with_holm_and_the_window():
    rng = np.random.default_rng(0)
    ref = _result(rng.random(60) < 0.9)
    flip = lambda c, n: np.r_[~c[:n], c[n:]]  # noqa: E731  (the first n answers flipped)
    results = {"Early Exit": {k: _result(flip(ref.correct, 3 * (3 - k))) for k in range(4)},
               "Late Entry": {k: _result(flip(ref.correct, 4 * k)) for k in range(4)}}
    frame = paired_sweep(results, ref, window=(1, 2), n_layers=3).set_index(["strategy", "k"])
    for (name, k), row in frame.iterrows():
        m = mcnemar_exact(ref.correct, results[name][k].correct)
        assert (row.only_reference, row.only_plan, row.p_value) == (m.only_a, m.only_b, m.p_value)
        assert row.difference == pytest.approx(ref.accuracy - results[name][k].accuracy)
        assert row.diff_low <= row.difference <= row.diff_high
    assert frame.loc[("Late Entry", 0), "noop"] and frame.loc[("Early Exit", 3), "noop"]
    assert np.isnan(frame.loc[("Late Entry", 0), "p_holm"])
    inside = {key for key, v in frame["inside"].items() if v}
    assert inside == {("Late Entry", 0), ("Late Entry", 1), ("Early Exit", 2), ("Early Exit", 3)}
    tested = frame[~frame["noop"]]
    assert np.allclose(tested["p_holm"], holm(tested["p_value"].to_numpy()))
    assert paired_sweep(results, ref)["inside"].isna().all()  # no window: no verdict
    with pytest.raises(InputError, match="same questions"):
        paired_sweep({"Early Exit": {1: _result(ref.correct[:10])}}, ref)
    with pytest.raises(InputError, match="keys"):
        paired_sweep({"whole": {1: ref}}, ref)


# --------------------------------------------------------------------------------------------- holm
def test_holm_matches_the_step_down_procedure_and_its_bounds():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5])
    # by hand: sorted 0.005, 0.01, 0.03, 0.04, 0.5 times 5, 4, 3, 2, 1 -> 0.025, 0.04, 0.09, 0.08 -> 0.09, 0.5
    assert np.allclose(holm(p), [0.04, 0.09, 0.09, 0.025, 0.5])
    rng = np.random.default_rng(1)
    for m in (1, 2, 7):
        for _ in range(50):
            q = rng.random(m) ** 3
            adj = holm(q)
            assert np.all(adj >= q - 1e-15) and np.all(adj <= np.minimum(1, m * q) + 1e-15)
            assert adj[np.argmin(q)] == pytest.approx(min(1.0, m * q.min()))
            order = np.argsort(q)
            assert np.all(np.diff(adj[order]) >= -1e-15)  # same order as the raw p-values
            # rejection at 0.05 is Holm's sequential rule, checked by brute force over the ordering
            reject, alive = set(), True
            for i, j in enumerate(order):
                alive = alive and q[j] <= 0.05 / (m - i)
                if alive:
                    reject.add(int(j))
            assert reject == {int(j) for j in np.flatnonzero(adj <= 0.05)}
    for bad in ([], [1.2], [[0.1]], [np.nan], 0.3):
        with pytest.raises(InputError):
            holm(bad)


# ------------------------------------------------------------------------------ profile_and_predict
def test_profile_and_predict_is_the_three_steps_and_prefixes_are_free(tiny, data):
    model, processor = tiny
    # sizes that are multiples of batch_size: every batch is the one a single pass forms
    study = profile_and_predict(model, processor, data, n_lipschitz=8, batch_size=8, prefixes=(8, 16))
    assert isinstance(study, BandStudy) and sorted(study.prefixes) == [8, 16, 21]
    direct = profile(model, batches(processor, data, 8))
    for n, prof in study.prefixes.items():
        alone = direct if n == len(data) else profile(model, batches(processor, data[:n], 8))
        assert prof.sample_count("vision") == n == alone.sample_count("vision")
        for key, value in alone.arrays.items():
            if value.dtype.kind in "iu":
                assert np.array_equal(prof.arrays[key], value), key
            else:
                assert np.allclose(prof.arrays[key], value, rtol=1e-9, atol=1e-12), key
    alpha = sk.band.band_lipschitz(model, batches(processor, data[:8], 8), n_random=2, seed=0)
    assert [a.max for a in study.alpha] == pytest.approx([a.max for a in alpha])
    again = predict_band(direct, alpha, model=model)
    assert study.prediction.plan == again.plan and study.prediction.bound == pytest.approx(again.bound)
    assert np.allclose(study.prediction.evidence["var_upper"], again.evidence["var_upper"])
    # predict() reruns the rule without a forward pass: a looser rule never gives a narrower band
    loose = study.predict(tolerance=1e6, var_max=0.999, tail=0.5)
    assert len(loose.band) >= len(study.prediction.band)
    small = study.predict(8)  # the prefix's own profile, the same alphas
    assert np.allclose(small.evidence["var_upper"],
                       predict_band(profile(model, batches(processor, data[:8], 8)), alpha).evidence["var_upper"])
    with pytest.raises(InputError, match="prefixes"):
        study.predict(7)
    # other cuts change the padding of a few batches: the same profile up to float32 noise
    odd = profile_and_predict(model, processor, data, n_lipschitz=8, batch_size=8, prefixes=(5,))
    assert np.allclose(odd.profile.mean_cos_dist("vision"), direct.mean_cos_dist("vision"), rtol=1e-5)
    assert np.allclose(odd.prefixes[5].vision_attention(), profile(model, batches(processor, data[:5], 8))
                       .vision_attention(), rtol=1e-5)


def test_profile_and_predict_rejects_bad_sizes(tiny, data):
    model, processor = tiny
    for kwargs in (dict(n_lipschitz=0), dict(n_lipschitz=22), dict(prefixes=(0,)), dict(prefixes=(30,))):
        with pytest.raises(InputError):
            profile_and_predict(model, processor, data, **kwargs)
    with pytest.raises(InputError, match="VQASet"):
        profile_and_predict(model, processor, [], n_lipschitz=1)


def test_tolerance_only_widens_the_band():
    """The sensitivity the chapter tabulates: on a synthetic profile the band grows with tolerance and var_max."""
    from test_band import synthetic_profile

    L = 12
    d = np.geomspace(1e-5, 1e-1, L)[np.r_[np.arange(0, L, 2), np.arange(L - 1, 0, -2)]]  # small at both ends
    var = np.linspace(0.01, 0.3, L)
    prof = synthetic_profile(d, var)
    widths = [len(predict_band(prof, 1.0, tolerance=t).band) for t in (0.01, 0.1, 0.5, 2, 10)]
    assert widths == sorted(widths)
    for t, v in itertools.product((0.1, 1.0), (0.05, 0.1, 0.2)):
        assert len(predict_band(prof, 1.0, tolerance=t, var_max=v).band) <= \
            len(predict_band(prof, 1.0, tolerance=t, var_max=v + 0.1).band)
