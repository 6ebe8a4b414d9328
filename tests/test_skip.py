"""skipit_core.skip on tiny random-init models of five VLM classes.

Every reference below is written plainly, without the code under test: physically pruned copies,
layer-by-layer forwards on selected rows, no-cache recomputation, single-sample runs.
"""

from __future__ import annotations

import copy

import pytest
import torch

from skipit_core.errors import InputError, PlanError, SkipitError, UnsupportedModelError
from skipit_core.models import Backbone, allowed_keys
from skipit_core.skip import LayerMode, SkipLayer, SkipPlan, Work, skipping
from skipit_core import models
from skipit_core.skip import runtime
from tiny_vlms import IMAGE_ID, PAD_ID, make

NAMES = ["llava", "qwen2_vl", "qwen2_5_vl", "idefics3", "paligemma", "gemma3", "qwen3_vl", "smolvlm", "llava_next"]
N_LAYERS = 4
_MODELS: dict = {}



def tiny(name: str, n_layers: int = N_LAYERS):
    """One shared tiny model per (class, depth); tests must leave it as they found it."""
    if (name, n_layers) not in _MODELS:
        _MODELS[name, n_layers] = make(name, n_layers=n_layers)
    return _MODELS[name, n_layers]


def plans():
    """One plan of every kind, plus compositions, including plans that skip layer 0."""
    return {
        "late_entry": SkipPlan.late_entry(2),
        "early_exit": SkipPlan.early_exit(1),
        "freeze": SkipPlan.vision_freeze([1, 2]),
        "whole": SkipPlan.whole_layers([0, 2]),
        "mixed": SkipPlan.late_entry(1) | SkipPlan.early_exit(3) | SkipPlan.whole_layers(0),
        "freeze_exit": SkipPlan.vision_freeze(1) | SkipPlan.early_exit(3),
    }


def positions(inputs: dict, name: str) -> dict:
    """Position ids from the attention mask, as generate() builds them (Qwen computes its own M-RoPE)."""
    if name.startswith("qwen"):
        return {}
    return {"position_ids": (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)}


def logits(model, inputs: dict, name: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **positions(inputs, name), use_cache=False).logits


# ----------------------------------------------------------------------------- plans themselves
def test_top_level_names():
    import skipit_core as sk

    assert sk.SkipPlan is SkipPlan and sk.skipping is skipping


def test_plan_composes_prints_and_reports_modes():
    plan = SkipPlan.late_entry(2) | SkipPlan.early_exit(10) | SkipPlan.whole_layers([5, 6, 7]) \
        | SkipPlan.vision_freeze(range(3, 5))
    assert str(plan) == "late_entry(2) | early_exit(10) | vision_freeze(3,4) | whole_layers(5-7)"
    assert "late_entry(2)" in repr(plan)
    modes = plan.modes(12)
    assert modes[:2] == (LayerMode.TEXT,) * 2 and modes[2] is LayerMode.FULL
    assert modes[3] is LayerMode.FREEZE and modes[5] is LayerMode.SKIP and modes[10] is LayerMode.TEXT
    assert plan.participants(3, 12) == {"text": Work.ALL, "vision": Work.KV}
    assert plan.participants(0, 12) == {"text": Work.ALL, "vision": Work.NONE}
    assert plan.participants(6, 12) == {"text": Work.NONE, "vision": Work.NONE}
    assert SkipPlan.none().is_empty and str(SkipPlan.none()) == "none()"
    assert SkipPlan.late_entry(0).is_noop(4) and SkipPlan.early_exit(4).is_noop(4)
    assert plan == (SkipPlan.late_entry(2) | SkipPlan.early_exit(10) | SkipPlan.whole_layers([5, 6, 7])
                    | SkipPlan.vision_freeze([3, 4]))
    with pytest.raises(Exception):
        plan.entry = 3  # immutable


@pytest.mark.parametrize("build, match", [
    (lambda: SkipPlan.late_entry(5) | SkipPlan.early_exit(3), "before late_entry"),
    (lambda: SkipPlan.late_entry(2) | SkipPlan.late_entry(3), "two different late_entry"),
    (lambda: SkipPlan.whole_layers([1, 2]) | SkipPlan.vision_freeze(2), "both skipped whole and vision-frozen"),
    (lambda: SkipPlan.early_exit(3) | SkipPlan.vision_freeze([2, 3]), "already removed"),
    (lambda: SkipPlan.late_entry(-1), "non-negative"),
    (lambda: SkipPlan.whole_layers(["a"]), "non-negative ints"),
])
def test_contradictory_plans_raise(build, match):
    with pytest.raises(PlanError, match=match):
        build()


