"""The unification chapter's library pieces: plans at a FLOP budget (bench.plan_at_budget), per-image
scores of the popular methods (measures, per_sample=True) and rank agreement with a bootstrap over
images (stats.bootstrap_spearman)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from skipit_core.bench import Shapes, flop_saving, flops, plan_at_budget
from skipit_core.errors import InputError
from skipit_core.measures import angular_distance, fastv_scores, layer_contribution, vtw_kl
from skipit_core.skip import SkipPlan
from skipit_core.stats import bootstrap_spearman
from tiny_vlms import make

SHAPES = Shapes(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=160, gated=True, n_layers=10, vocab=100)
SIZES = dict(n_vision=49, n_text=12)
PROMPTS = [(2, 3), (0, 5), (1, 2)]


def _saving(plan: SkipPlan) -> float:
    return flop_saving(SHAPES, SIZES["n_vision"], SIZES["n_text"], plan)


def _over(plan: SkipPlan, budget: float) -> bool:
    """Exactly the comparison plan_at_budget makes (integer FLOPs against budget * total)."""
    base = flops(SHAPES, **SIZES).total
    return base - flops(SHAPES, **SIZES, plan=plan).total > budget * base


# ------------------------------------------------------------------------------------ plan_at_budget
@pytest.mark.parametrize("kind,field,make_plan", [("whole", "whole", SkipPlan.whole_layers),
                                                  ("freeze", "freeze", SkipPlan.vision_freeze)])
@pytest.mark.parametrize("seed", range(6))
def test_plan_within_budget_and_next_layer_would_exceed(kind, field, make_plan, seed):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=SHAPES.n_layers)
    order = [int(l) for l in np.argsort(scores, kind="stable")]
    for budget in (0.05, 0.2, 0.3, 0.4, 0.75):
        plan = plan_at_budget(SHAPES, scores, budget, kind, **SIZES)
        chosen = sorted(getattr(plan, field))
        assert not _over(plan, budget) and _saving(plan) <= budget + 1e-12
        assert chosen == sorted(order[:len(chosen)])  # the lowest scores first
        if len(chosen) < SHAPES.n_layers:  # the next layer in score order would break the budget
            assert _over(make_plan(chosen + [order[len(chosen)]]), budget)


def test_whole_layers_at_budget_closed_form():
    """Every decoder layer costs the same, so the budget allows floor(budget * L) whole layers."""
    scores = np.arange(SHAPES.n_layers)[::-1].astype(float)
    for budget, expected in ((0.2, 2), (0.35, 3), (0.4, 4), (0.99, 9), (1.0, 10)):
        plan = plan_at_budget(SHAPES, scores, budget, "whole", **SIZES)
        assert plan.whole == frozenset(range(SHAPES.n_layers - expected, SHAPES.n_layers))


@pytest.mark.parametrize("kind", ["whole", "freeze", "early_exit"])
def test_budget_zero_is_a_no_op(kind):
    scores = np.zeros(SHAPES.n_layers + (kind == "early_exit"))
    plan = plan_at_budget(SHAPES, scores, 0.0, kind, **SIZES)
    assert plan == SkipPlan.none()
    assert flops(SHAPES, **SIZES, plan=plan).total == flops(SHAPES, **SIZES).total


def test_ties_are_broken_by_layer_index_and_repeatable():
    scores = np.array([1.0, 0.0, 0.0, 1.0, 0.0, 2.0, 0.0, 1.0, 3.0, 0.0])
    plans = {plan_at_budget(SHAPES, scores, 0.3, "whole", **SIZES) for _ in range(3)}
    assert plans == {SkipPlan.whole_layers([1, 2, 4])}
    equal = plan_at_budget(SHAPES, np.zeros(SHAPES.n_layers), 0.3, "whole", **SIZES)
    assert equal == SkipPlan.whole_layers([0, 1, 2])


def test_early_exit_at_budget_is_the_earliest_affordable_exit():
    for budget in (0.05, 0.2, 0.4, 0.6):
        plan = plan_at_budget(SHAPES, None, budget, "early_exit", **SIZES)
        k = SHAPES.n_layers if plan == SkipPlan.none() else plan.exit
        assert not _over(plan, budget)
        if k > 0:  # one layer earlier would exceed the budget
            assert _over(SkipPlan.early_exit(k - 1), budget)


def test_early_exit_threshold_rule_is_vtw():
    """With a threshold: the first exit layer whose score is at most the threshold, among affordable ones."""
    kl = np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.05, 0.01, 0.02, 0.0, 0.0, 0.0])
    free = plan_at_budget(SHAPES, kl, 1.0, "early_exit", **SIZES, threshold=0.1)
    assert free == SkipPlan.early_exit(5)
    tight = plan_at_budget(SHAPES, kl, 0.2, "early_exit", **SIZES, threshold=0.1)
    assert tight == plan_at_budget(SHAPES, None, 0.2, "early_exit", **SIZES)  # the budget binds first
    assert plan_at_budget(SHAPES, kl, 1.0, "early_exit", **SIZES, threshold=-1.0) == SkipPlan.none()


def test_plan_at_budget_bad_input():
    s = np.zeros(SHAPES.n_layers)
    for bad in (dict(budget=1.5), dict(budget=-0.1), dict(budget=True), dict(budget="0.2"), dict(budget=np.nan)):
        with pytest.raises(InputError, match="budget"):
            plan_at_budget(SHAPES, s, kind="whole", **SIZES, **bad)
    with pytest.raises(InputError, match="kind"):
        plan_at_budget(SHAPES, s, 0.2, "late_exit", **SIZES)
    with pytest.raises(InputError, match="one per layer"):
        plan_at_budget(SHAPES, s[:-1], 0.2, "whole", **SIZES)
    with pytest.raises(InputError, match="finite"):
        plan_at_budget(SHAPES, np.full(SHAPES.n_layers, np.nan), 0.2, "freeze", **SIZES)
    with pytest.raises(InputError, match="exit layer"):
        plan_at_budget(SHAPES, s, 0.2, "early_exit", **SIZES, threshold=0.1)  # needs L + 1 scores


def test_plan_at_budget_on_a_model():
    tiny = make("llava")
    plan = plan_at_budget(tiny.model, [0.3, 0.1, 0.2, 0.4], 0.5, "whole", n_vision=4, n_text=6)
    assert plan == SkipPlan.whole_layers([1, 2])


# ------------------------------------------------------------------------------ per-sample measures
def test_per_sample_scores_average_to_the_measures():
    tiny = make("llava")
    batches = [tiny.inputs(prompts=PROMPTS, seed=4), tiny.inputs(prompts=[(1, 1)], seed=5)]
    for fn, kw in ((angular_distance, {}), (angular_distance, {"n": 2}), (layer_contribution, {}), (vtw_kl, {})):
        mean, rows = fn(tiny.model, batches, **kw), fn(tiny.model, batches, per_sample=True, **kw)
        assert rows.shape == (4, mean.shape[0])
        assert np.allclose(rows.mean(0), mean, rtol=1e-10, atol=1e-12)
        assert np.all(rows >= -1e-12)
    # the last layer's vision rows are read by nothing: ShortV's score is 0 there for every sample
    assert np.all(layer_contribution(tiny.model, batches, per_sample=True)[:, -1] == 0)


def test_fastv_mass_is_the_attention_on_vision_keys():
    tiny = make("llava")
    got = fastv_scores(tiny.model, [tiny.inputs(prompts=PROMPTS, seed=2)], layer=1)
    assert got.mass.shape == (3,)
    assert np.allclose(got.mass, [s.sum() for s in got.scores])
    assert np.all((got.mass > 0) & (got.mass <= 1 + 1e-9))  # a share of attention rows that sum to one


# ------------------------------------------------------------------------------ bootstrap_spearman
def test_bootstrap_spearman_estimate_is_scipy_on_the_layer_means():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 9)) + np.arange(9)
    b = rng.normal(size=(40, 9)) + np.arange(9) ** 0.5 + rng.normal(size=9)
    got = bootstrap_spearman(a, b, n_boot=500, seed=1)
    assert got.estimate == pytest.approx(stats.spearmanr(a.mean(0), b.mean(0)).statistic, abs=1e-12)
    assert got.low <= got.high and got.n == 40 and got.n_boot == 500
    assert got == bootstrap_spearman(a, b, n_boot=500, seed=1)  # seeded: repeatable


def test_bootstrap_spearman_affine_and_reversed_profiles():
    rng = np.random.default_rng(2)
    a = rng.exponential(size=(30, 7))
    exact = bootstrap_spearman(a, 3 * a + 1, n_boot=300)
    assert (exact.estimate, exact.low, exact.high) == pytest.approx((1.0, 1.0, 1.0))
    flipped = bootstrap_spearman(a, -a, n_boot=300)
    assert (flipped.estimate, flipped.low, flipped.high) == pytest.approx((-1.0, -1.0, -1.0))


def test_bootstrap_spearman_interval_narrows_with_images_and_covers():
    """With per-image noise around fixed layer profiles, more images give a narrower interval, and the
    interval covers the correlation of the true profiles in most of many repetitions."""
    true_a, true_b = np.arange(8.0), np.array([0.0, 2, 1, 3, 5, 4, 7, 6])
    rho = stats.spearmanr(true_a, true_b).statistic
    width, covered = {}, 0
    for n in (20, 320):
        rng = np.random.default_rng(n)
        got = bootstrap_spearman(true_a + rng.normal(scale=6, size=(n, 8)), true_b + rng.normal(scale=6, size=(n, 8)),
                                 n_boot=400, seed=n)
        width[n] = got.high - got.low
    assert width[320] < width[20]
    for rep in range(40):
        rng = np.random.default_rng(100 + rep)
        got = bootstrap_spearman(true_a + rng.normal(scale=3, size=(60, 8)), true_b + rng.normal(scale=3, size=(60, 8)),
                                 n_boot=300, seed=rep)
        covered += got.low <= rho <= got.high
    assert covered >= 30


def test_bootstrap_spearman_with_a_fixed_profile():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(25, 6)) + np.arange(6)
    fixed = np.arange(6.0)
    got = bootstrap_spearman(a, fixed, n_boot=200)
    assert got.estimate == pytest.approx(stats.spearmanr(a.mean(0), fixed).statistic)
    assert got.n == 25 and got.high <= 1.0


def test_bootstrap_spearman_bad_input():
    a = np.ones((5, 4))
    with pytest.raises(InputError, match="same images"):
        bootstrap_spearman(a, np.ones((6, 4)))
    with pytest.raises(InputError, match="same layers"):
        bootstrap_spearman(a, np.ones((5, 3)))
    with pytest.raises(InputError, match="per-image"):
        bootstrap_spearman(np.ones(4), np.ones(4))
    with pytest.raises(InputError, match="finite"):
        bootstrap_spearman(np.full((5, 4), np.nan), a)
    with pytest.raises(InputError, match="n_boot"):
        bootstrap_spearman(a, a, n_boot=0)
    with pytest.raises(InputError, match="at least 2 images"):
        bootstrap_spearman(np.ones((1, 4)), np.ones((1, 4)))
    flat = bootstrap_spearman(np.ones((5, 4)), np.arange(20.0).reshape(5, 4), n_boot=50)
    assert np.isnan(flat.estimate) and flat.n_undefined == 50
