"""T1 on real (tiny, random-init) VLMs: the functional gap of a skip plan, the vision drifts and the
Lipschitz constants of the answer's log-probability (skipit_core.theory, chapter 6 of the book).

The quantities are checked against independent computations: drifts against plain hooks in float64,
the gap of ``vision_freeze(l)`` against a forward whose layer-``l`` output vision rows are replaced
by its input rows by hand, the finite-difference Lipschitz ratio along the skip direction against
the autograd directional derivative, and T1 itself (with the Lipschitz constant taken as the largest
gradient norm along the segment the skip moves the normalised block) on every sample.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skipit_core.errors import InputError
from skipit_core.models import Backbone, TokenKind
from skipit_core.skip import SkipPlan
from skipit_core.theory import (
    answer_logprob,
    functional_gap,
    geometric_gap_bound,
    skip_lipschitz,
    vision_cos_dists,
)
from tiny_vlms import layer_io, make

PROMPTS = ((2, 3), (1, 4), (3, 2))


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def tiny(request):
    t = make(request.param, n_layers=4, seed=3)
    t.model.float()
    return t


def _vision(tiny, inputs) -> torch.Tensor:
    bb = Backbone.of(tiny.model)
    return (bb.token_kinds(inputs["input_ids"], inputs.get("attention_mask")) == TokenKind.VISION).nonzero()


def _logp_with_rows(tiny, inputs, layer: int, rows_of) -> torch.Tensor:
    """log-probs [B, V] at the last position when layer ``layer``'s output is edited by ``rows_of``."""
    bb = Backbone.of(tiny.model)

    def hook(module, args, kwargs, output):
        x_in = args[0] if args else kwargs["hidden_states"]
        x_out = output[0] if isinstance(output, tuple) else output
        new = rows_of(x_in, x_out)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = bb.layers[layer].register_forward_hook(hook, with_kwargs=True)
    try:
        logits = tiny.model(**inputs, use_cache=False).logits[:, -1]
    finally:
        handle.remove()
    return torch.log_softmax(logits.double(), -1)


def test_no_op_plans_give_a_gap_of_exactly_zero(tiny):
    inputs = tiny.inputs(PROMPTS, seed=1)
    L = Backbone.of(tiny.model).n_layers
    for plan in (SkipPlan.none(), SkipPlan.late_entry(0), SkipPlan.early_exit(L)):
        gap = functional_gap(tiny.model, inputs, plan)
        assert gap.shape == (len(PROMPTS),) and np.all(gap == 0.0), plan
    # after the last layer only the last (text) position is read: its vision rows are never used
    assert np.all(functional_gap(tiny.model, inputs, SkipPlan.vision_freeze(L - 1)) == 0.0)


def test_answer_logprob_top_token_and_given_targets(tiny):
    inputs = tiny.inputs(PROMPTS, seed=2)
    lp, top = answer_logprob(tiny.model, [inputs])
    with torch.no_grad():
        ref = torch.log_softmax(tiny.model(**inputs, use_cache=False).logits[:, -1].double(), -1)
    assert np.array_equal(top, ref.argmax(-1).numpy())
    np.testing.assert_allclose(lp, ref.max(-1).values.numpy(), rtol=0, atol=1e-5)
    other = (top + 1) % ref.shape[-1]
    lp2, y2 = answer_logprob(tiny.model, inputs, targets=other)
    assert np.array_equal(y2, other) and np.all(lp2 <= lp + 1e-9)
    with pytest.raises(InputError, match="one token id per sample"):
        answer_logprob(tiny.model, inputs, targets=other[:2])
    with pytest.raises(InputError, match="SkipPlan"):
        functional_gap(tiny.model, inputs, "vision_freeze(1)")
    # a reused reference gives the same gap as a fresh one, sample for sample
    plan = SkipPlan.vision_freeze(1)
    np.testing.assert_array_equal(functional_gap(tiny.model, inputs, plan, reference=(lp, top)),
                                  functional_gap(tiny.model, inputs, plan))
    with pytest.raises(InputError, match="reference"):
        functional_gap(tiny.model, inputs, plan, reference=(lp, top[:1]))


def test_vision_cos_dists_match_plain_hooks(tiny):
    inputs = tiny.inputs(PROMPTS, seed=4)
    d = vision_cos_dists(tiny.model, [inputs])
    io, _ = layer_io(tiny.model, inputs)
    vis = _vision(tiny, inputs)
    n_v = tiny.image_tokens
    assert d.shape == (len(PROMPTS), len(io), n_v)
    for l, (x_in, x_out) in enumerate(io):
        a, b = x_in[vis[:, 0], vis[:, 1]], x_out[vis[:, 0], vis[:, 1]]
        ref = 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1)
        np.testing.assert_allclose(d[:, l].reshape(-1), ref.numpy(), atol=1e-6)
    assert np.all((d >= 0) & (d <= 2))