def test_plan_for_a_deeper_model_is_rejected():
    model = tiny("llava", n_layers=12).model
    with pytest.raises(PlanError, match="at least 20 layers; this backbone has 12"):
        SkipPlan.early_exit(20).validate(Backbone.of(model))
    with pytest.raises(PlanError, match="has 12 layers"):
        with skipping(model, SkipPlan.whole_layers([3, 30])):
            pass
    assert SkipPlan.early_exit(12).validate(12).exit == 12


# ----------------------------------------------------------------------------- exact no-ops
@pytest.mark.parametrize("name", NAMES)
def test_noop_plans_are_bit_exact(name):
    t = tiny(name)
    inputs = t.inputs(prompts=[(2, 3), (1, 2)])
    ref = logits(t.model, inputs, name)
    for plan in (SkipPlan.none(), SkipPlan.early_exit(N_LAYERS), SkipPlan.late_entry(0)):
        with skipping(t.model, plan):
            assert torch.equal(logits(t.model, inputs, name), ref), plan


# ----------------------------------------------------------------------------- whole layers
def pruned_copy(model, skip: set[int]):
    """A deep copy with the layers in ``skip`` physically removed and ``layer_idx`` renumbered."""
    clone = copy.deepcopy(model)
    bb = Backbone.of(clone)
    kept = [layer for i, layer in enumerate(bb.layers) if i not in skip]
    for new_idx, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_idx
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    bb.text_model.layers = torch.nn.ModuleList(kept)
    cfg = bb.text_model.config
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in skip]
    cfg.num_hidden_layers = len(kept)
    return clone


@pytest.mark.parametrize("name", NAMES)
def test_whole_layers_equal_a_pruned_copy(name):
    if name == "qwen3_vl":
        pytest.skip("Qwen3-VL adds deepstack features after layers 0..d-1 by index: a pruned copy moves them")
    t = tiny(name)
    inputs = t.inputs(prompts=[(2, 3), (1, 2)])
    for skip in ({0, 2}, {3}):
        ref = logits(pruned_copy(t.model, skip), inputs, name)
        with skipping(t.model, SkipPlan.whole_layers(skip)):
            out = logits(t.model, inputs, name)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- row-level reference
def layer_inputs(model, inputs: dict, name: str) -> dict:
    """Per layer, what the unskipped model hands it: (hidden_states, bool mask [1,1,N,N], (cos, sin))."""
    bb, seen, handles = Backbone.of(model), {}, []
    for i, layer in enumerate(bb.layers):
        def hook(mod, args, kwargs, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            n = x.shape[1]
            mask = allowed_keys(kwargs.get("attention_mask"), x.shape[0], n, n, x.device)
            seen[i] = (x, mask, kwargs["position_embeddings"])
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))

    def deepstack(module, args, kwargs):  # Qwen3-VL adds visual features to vision rows after early layers
        seen["deepstack"] = (kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds") or [])
    handles.append(bb.text_model.register_forward_pre_hook(deepstack, with_kwargs=True))
    try:
        logits(model, inputs, name)
    finally:
        for h in handles:
            h.remove()
    return seen


def manual_logits(model, inputs: dict, name: str, plan: SkipPlan) -> torch.Tensor:
    """The plan's meaning, one sample, no cache: each layer runs on the rows the plan lets in.

    FULL: all rows; TEXT: text rows only (vision rows keep their states, are absent as keys);
    FREEZE: the whole layer, then the vision rows get their input back; SKIP: identity.
    Qwen3-VL's deepstack features are added to the vision rows after layer i as the model does, whatever
    the plan did in layer i.
    """
    assert inputs["input_ids"].shape[0] == 1
    bb = Backbone.of(model)
    seen = layer_inputs(model, inputs, name)
    vision = bb.vision_mask(inputs["input_ids"])[0]
    h = seen[0][0]
    with torch.no_grad():
        for i, mode in enumerate(plan.modes(bb.n_layers)):
            if mode is not LayerMode.SKIP:
                _, mask, (cos, sin) = seen[i]
                rows = torch.nonzero(~vision).squeeze(1) if mode is LayerMode.TEXT else torch.arange(h.shape[1])
                out = bb.layers[i](h[:, rows], attention_mask=mask[:, :, rows][:, :, :, rows],
                                   position_embeddings=(cos[:, rows], sin[:, rows]),
                                   position_ids=None, past_key_values=None, use_cache=False)
                if mode is LayerMode.FREEZE:
                    out = torch.where(vision[None, :, None], h, out)
                h = h.clone()
                h[:, rows] = out
            where, extra = seen["deepstack"]
            if i < len(extra):
                h = h.clone()
                h[where] += extra[i]
        return model.lm_head(bb.norm(h))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["late_entry", "early_exit", "freeze", "mixed", "freeze_exit"])
