"""measures: the popular methods' layer scores against plain references on tiny random-init VLMs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from skipit_core.capture import profile
from skipit_core.errors import InputError
from skipit_core.measures import (angular_distance, attention_removal, block_influence, fastv_scores, layer_contribution,
                                  vtw_kl)
from skipit_core.models import Backbone, TokenKind
from tiny_vlms import BUILDERS, layer_io, make

PROMPTS = [(2, 3), (0, 5), (1, 2)]



@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl", "gemma3"])
def test_block_influence_is_one_minus_mean_cos(name):
    tiny = make(name)
    inputs = tiny.inputs(prompts=PROMPTS, seed=3)
    pairs, _ = layer_io(tiny.model, inputs)
    kinds = Backbone.of(tiny.model).token_kinds(inputs["input_ids"], inputs["attention_mask"])
    real = kinds != TokenKind.PAD
    ref = [1 - torch.nn.functional.cosine_similarity(a[real], b[real], dim=-1).mean().item() for a, b in pairs]
    assert np.allclose(block_influence(profile(tiny.model, [inputs])), ref, atol=1e-5)


def zero_layer_update(model, layer: int) -> None:
    """Make decoder layer ``layer`` the identity: both residual branches write zeros."""
    blk = Backbone.of(model).layers[layer]
    with torch.no_grad():
        blk.self_attn.o_proj.weight.zero_()
        blk.mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_shortv_contribution_and_bi_zero_for_identity_layer(name):
    tiny = make(name)
    zero_layer_update(tiny.model, 1)
    batches = [tiny.inputs(prompts=PROMPTS, seed=4), tiny.inputs(prompts=[(1, 1)], seed=5)]
    lc = layer_contribution(tiny.model, batches)
    assert lc.shape == (4,)
    assert lc[1] == 0.0
    assert lc[3] == 0.0  # vision rows leaving the last layer are read by nothing
    assert np.all(lc[[0, 2]] > 0)
    bi = block_influence(profile(tiny.model, batches))
    assert bi[1] == 0.0 and np.all(bi[[0, 2, 3]] > 0)


def test_shortv_matches_manual_ablation():
    tiny = make("llava")
    inputs = tiny.inputs(prompts=[(2, 3), (0, 1)], seed=6)
    bb = Backbone.of(tiny.model)
    vision = bb.vision_mask(inputs["input_ids"])
    last = inputs["attention_mask"].shape[1] - 1  # left padding: the last position is real
    with torch.no_grad():
        p = torch.log_softmax(tiny.model(**inputs).logits[:, last].double(), -1)
        handle = bb.layers[2].register_forward_hook(
            lambda m, a, out: torch.where(vision[..., None], a[0], out))
        try:
            q = torch.log_softmax(tiny.model(**inputs).logits[:, last].double(), -1)
        finally:
            handle.remove()
    ref = (p.exp() * (p - q)).sum(-1).mean().item()
    assert layer_contribution(tiny.model, [inputs], layers=[2])[0] == pytest.approx(ref, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_vtw_kl_zero_at_last_and_positive_before(name):
    tiny = make(name, n_layers=3)
    inputs = tiny.inputs(prompts=[(2, 3), (1, 2)], seed=7)
    kl = vtw_kl(tiny.model, [inputs])
    assert kl.shape == (4,)
    assert kl[3] == pytest.approx(0.0, abs=1e-12)
    assert kl[0] > 1e-9 and np.all(kl >= -1e-12)


def test_vtw_matches_text_only_attention_in_eager():
    """Withdrawing from k=0 equals a run whose eager mask already hides vision keys from text."""
    tiny = make("llava", attn="eager")
    inputs = tiny.inputs(prompts=[(2, 3)], seed=8)
    kl_sdpa = vtw_kl(make("llava").model, [inputs], ks=[0, 2])
    kl_eager = vtw_kl(tiny.model, [inputs], ks=[0, 2])  # additive float masks are edited too
    assert np.allclose(kl_sdpa, kl_eager, rtol=1e-3, atol=1e-8)


@pytest.mark.parametrize("name", ["llava", "qwen3_vl", "paligemma", "gemma3"])
def test_angular_distance_in_unit_interval_and_matches_reference(name):
    tiny = make(name)
    inputs = tiny.inputs(prompts=PROMPTS, seed=9)
    pairs, _ = layer_io(tiny.model, inputs)
    last = inputs["attention_mask"].shape[1] - 1
    states = [pairs[0][0][:, last]] + [out[:, last] for _, out in pairs]
    for n in (1, 2, 4):
        ang = angular_distance(tiny.model, [inputs], n=n)
        assert ang.shape == (5 - n,)
        assert np.all((ang >= 0) & (ang <= 1))
        ref = [torch.arccos(torch.nn.functional.cosine_similarity(states[l], states[l + n], dim=-1)
                            .clamp(-1, 1)).mean().item() / math.pi for l in range(5 - n)]
        assert np.allclose(ang, ref, atol=1e-6)
    with pytest.raises(InputError, match="block size"):
        angular_distance(tiny.model, [inputs], n=5)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "idefics3", "paligemma"])
@pytest.mark.parametrize("query", ["all", "last"])
def test_fastv_matches_eager_attentions(name, query):
    layer = 1
    inputs = make(name).inputs(prompts=[(2, 3), (0, 4)], seed=10)
    fast = fastv_scores(make(name).model, [inputs], layer=layer, query=query)
    with torch.no_grad():
        att = make(name, attn="eager").model(**inputs, output_attentions=True).attentions[layer]
    att = att.double().mean(1)  # [B, N, N], mean over heads
    kinds = Backbone.of(make(name).model).token_kinds(inputs["input_ids"], inputs["attention_mask"])
    for b in range(2):
        real = kinds[b] != TokenKind.PAD
        recv = att[b][real].mean(0) if query == "all" else att[b, -1]
        pos = (kinds[b] == TokenKind.VISION).nonzero()[:, 0]
        assert np.array_equal(fast.positions[b], pos.numpy())
        assert np.allclose(fast.scores[b], recv[pos].numpy(), atol=1e-6)
        ranked = recv[pos].numpy()[fast.ranking[b]]
        assert np.all(np.diff(ranked) <= 1e-6)  # the ranking sorts the eager scores
    kept = fast.keep(0.5)
    assert all(len(k) == math.ceil(0.5 * len(p)) for k, p in zip(kept, fast.positions))


def test_fastv_shapes_and_bad_arguments():
    tiny = make("llava")
    inputs = tiny.inputs(prompts=[(1, 3)], seed=11)
    fast = fastv_scores(tiny.model, [inputs], layer=0)
    assert len(fast.scores[0]) == tiny.image_tokens and np.all(np.isfinite(fast.scores[0]))
    assert sorted(fast.ranking[0].tolist()) == list(range(tiny.image_tokens))
    with pytest.raises(InputError, match="layer"):
        fastv_scores(tiny.model, [inputs], layer=4)
    with pytest.raises(InputError, match="query"):
        fastv_scores(tiny.model, [inputs], layer=0, query="first")


def test_right_padding_reads_the_last_real_position():
    tiny = make("llava")
    left = tiny.inputs(prompts=[(2, 3), (0, 1)], seed=12, pad_left=True)
    right = tiny.inputs(prompts=[(2, 3), (0, 1)], seed=12, pad_left=False)
    assert np.allclose(layer_contribution(tiny.model, [left]), layer_contribution(tiny.model, [right]), atol=1e-7)
    assert np.allclose(vtw_kl(tiny.model, [left], ks=[1]), vtw_kl(tiny.model, [right], ks=[1]), atol=1e-7)
    assert np.allclose(angular_distance(tiny.model, [left]), angular_distance(tiny.model, [right]), atol=1e-6)


def test_measures_need_images():
    tiny = make("llava")
    no_image = [tiny.inputs(prompts=[(2, 2)], images=[False])]
    with pytest.raises(InputError, match="vision tokens"):
        layer_contribution(tiny.model, no_image)
    with pytest.raises(InputError, match="vision tokens"):
        vtw_kl(tiny.model, no_image)
    with pytest.raises(InputError, match="no batch"):
        angular_distance(tiny.model, [])


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "gemma3"])
def test_attention_removal_matches_the_attention_module_with_vision_keys_masked(name):
    """The exact change T5 bounds, recomputed independently: the layer's own attention module called
    twice on its captured input, with the causal mask and with the vision keys masked out as well."""
    layer = 1
    tiny = make(name, attn="eager")
    inputs = tiny.inputs(prompts=[(2, 3)], seed=13)
    got = attention_removal(tiny.model, [inputs], layer)
    bb = Backbone.of(tiny.model)
    attn = bb.attention(layer)
    seen = {}
    handle = attn.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        tiny.model(**inputs, use_cache=False)
    handle.remove()
    n = seen["hidden_states"].shape[1]
    vision = bb.vision_mask(inputs["input_ids"])[0]
    hf_mask = seen["attention_mask"]  # what the layer got: causal, and Gemma 3's sliding window
    causal = hf_mask[0, 0] if hf_mask.dtype == torch.bool else hf_mask[0, 0] == 0

    def attend(allowed: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
        with torch.no_grad():
            return attn(**dict(seen, attention_mask=mask, past_key_values=None))[0][0]

    full, text_only = attend(causal), attend(causal & ~vision[None, :] | torch.eye(n, dtype=torch.bool))
    queries = [t for t in range(n) if not vision[t] and vision[:t].any()]
    expected = (full - text_only)[queries].norm(dim=-1).double().numpy()
    assert got.n == len(queries) == 3  # the three text tokens after the image; those before see no vision key
    assert np.allclose(got.change, expected, rtol=1e-4, atol=1e-6)
    assert np.allclose(got.output_norm, full[queries].norm(dim=-1).double().numpy(), rtol=1e-4, atol=1e-6)
    assert np.all(got.change <= got.bound) and np.all((got.tau > 0) & (got.tau <= 1))


def test_attention_removal_bad_input():
    tiny = make("llava")
    with pytest.raises(InputError, match="layer"):
        attention_removal(tiny.model, [tiny.inputs(prompts=[(2, 3)])], layer=4)
    with pytest.raises(InputError, match="no text query sees a vision key"):
        attention_removal(tiny.model, [tiny.inputs(prompts=[(3, 0)])], layer=0)  # nothing after the image


def test_attention_removal_ignores_padding():
    """Left and right padding of the same batch (the second prompt is 4 tokens shorter) agree."""
    tiny = make("llava")
    left, right = (attention_removal(tiny.model, [tiny.inputs(prompts=[(2, 3), (0, 1)], seed=14, pad_left=pad)], 2)
                   for pad in (True, False))
    assert left.n == right.n == 4
    for field in ("tau", "change", "bound", "output_norm"):
        assert np.allclose(getattr(left, field), getattr(right, field), rtol=1e-5, atol=1e-7), field


def test_attention_removal_leaves_out_queries_with_a_vision_only_head(monkeypatch):
    """A head whose float32 softmax row puts no mass on text keys (every text probability underflowed)
    makes the text-only softmax undefined: that query is left out and counted, the others are unchanged."""
    tiny = make("llava")
    inputs = tiny.inputs(prompts=[(2, 3)], seed=13)
    before = attention_removal(tiny.model, [inputs], 1)
    original = Backbone.attention_probs

    def vision_only_head(self, layer_idx, x_in, kwargs, query_idx=None):
        probs, allowed = original(self, layer_idx, x_in, kwargs, query_idx)
        vision = self.vision_mask(inputs["input_ids"]).to(probs.device)[0].float()  # [N]
        row = probs[0, 0, -1] * vision  # last text query, head 0: its vision part only
        probs = probs.clone()
        probs[0, 0, -1] = row / row.sum()
        return probs, allowed

    monkeypatch.setattr(Backbone, "attention_probs", vision_only_head)
    after = attention_removal(tiny.model, [inputs], 1)
    assert before.n == 3 and before.n_left_out == 0
    assert after.n == 2 and after.n_left_out == 1
    for field in ("change", "bound", "output_norm"):
        assert np.allclose(getattr(after, field), getattr(before, field)[:2], rtol=1e-6, atol=1e-9), field