def test_vision_freeze_gap_is_the_identity_skip_of_the_vision_rows(tiny):
    """functional_gap(vision_freeze(l)) = log p when x_l^(V) := x_(l-1)^(V), all else unchanged."""
    inputs = tiny.inputs(PROMPTS, seed=5)
    vis = _vision(tiny, inputs)
    base, top = answer_logprob(tiny.model, inputs)
    for l in range(Backbone.of(tiny.model).n_layers):
        def keep_input(x_in, x_out):
            x = x_out.clone()
            x[vis[:, 0], vis[:, 1]] = x_in[vis[:, 0], vis[:, 1]]
            return x
        with torch.no_grad():
            by_hand = _logp_with_rows(tiny, inputs, l, keep_input).gather(1, torch.as_tensor(top)[:, None])[:, 0]
        gap = functional_gap(tiny.model, inputs, SkipPlan.vision_freeze(l))
        np.testing.assert_allclose(gap, by_hand.numpy() - base, atol=2e-5)


def test_t1_holds_on_every_sample_and_the_skip_ratio_is_the_directional_derivative(tiny):
    """T1 in the chart of skip_lipschitz: moving layer l's normalised output vision block from X_hat_l to
    X_hat_(l-1) (rows keep their norms) changes log p(top) by at most alpha ||X_hat_(l-1) - X_hat_l||_F,
    alpha = the largest gradient norm on the segment, and ||.||_F = sqrt(2 sum_i d_i) from vision_cos_dists."""
    inputs = tiny.inputs(PROMPTS, seed=6)
    io, _ = layer_io(tiny.model, inputs)
    vis = _vision(tiny, inputs)
    B, n_v = len(PROMPTS), tiny.image_tokens
    d = vision_cos_dists(tiny.model, inputs)
    _, top = answer_logprob(tiny.model, inputs)
    top = torch.as_tensor(top)
    estimates = skip_lipschitz(tiny.model, inputs, n_random=3, step=1e-3)
    assert len(estimates) == len(io)
    tightness = []
    for l, (x_in, x_out) in enumerate(io):
        a = x_out[vis[:, 0], vis[:, 1]].float().view(B, n_v, -1)
        b = x_in[vis[:, 0], vis[:, 1]].float().view(B, n_v, -1)
        norms = a.norm(dim=-1, keepdim=True)
        a_hat, b_hat = a / norms, b / b.norm(dim=-1, keepdim=True)

        def g(block: torch.Tensor) -> torch.Tensor:
            def put(x_in_, x_out_):
                x = x_out_.clone()
                x[vis[:, 0], vis[:, 1]] = (block * norms).reshape(-1, x.shape[-1]).to(x.dtype)
                return x
            return _logp_with_rows(tiny, inputs, l, put).gather(1, top[:, None])[:, 0]

        with torch.no_grad():
            change = (g(b_hat) - g(a_hat)).abs().numpy()
        grad_norms = []
        for t in np.linspace(0.0, 1.0, 17):
            x = (a_hat + float(t) * (b_hat - a_hat)).detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(g(x).sum(), x)  # sample i's score depends on sample i only
            grad_norms.append(grad.flatten(1).norm(dim=1))
            if t == 0.0:
                u = (b_hat - a_hat) / (b_hat - a_hat).flatten(1).norm(dim=1).view(-1, 1, 1)
                directional = (grad * u).flatten(1).sum(1).abs().numpy()
        alpha = torch.stack(grad_norms).max(0).values.double().numpy()
        for i in range(B):
            bound = geometric_gap_bound(alpha[i], d[i, l]).value
            assert change[i] <= bound * 1.02 + 1e-6, (l, i, change[i], bound)
            tightness.append(change[i] / max(bound, 1e-12))
            assert np.sqrt(2 * d[i, l].sum()) == pytest.approx(float((b_hat[i] - a_hat[i]).norm()), rel=1e-4)
        est = estimates[l]
        np.testing.assert_allclose(est.ratios[:, 0], directional, rtol=0.05, atol=1e-4)
        assert est.ratios.shape == (B, 4) and est.max == pytest.approx(est.per_sample.max())
        if l == len(io) - 1:  # nothing reads the last layer's vision rows
            assert est.max == 0.0
    assert max(tightness) > 0.1  # not vacuous: on some sample the change is within a factor 10 of the bound


def test_skip_lipschitz_pools_batches_and_rejects_bad_layers(tiny):
    batches = [tiny.inputs(PROMPTS[:2], seed=7), tiny.inputs(PROMPTS[1:], seed=8)]
    est = skip_lipschitz(tiny.model, batches, layers=[1], n_random=1)
    assert len(est) == 1 and est[0].per_sample.shape == (4,) and est[0].ratios.shape == (4, 2)
    with pytest.raises(InputError, match="do not exist"):
        skip_lipschitz(tiny.model, batches, layers=[9])