def test_plans_match_a_row_level_reference(name, kind):
    t, plan = tiny(name), plans()[kind]
    inputs = t.inputs(prompts=[(2, 3)])
    ref = manual_logits(t.model, inputs, name, plan)
    with skipping(t.model, plan):
        out = logits(t.model, inputs, name)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (out - logits(t.model, inputs, name)).abs().max() > 1e-4  # the plan did change something


@pytest.mark.parametrize("name", NAMES)
def test_early_exit_equals_full_model_then_text_only_pass(name):
    """Early Exit at k == run layers 0..k-1 on everything, then layers k.. afresh on the text rows only
    (the vision rows' layer-k keys/values dropped), vision rows keeping their layer-k input."""
    t, k = tiny(name), 2
    inputs = t.inputs(prompts=[(2, 3)])
    bb = Backbone.of(t.model)
    seen = layer_inputs(t.model, inputs, name)
    h_k, mask, (cos, sin) = seen[k]  # input of layer k after the full model's layers 0..k-1
    text = torch.nonzero(~bb.vision_mask(inputs["input_ids"])[0]).squeeze(1)
    x = h_k[:, text]
    with torch.no_grad():
        for i in range(k, bb.n_layers):
            x = bb.layers[i](x, attention_mask=seen[i][1][:, :, text][:, :, :, text],
                             position_embeddings=(seen[i][2][0][:, text], seen[i][2][1][:, text]),
                             position_ids=None, past_key_values=None, use_cache=False)
        final = h_k.clone()
        final[:, text] = x
        ref = t.model.lm_head(bb.norm(final))
    with skipping(t.model, SkipPlan.early_exit(k)):
        out = logits(t.model, inputs, name)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- positions
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["late_entry", "early_exit"])
def test_text_tokens_keep_their_rotary_positions(name, kind):
    """The attention of a text-only layer gets, for each text row, the very (cos, sin) of the full run
    (for Qwen these merge all three M-RoPE rows: temporal, height, width)."""
    t, plan = tiny(name), plans()[kind]
    inputs = t.inputs(prompts=[(2, 3)])
    bb = Backbone.of(t.model)
    text = ~bb.vision_mask(inputs["input_ids"])[0]
    layer = 0 if kind == "late_entry" else N_LAYERS - 1
    attn = bb.layers[layer].self_attn
    got = {}

    def record(module, args, kwargs):
        got.setdefault("pe", kwargs["position_embeddings"])
    full = layer_inputs(t.model, inputs, name)[layer][2]
    handle = attn.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with skipping(t.model, plan):
            logits(t.model, inputs, name)
    finally:
        handle.remove()
    for mine, ref in zip(got["pe"], full):
        assert mine.shape[1] == int(text.sum())
        assert torch.equal(mine[0], ref.expand(1, -1, -1)[0, text])
    if name.startswith("qwen"):  # M-RoPE really is 3-D here: text after the image is not at arange positions
        ids, _ = t.model.model.get_rope_index(inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"],
                                              attention_mask=inputs["attention_mask"],
                                              mm_token_type_ids=inputs["mm_token_type_ids"])
        assert ids.shape[0] == 3 and not torch.equal(ids[0, 0], torch.arange(ids.shape[-1]))


# ----------------------------------------------------------------------------- generate + KV cache
def extend(inputs: dict, token: torch.Tensor, name: str) -> dict:
    """The inputs with one generated token appended, as a no-cache reference sees them."""
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], token[:, None]], 1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(token)[:, None]], 1)
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in inputs:  # PaliGemma: generated tokens are suffix (causal), type 1
            out[key] = torch.cat([inputs[key], torch.full_like(token, int(name == "paligemma"))[:, None]], 1)
    return out


def banned(model) -> list[int]:
    """Tokens neither run may produce: the image token (its no-cache rerun would need pixels) and EOS
    (generate pads finished rows, which the reference does not)."""
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return [IMAGE_ID, *eos]


def greedy_without_cache(model, inputs: dict, name: str, n_new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute the whole sequence at every step without a cache; next token = argmax of the last logits."""
    steps = []
    for _ in range(n_new):
        last = logits(model, inputs, name)[:, -1]
        last[:, banned(model)] = -float("inf")
        steps.append(last)
        inputs = extend(inputs, last.argmax(-1), name)
    return inputs["input_ids"], torch.stack(steps, 1)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["none", "late_entry", "early_exit", "freeze", "whole", "mixed"])
def test_generate_with_cache_matches_no_cache_recomputation(name, kind):
    t = tiny(name)
    plan = SkipPlan.none() if kind == "none" else plans()[kind]
    inputs = t.inputs(prompts=[(2, 3), (1, 2), (3, 1)], images=[True, False, True])
    with skipping(t.model, plan), torch.no_grad():
        gen = t.model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, suppress_tokens=banned(t.model), pad_token_id=PAD_ID)
        ids, ref = greedy_without_cache(t.model, inputs, name, 4)
    assert torch.equal(gen.sequences, ids)
    got = torch.stack(gen.logits, 1)
    keep = torch.ones(got.shape[-1], dtype=torch.bool)
    keep[banned(t.model)] = False
    torch.testing.assert_close(got[..., keep], ref[..., keep], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_beam_search_with_cache_matches_without(name):
    """Beam search reorders the cache rows each step; the ledger's per-row columns must follow."""
    t = tiny(name)
    inputs = t.inputs(prompts=[(2, 3), (1, 2)], images=[True, False])
    kwargs = dict(max_new_tokens=3, num_beams=2, do_sample=False, suppress_tokens=banned(t.model),
                  pad_token_id=PAD_ID)
    with skipping(t.model, plans()["mixed"]), torch.no_grad():
        cached = t.model.generate(**inputs, **kwargs)
        uncached = t.model.generate(**inputs, **kwargs, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("kind", ["whole", "mixed", "late_entry"])
def test_cache_layer_lengths_and_manual_decoding(kind):
    """Skipped layers hold nothing, text-only layers hold text only; a hand-written decode loop with the
    cache (model called directly, positions left to the model) matches a no-cache rerun."""
    t, name, plan = tiny("llava"), "llava", plans()[kind]
    inputs = t.inputs(prompts=[(2, 3)])
    n, n_vision = inputs["input_ids"].shape[1], t.image_tokens
    with skipping(t.model, plan), torch.no_grad():
        out = t.model(**inputs, use_cache=True)
        cache = out.past_key_values
        expect = {LayerMode.FULL: n, LayerMode.TEXT: n - n_vision, LayerMode.SKIP: 0}
        modes = plan.modes(N_LAYERS)
        assert [layer.get_seq_length() for layer in cache.layers] == [expect[m] for m in modes]
        assert cache.get_seq_length() == n  # global length, whatever layer 0 holds
        step = dict(inputs)
        for _ in range(3):
            token = out.logits[:, -1].argmax(-1)
            step = extend(step, token, name)
            out = t.model(input_ids=token[:, None], attention_mask=step["attention_mask"],
                          past_key_values=cache, use_cache=True)
            ref = logits(t.model, step, name)[:, -1]
            torch.testing.assert_close(out.logits[:, -1], ref, atol=1e-5, rtol=0)
    with pytest.raises(PlanError, match="only valid under that plan"):  # outside, it refuses (issue 10)
        cache.get_seq_length()


# ----------------------------------------------------------------------------- batches
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["late_entry", "early_exit", "freeze", "mixed"])
def test_padded_batch_equals_single_runs(name, kind):
    """Left padding, one sample without an image: each row of the batch equals its own single run."""
    t, plan = tiny(name), plans()[kind]
    prompts, images = [(2, 3), (1, 2), (4, 1)], [True, False, True]
    batch = t.inputs(prompts=prompts, images=images)
    with skipping(t.model, plan):
        out = logits(t.model, batch, name)
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        single = t.inputs(prompts=[prompt], images=[image])
        n = single["input_ids"].shape[1]
        for key in ("input_ids", "mm_token_type_ids", "token_type_ids"):  # the batch's tokens, unpadded
            if key in batch:
                single[key] = batch[key][i:i + 1, -n:]
        if image:  # the same pixels as the batch gave this sample
            single = _same_pixels(t, batch, single, sum(images[:i]))
            with skipping(t.model, plan):
                ref = logits(t.model, single, name)
        else:  # no vision token: only the whole-layer part of the plan acts (running it raises, see below)
            with skipping(t.model, SkipPlan(whole=plan.whole)):
                ref = logits(t.model, single, name)
        torch.testing.assert_close(out[i:i + 1, -n:], ref, atol=1e-5, rtol=0)


def _same_pixels(t, batch: dict, single: dict, image_index: int) -> dict:
    """A single sample's pixel inputs replaced by the batch's pixels of image ``image_index``."""
    single = dict(single)
    for key, value in batch.items():
        if key in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"):
            continue
        if key == "pixel_values" and t.name.startswith("qwen"):  # flattened patches, image after image
            patches = value.shape[0] // batch["image_grid_thw"].shape[0]
            single[key] = value[image_index * patches:(image_index + 1) * patches]
        else:
            single[key] = value[image_index:image_index + 1]
    return single


def test_batch_with_different_numbers_of_images():
    """LLaVA batch: 2 images, none, 1 image (left padded) == three single runs."""
    t, name, plan = tiny("llava"), "llava", SkipPlan.late_entry(1) | SkipPlan.early_exit(3)
    gen = torch.Generator().manual_seed(3)
    block = [IMAGE_ID] * t.image_tokens
    rows = [[1, 5, *block, 6, *block, 7], [1, 8, 9, 10], [1, 11, *block, 12, 13]]
    pixels = torch.randn(3, 3, 16, 16, generator=gen)
    width = max(map(len, rows))
    ids = torch.full((3, width), PAD_ID)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    with skipping(t.model, plan):
        out = logits(t.model, batch, name)
    singles = [(0, pixels[0:2], plan), (1, None, SkipPlan.none()), (2, pixels[2:3], plan)]
    for i, pix, p in singles:
        row = torch.tensor([rows[i]])
        single = {"input_ids": row, "attention_mask": torch.ones_like(row)}
        if pix is not None:
            single["pixel_values"] = pix
        with skipping(t.model, p):
            ref = logits(t.model, single, name)
        torch.testing.assert_close(out[i:i + 1, -len(rows[i]):], ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- really removed
def test_rows_leave_the_tensors_and_layers_are_not_called(monkeypatch):
    t = tiny("llava")
    inputs = t.inputs(prompts=[(2, 3)])
    n, n_text = inputs["input_ids"].shape[1], inputs["input_ids"].shape[1] - t.image_tokens
    bb = Backbone.of(t.model)
    shapes: dict = {}

    def rows_seen(key):
        def hook(module, args):
            shapes.setdefault(key, args[0].shape[1])
        return hook
    handles = [layer.register_forward_pre_hook(rows_seen(("layer", i))) for i, layer in enumerate(bb.layers)]
    handles += [bb.layers[1].self_attn.q_proj.register_forward_pre_hook(rows_seen("q1")),
                bb.layers[1].self_attn.k_proj.register_forward_pre_hook(rows_seen("k1")),
                bb.layers[1].mlp.register_forward_pre_hook(rows_seen("mlp1"))]
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: (a[0].shape[-1] == bb.head_dim and calls.append(a[0].shape[2]))
                        or sdpa(*a, **kw))
    plan = SkipPlan.whole_layers(0) | SkipPlan.vision_freeze(1) | SkipPlan.early_exit(3)
    try:
        with skipping(t.model, plan):
            assert isinstance(bb.layers[0], SkipLayer) and not isinstance(bb.layers[2], SkipLayer)
            logits(t.model, inputs, "llava")
    finally:
        for h in handles:
            h.remove()
    assert ("layer", 0) not in shapes                    # whole-layer skip: never called
    assert shapes["q1"] == n_text and shapes["mlp1"] == n_text and shapes["k1"] == n  # vision freeze
    assert shapes["layer", 2] == n and shapes["layer", 3] == n_text  # early exit: text rows only
    assert calls == [n_text, n, n_text]                   # SDPA for every attention that ran, on kept queries
    assert t.model.config.text_config._attn_implementation == "sdpa"


def test_one_host_sync_per_prefill_none_per_decode_step(monkeypatch):
    t = tiny("llava")
    inputs = t.inputs(prompts=[(2, 3), (1, 1)], images=[True, False])
    inside = {"on": False, "syncs": 0}

    def counting(method):
        original = getattr(torch.Tensor, method)

        def wrapper(self, *a, **kw):
            if inside["on"]:
                inside["syncs"] += 1
            return original(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, method, wrapper)

    for method in ("item", "tolist", "__bool__", "cpu", "numpy", "nonzero", "__int__"):
        counting(method)
    forward = SkipLayer.forward

    def watched(self, *a, **kw):
        inside["on"] = True
        try:
            return forward(self, *a, **kw)
        finally:
            inside["on"] = False
    monkeypatch.setattr(SkipLayer, "forward", watched)
    counts = []
    plan = SkipPlan.late_entry(1) | SkipPlan.vision_freeze(1) | SkipPlan.early_exit(3)
    with skipping(t.model, plan), torch.no_grad():
        out = t.model(**inputs, use_cache=True)
        counts.append(inside["syncs"])
        step = dict(inputs)
        for _ in range(2):
            token = out.logits[:, -1].argmax(-1)
            step = extend(step, token, "llava")
            out = t.model(input_ids=token[:, None], attention_mask=step["attention_mask"],
                          past_key_values=out.past_key_values, use_cache=True)
            counts.append(inside["syncs"])
    assert counts == [1, 1, 1]


# ----------------------------------------------------------------------------- restoration
def snapshot(model):
    return list(model.modules()), {k: v.clone() for k, v in model.state_dict().items()}


def assert_restored(model, before, inputs, name, ref):
    modules, state = before
    after = list(model.modules())
    assert len(after) == len(modules) and all(a is b for a, b in zip(after, modules))
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert torch.equal(logits(model, inputs, name), ref)
    assert runtime.active_session(model) is None


@pytest.mark.parametrize("name", NAMES)
def test_model_restored_after_context_and_after_exception(name):
    t = tiny(name)
    inputs = t.inputs(prompts=[(2, 3)])
    ref, before = logits(t.model, inputs, name), snapshot(t.model)
    plan = plans()["mixed"] | SkipPlan.vision_freeze(2)
    with skipping(t.model, plan):
        assert not torch.equal(logits(t.model, inputs, name), ref)
    assert_restored(t.model, before, inputs, name, ref)
    with pytest.raises(RuntimeError, match="boom"):
        with skipping(t.model, plan):
            logits(t.model, inputs, name)
            raise RuntimeError("boom")
    assert_restored(t.model, before, inputs, name, ref)
    text_only = t.inputs(prompts=[(2, 3)], images=[False])
    with pytest.raises(InputError, match="hold none"):  # raised inside the forward, mid-model
        with skipping(t.model, plan):
            logits(t.model, text_only, name)
    assert_restored(t.model, before, inputs, name, ref)


# ----------------------------------------------------------------------------- bad input
def test_vision_plan_on_inputs_without_image_tokens_raises():
    t = tiny("llava")
    text_only = t.inputs(prompts=[(2, 3), (1, 1)], images=[False, False])
    for plan in (SkipPlan.late_entry(1), SkipPlan.early_exit(2), SkipPlan.vision_freeze(1)):
        with pytest.raises(InputError, match="hold none"), skipping(t.model, plan):
            logits(t.model, text_only, "llava")
    with skipping(t.model, SkipPlan.whole_layers(1)):  # no vision part: text-only inputs are fine
        logits(t.model, text_only, "llava")


def test_vision_plan_needs_input_ids():
    t = tiny("llava")
    inputs = t.inputs(prompts=[(2, 3)], images=[False])
    embeds = t.model.get_input_embeddings()(inputs["input_ids"])
    with pytest.raises(InputError, match="needs `input_ids`"), skipping(t.model, SkipPlan.late_entry(1)):
        t.model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])


def test_unsupported_class_raises_before_generate():
    import transformers as tf

    lm = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, vocab_size=32))
    with pytest.raises(UnsupportedModelError, match="not a supported vision-language model"):
        with skipping(lm, SkipPlan.early_exit(1)):
            lm.generate(torch.tensor([[1, 2]]), max_new_tokens=2)
    with pytest.raises(PlanError, match="takes a SkipPlan"):
        with skipping(tiny("llava").model, "early_exit(1)"):
            pass


def test_nested_contexts(monkeypatch):
    t = tiny("llava")
    bb = Backbone.of(t.model)
    plan = SkipPlan.early_exit(2)
    with skipping(t.model, plan) as outer:
        wrapper = bb.layers[3]
        with skipping(t.model, SkipPlan.early_exit(2)) as inner:  # identical plan: re-entrant no-op
            assert inner is outer and bb.layers[3] is wrapper
        assert bb.layers[3] is wrapper  # still active after the inner exit
        with pytest.raises(PlanError, match="already active"):
            with skipping(t.model, SkipPlan.early_exit(3)):
                pass
        with pytest.raises(PlanError, match="already active"):
            with skipping(bb, SkipPlan.whole_layers(1)):  # same model through its Backbone
                pass
    assert not isinstance(bb.layers[3], SkipLayer)


def test_freeze_on_an_unknown_layer_class_raises(monkeypatch):
    monkeypatch.delitem(models.ROW_SPLIT_LAYERS, "LlamaDecoderLayer")
    with pytest.raises(PlanError, match="cannot split layer 1"):
        with skipping(tiny("llava").model, SkipPlan.vision_freeze(1)):
            pass


def test_cache_from_another_plan_is_refused():
    t = tiny("llava")
    inputs = t.inputs(prompts=[(2, 3)])
    with skipping(t.model, SkipPlan.early_exit(2)), torch.no_grad():
        cache = t.model(**inputs, use_cache=True).past_key_values
    with skipping(t.model, SkipPlan.early_exit(1)), torch.no_grad():
        with pytest.raises(PlanError, match="filled under plan early_exit\\(2\\)"):
            t.model(input_ids=inputs["input_ids"][:, -1:], past_key_values=cache,
                    attention_mask=torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=torch.long))
    assert issubclass(PlanError, SkipitError) and issubclass(InputError, SkipitError)


# --------------------------------------------------------------- every attention implementation
def _implementations() -> list[str]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ["eager"] + [impl for impl in ("flex_attention",) if impl in ALL_ATTENTION_FUNCTIONS]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("impl", _implementations())
def test_every_attention_implementation_gives_the_sdpa_result_or_a_plan_error(name, impl):
    """The masks skipit builds must be in the encoding each implementation expects (eager adds them)."""
    ref_model, inputs = tiny(name), tiny(name).inputs(prompts=[(2, 3), (1, 4)], seed=7)
    try:
        other = make(name, n_layers=N_LAYERS, attn=impl)
    except ValueError as exc:  # transformers itself refuses the implementation for this class
        pytest.skip(f"{name} does not support {impl} in transformers: {str(exc)[:80]}")
    other.model.load_state_dict(ref_model.model.state_dict())
    for kind, plan in plans().items():
        with skipping(ref_model.model, plan):
            ref = logits(ref_model.model, inputs, name)
        try:
            with skipping(other.model, plan):
                out = logits(other.model, inputs, name)
        except PlanError as exc:
            assert "sdpa" in str(exc) and impl != "eager", (kind, exc)
            continue
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=0, msg=lambda m: f"{impl} {kind}: {m}")


@pytest.mark.parametrize("kind", ["late_entry", "early_exit", "whole"])
def test_cache_filled_under_a_plan_refuses_use_outside_it(kind):
    """Before: generate() continued such a cache outside the context with a wrong length (6 of 10)."""
    t, plan = tiny("llava"), plans()[kind]
    inputs = t.inputs(prompts=[(2, 3)])
    with skipping(t.model, plan):
        out = t.model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    with pytest.raises(PlanError, match="inside the same context"):
        cache.get_seq_length()
    step = {"input_ids": out.sequences[:, -1:], "attention_mask": torch.ones_like(out.sequences)}
    with pytest.raises(PlanError, match="only valid under that plan"):
        t.model(**step, past_key_values=cache)
    with skipping(t.model, plan), torch.no_grad():  # back under the same plan it continues
        t.model(**step, past_key_values=cache)
        assert cache.get_seq_length() == out.sequences.shape[1]


# ------------------------------------------------------------- red-team: issue 10, second round
@pytest.mark.parametrize("plan", [SkipPlan.whole_layers(1), SkipPlan.late_entry(2), SkipPlan.vision_freeze(1)])
def test_static_cache_under_a_plan_is_refused_with_what_works(plan):
    """Before: a raw RuntimeError (size mismatch) from inside attention, even for whole_layers(1)."""
    t = tiny("llava")
    inputs = t.inputs(prompts=[(2, 3)])
    with skipping(t.model, plan), pytest.raises(PlanError, match="StaticLayer.*cache_implementation='static'"):
        t.model.generate(**inputs, max_new_tokens=2, do_sample=False, cache_implementation="static")
    # the no-op plan installs nothing, so static caches work as outside any context
    with skipping(t.model, SkipPlan.none()):
        out = t.model.generate(**inputs, max_new_tokens=2, do_sample=False, cache_implementation="static")
    ref = t.model.generate(**inputs, max_new_tokens=2, do_sample=False, cache_implementation="static")
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", ["llava", "gemma3"])
def test_deepcopy_state_dict_and_save_pretrained_inside_a_context_are_those_of_the_model(name, tmp_path):
    """Before: state_dict keys ``layers.N.layer.*`` inside a context (a broken checkpoint), and a deep
    copy that kept the wrappers and the session's hooks."""
    from transformers import AutoModelForImageTextToText

    t = tiny(name)
    inputs = t.inputs(prompts=[(2, 3)])
    ref_keys = list(t.model.state_dict())
    ref = logits(t.model, inputs, name)
    plan = SkipPlan.vision_freeze(1) | SkipPlan.whole_layers(3)
    with skipping(t.model, plan):
        assert list(t.model.state_dict()) == ref_keys
        t.model.load_state_dict(t.model.state_dict(), strict=True)
        clone = copy.deepcopy(t.model)
        t.model.save_pretrained(tmp_path)
        skipped = logits(t.model, inputs, name)
    assert not any(isinstance(m, SkipLayer) for m in clone.modules())
    assert torch.equal(logits(clone, inputs, name), ref)  # the copy is the model without the plan ...
    with skipping(clone, plan):  # ... and takes plans of its own
        assert torch.equal(logits(clone, inputs, name), skipped)
    saved = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(saved, inputs, name), ref)


def test_plan_indices_accept_integer_likes_and_refuse_bools():
    """Before: np.int64(2) and 0-d integer tensors were refused with a message that read like a string."""
    import numpy as np

    assert SkipPlan.late_entry(np.int64(2)) == SkipPlan.late_entry(2)
    assert SkipPlan.early_exit(torch.tensor(3)) == SkipPlan.early_exit(3)
    assert SkipPlan.whole_layers(np.arange(1, 3)) == SkipPlan.whole_layers([1, 2])
    assert SkipPlan.vision_freeze(torch.tensor([1, 2])) == SkipPlan.vision_freeze(range(1, 3))
    assert str(SkipPlan.late_entry(np.int64(2))) == "late_entry(2)"
    for bad in (True, np.bool_(False), torch.tensor(True), 2.0, -1, "2", None):
        with pytest.raises(PlanError, match="non-negative integer"):
            SkipPlan.late_entry(bad)
    for bad in ([1, True], [np.bool_(True)], "12", [1.5], [-1], None):
        with pytest.raises(PlanError, match="layer ind"):
            SkipPlan.whole_layers(bad)


def test_skipping_runs_the_input_check_that_profile_runs():
    """Before: Qwen2.5-VL inputs without mm_token_type_ids ran under a plan with 1-D positions (1.8e-3 off)."""
    t = tiny("qwen2_5_vl")
    inputs = t.inputs(prompts=[(2, 3)])
    bad = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    for plan in (SkipPlan.late_entry(1), SkipPlan.whole_layers(2)):
        with skipping(t.model, plan), torch.no_grad(), pytest.raises(InputError, match="mm_token_type_ids"):
            t.model(**bad)
        with skipping(t.model, plan), torch.no_grad():
            t.model.generate(**inputs, max_new_tokens=2, do_sample=False)  # decode steps carry no pixels
