"""DigitScenes (splits, balance, determinism, correctness of answers), scoring, POPE loader."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from skipit_core.errors import InputError, SkipitError
from skipit_core.tasks import (ANSWERS, QUESTION_FAMILIES, TEMPLATES, DigitScenes, VQASet, build_prompts, encode, evaluate,
                               load_pope, normalize_answer, render_scene, wilson)
from skipit_core import tasks

FIXTURES = Path(__file__).parent / "fixtures"


def oracle(question: str, digits: list[int], cells: list[int]) -> str:
    """Answer a DigitScenes question from the scene layout, independently of the generator."""
    grid = {c: d for d, c in zip(digits, cells)}
    w = question.split()
    if w[:4] == ["which", "digit", "is", "in"]:
        cell = (int(w[5]) - 1) * 4 + int(w[7]) - 1
        return str(grid[cell]) if cell in grid else "none"
    if w[:2] == ["how", "many"]:
        return str(len(digits))
    if w[:2] == ["is", "there"]:
        return "yes" if int(w[3]) in digits else "no"
    if "largest" in w:
        return str(max(digits))
    if "smallest" in w:
        return str(min(digits))
    anchor = cells[digits.index(int(w[-2]))]
    r, c = divmod(anchor, 4)
    if w[3] == "left":
        nb = anchor - 1 if c > 0 else None
    else:
        assert w[3] == "above"
        nb = anchor - 4 if r > 0 else None
    return str(grid[nb]) if nb is not None and nb in grid else "none"


@pytest.fixture(scope="module")
def small():
    return DigitScenes("train").generate(44, seed=3)


def test_splits_disjoint_by_source_image_and_stratified():
    pools = {s: np.concatenate(list(tasks.digit_pool(s).values())) for s in tasks.SPLITS}
    sets = {s: set(v.tolist()) for s, v in pools.items()}
    assert not sets["train"] & sets["validation"]
    assert not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    assert set.union(*sets.values()) == set(range(1797))
    _, target = tasks.scenes._load_digits()
    for s, frac in zip(tasks.SPLITS, tasks.SPLIT_FRACTIONS):
        for d, idx in tasks.digit_pool(s).items():
            assert (target[idx] == d).all()
            assert abs(len(idx) / (target == d).sum() - frac) < 0.01, (s, d, len(idx))


def test_scenes_use_only_their_split(small):
    train = set(np.concatenate(list(tasks.digit_pool("train").values())).tolist())
    used = {s for m in small.meta for s in m["sources"]}
    assert used <= train
    test = DigitScenes.test_set()
    test_pool = set(np.concatenate(list(tasks.digit_pool("test").values())).tolist())
    assert {s for m in test.meta for s in m["sources"]} <= test_pool


def test_answers_match_an_independent_oracle(small):
    _, target = tasks.scenes._load_digits()
    for q, a, m in zip(small.questions, small.answers, small.meta):
        assert 2 <= len(m["digits"]) <= 6 and len(set(m["digits"])) == len(m["digits"])
        assert [int(target[s]) for s in m["sources"]] == m["digits"]
        assert oracle(q, m["digits"], m["cells"]) == a, (q, m)


def test_follow_up_questions_match_the_oracle(small):
    rng = np.random.default_rng(11)
    seen = {f: set() for f in QUESTION_FAMILIES}
    for meta in small.meta[:120]:
        for family in QUESTION_FAMILIES:
            question, answer = DigitScenes.ask(meta, family, rng)
            assert question.split()[:2] == TEMPLATES[family].split()[:2]
            assert answer == oracle(question, meta["digits"], meta["cells"]), (question, meta)
            seen[family].add(answer)
    assert {"none"} < seen["cell"] and {"none"} < seen["left"] and seen["present"] == {"yes", "no"}
    with pytest.raises(SkipitError, match="unknown question family"):
        DigitScenes.ask(small.meta[0], "colour", rng)


def test_pixels_show_the_digits_in_their_cells(small):
    images, _ = tasks.scenes._load_digits()
    for img, m in zip(small.images[:20], small.meta[:20]):
        for src, cell in zip(m["sources"], m["cells"]):
            r, c = divmod(cell, 4)
            patch = img[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16].astype(float)
            want = np.kron(images[src], np.ones((2, 2)))
            assert np.abs(patch - want).mean() < 12  # light noise only
        empty = set(range(16)) - set(m["cells"])
        for cell in empty:
            r, c = divmod(cell, 4)
            assert img[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16].mean() < 8


def test_answers_are_balanced_within_each_family(small):
    counts = collections.Counter(zip(small.families, small.answers))
    for f in QUESTION_FAMILIES:
        per = [counts[(f, a)] for a in ANSWERS[f]]
        assert sum(per) == 44
        assert max(per) - min(per) <= 1, (f, per)
    test = DigitScenes.test_set()
    counts = collections.Counter(zip(test.families, test.answers))
    for f in QUESTION_FAMILIES:
        per = [counts[(f, a)] for a in ANSWERS[f]]
        assert max(per) - min(per) <= 1 and sum(per) == tasks.TEST_PER_FAMILY


def test_random_sampling_is_roughly_balanced():
    data = DigitScenes("train", families=["present", "count"]).sample(600, 0)
    c = collections.Counter(zip(data.families, data.answers))
    assert 0.4 < c[("present", "yes")] / (c[("present", "yes")] + c[("present", "no")]) < 0.6
    for n in "23456":
        assert c[("count", n)] > 30


def test_same_seed_same_bytes_other_seed_differs():
    a = DigitScenes("validation").generate(3, seed=11)
    b = DigitScenes("validation").generate(3, seed=11)
    c = DigitScenes("validation").generate(3, seed=12)
    assert a.images.tobytes() == b.images.tobytes()
    assert a.questions == b.questions and a.answers == b.answers and a.meta == b.meta
    assert a.images.tobytes() != c.images.tobytes()


def test_frozen_test_split_is_what_the_seed_generates():
    frozen = DigitScenes.test_set()
    assert len(frozen) == tasks.TEST_PER_FAMILY * len(QUESTION_FAMILIES)
    again = DigitScenes.make_test_set()
    assert frozen.images.dtype == np.uint8 and frozen.images.shape == (len(frozen), 64, 64)
    assert np.array_equal(frozen.images, again.images)
    assert frozen.questions == again.questions and frozen.answers == again.answers


def test_freeze_round_trip(tmp_path, small):
    path = DigitScenes.freeze(small[:10], tmp_path / "x")
    back = DigitScenes.load(path)
    assert np.array_equal(back.images, small.images[:10]) and back.answers == small.answers[:10]
    assert back.meta == small.meta[:10]
    with pytest.raises(SkipitError, match="not found"):
        DigitScenes.load(tmp_path / "missing")


@pytest.mark.parametrize("kwargs", [dict(families=["colour"]), dict(min_digits=0), dict(min_digits=1),
                                    dict(max_digits=11), dict(min_digits=5, max_digits=3), dict(families=[]),
                                    dict(noise=-0.1)])
def test_bad_generator_arguments(kwargs):
    with pytest.raises(SkipitError):
        DigitScenes("train", **kwargs)


def test_bad_item_arguments():
    ds = DigitScenes("train")
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match="unknown question family"):
        ds.item("colour", None, rng)
    with pytest.raises(InputError, match="not an answer"):
        ds.item("count", "9", rng)
    with pytest.raises(InputError):
        ds.generate(0)
    with pytest.raises(InputError, match="unknown split"):
        DigitScenes("dev")
    with pytest.raises(InputError, match="one per cell"):
        render_scene(list(range(17)), list(range(17)))
    with pytest.raises(InputError, match="distinct"):
        render_scene([0, 1], [3, 3])
    with pytest.raises(InputError, match="1 to 16"):
        render_scene([], [])


def test_digit_count_bounds_respected():
    data = DigitScenes("train", min_digits=3, max_digits=4).generate(12, seed=1)
    assert {len(m["digits"]) for m in data.meta} <= {3, 4}
    assert DigitScenes("train", min_digits=3, max_digits=4).answers("count") == ("3", "4")


def test_blank_keeps_questions_and_zeroes_images(small):
    b = small[:5].blank()
    assert b.questions == small.questions[:5] and not b.images.any()
    assert b.images.shape == small.images[:5].shape


def test_wilson_interval_known_values():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    from skipit_core.theory import wilson_interval

    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson(0, 20)[0] == 0.0 and wilson(20, 20)[1] == pytest.approx(1.0)


def test_normalize_answer():
    assert normalize_answer("\u2581Yes") == "yes"
    assert normalize_answer(" no.") == "no"
    assert normalize_answer("7") == "7"


@pytest.fixture(scope="module")
def tiny_llava():
    from skipit_core.zoo.build import ModelSize, build

    size = ModelSize(hidden=32, layers=2, heads=2, kv_heads=2, intermediate=64, vision_hidden=32,
                     vision_layers=1, vision_heads=2, vision_intermediate=64)
    model, processor = build("llava", size, seed=0, layout="question-first")  # the shipped folders' layout
    return model.eval(), processor


def test_prompts_and_left_padding(tiny_llava, small):
    model, processor = tiny_llava
    prompts = build_prompts(processor, ["how many digits are there ?"])
    assert prompts == ["USER: how many digits are there ? <image> ASSISTANT:"]
    data = small[:4]
    inputs = encode(processor, data)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert (mask[:, -1] == 1).all()  # left padding: every prompt ends at the last position
    assert (mask[:, 0] == 0).any()  # questions of different lengths were padded
    assert ((ids == model.config.image_token_id).sum(1) == 64).all()
    unk = processor.tokenizer.unk_token_id
    assert not (ids == unk).any()


def test_evaluate_counts_and_intervals(tiny_llava, small):
    model, processor = tiny_llava
    data = small[:21]
    r = evaluate(model, processor, data, batch_size=8, with_blank=True)
    assert r.n == 21 and 0 <= r.k <= 21 and r.accuracy == r.k / 21
    assert r.ci_low <= r.accuracy <= r.ci_high
    assert (r.ci_low, r.ci_high) == pytest.approx(wilson(r.k, 21))
    assert r.by_family["n"].sum() == 21 and r.by_family["k"].sum() == r.k
    assert r.blank is not None and r.blank.n == 21
    assert set(r.table()["family"]) == set(data.families) | {"all"}
    assert "blank_accuracy" in r.table()
    # the score is argmax-of-logits == answer: recompute by hand
    logits = tasks.next_token_logits(model, encode(processor, data))
    pred = [normalize_answer(processor.tokenizer.decode([i])) for i in logits.argmax(-1).tolist()]
    assert r.predictions == pred
    assert r.correct.tolist() == [p == a for p, a in zip(pred, data.answers)]
    # batch size does not change the predictions (left padding handled)
    assert evaluate(model, processor, data, batch_size=21).predictions == pred


def test_evaluate_rejects_bad_input(tiny_llava, small):
    model, processor = tiny_llava
    with pytest.raises(InputError):
        evaluate(model, processor, small[:0])
    with pytest.raises(InputError):
        evaluate(model, processor, small[:2], batch_size=0)
    with pytest.raises(InputError):
        evaluate(model, processor, [1, 2])


def test_load_pope_from_jsonl_and_rows():
    data = load_pope(FIXTURES / "pope" / "pope.jsonl")
    assert len(data) == 3 and data.answers == ["yes", "no", "yes"]
    assert data.families == ["random", "popular", "adversarial"]
    assert data.images[0].size == (40, 30)
    rows = [json.loads(line) for line in open(FIXTURES / "pope" / "pope.jsonl")]
    from PIL import Image

    for r in rows:
        r["image"] = Image.open(FIXTURES / "pope" / r["image"])
        r["answer"] = r["answer"].capitalize()
    data2 = load_pope(rows, prompt_suffix=" Answer with yes or no.", limit=2)
    assert len(data2) == 2 and data2.answers == ["yes", "no"]
    assert data2.questions[0].endswith("Answer with yes or no.")
    assert len(load_pope(rows, category="popular")) == 1
    blank = data.blank()
    assert blank.images[0].size == (40, 30) and blank.images[0].getextrema() == ((0, 0), (0, 0), (0, 0))
    with pytest.raises(InputError, match="yes/no"):
        load_pope([dict(rows[0], answer="maybe")])
    with pytest.raises(InputError, match="lacks `image`"):
        load_pope([{"question": "q", "answer": "yes"}])


def test_load_pope_hub_name_needs_datasets():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(SkipitError, match="pip install datasets"):
            load_pope("lmms-lab/POPE")
    else:
        pytest.skip("datasets is installed; the hub path would need the network")


def test_pope_items_run_through_evaluate(tiny_llava):
    model, processor = tiny_llava
    data = load_pope(FIXTURES / "pope" / "pope.jsonl")
    # the tiny word-level vocabulary does not know these words: they map to <unk>, but the pipeline
    # (resize of a 40x30 RGB image to 64x64, batching, scoring) must run
    r = evaluate(model, processor, data, batch_size=2)
    assert r.n == 3 and list(r.by_family["family"]) == ["adversarial", "popular", "random"]


def test_vqaset_checks_lengths():
    with pytest.raises(InputError, match="differ in length"):
        VQASet(np.zeros((2, 64, 64), np.uint8), ["q"], ["a"], ["f"])


def test_evaluate_applies_a_skip_plan(tiny_llava, small):
    from skipit_core.skip import SkipPlan

    model, processor = tiny_llava
    data = small[:8]
    base = evaluate(model, processor, data, batch_size=8)
    same = evaluate(model, processor, data, plan=SkipPlan.none(), batch_size=8)
    assert same.predictions == base.predictions
    logits = tasks.next_token_logits(model, encode(processor, data))
    from skipit_core.skip import skipping

    with skipping(model, SkipPlan.whole_layers([0, 1])):
        skipped = tasks.next_token_logits(model, encode(processor, data))
    assert not torch.allclose(logits, skipped)  # the plan really changes the computation...
    r = evaluate(model, processor, data, plan=SkipPlan.whole_layers([0, 1]), batch_size=8)
    pred = [normalize_answer(processor.tokenizer.decode([i])) for i in skipped.argmax(-1).tolist()]
    assert r.predictions == pred  # ...and evaluate scores under it
    assert torch.equal(tasks.next_token_logits(model, encode(processor, data)), logits)  # restored


def test_kept_window_reads_both_sweeps():
    from types import SimpleNamespace

    from skipit_core.tasks import kept_window

    def sweep(inside: list[bool]) -> dict:
        return {k: SimpleNamespace(ci_low=0.8 if ok else 0.1, ci_high=0.95 if ok else 0.3) for k, ok in enumerate(inside)}

    # Early Exit keeps accuracy from k = 3 on except a lone miss at 1; Late Entry up to k = 2 (4 misses)
    exits = sweep([False, True, False, True, True, True])
    entries = sweep([True, True, True, False, True, False])
    assert kept_window(exits, entries, reference=0.9) == (2, 3)
    assert kept_window(exits, sweep([True] * 6), reference=0.9) == (5, 5)  # b is raised to a
    with pytest.raises(InputError, match="no-op"):
        kept_window(sweep([False] * 3), entries, reference=0.9)


def test_each_family_is_one_object():
    import dataclasses

    from skipit_core.tasks import QuestionFamily, question_family

    rng = np.random.default_rng(4)
    for name, fam in QUESTION_FAMILIES.items():
        assert isinstance(fam, QuestionFamily) and fam.name == name and question_family(name) is fam
        assert TEMPLATES[name] == fam.template and ANSWERS[name] == fam.answers()
        with pytest.raises(dataclasses.FrozenInstanceError):
            fam.template = "x"
        for answer in fam.answers(3, 5):
            digits, cells, fields = fam.make(answer, 3, 5, rng)
            assert 3 <= len(digits) <= 5 and len(set(digits)) == len(digits) == len(set(cells))
            assert oracle(fam.question(**fields), digits, cells) == answer, (name, answer)
    with pytest.raises(InputError, match="unknown question family"):
        question_family("colour")


def test_python_m_tasks_rewrites_the_frozen_split(tmp_path, capsys):
    from skipit_core.tasks.datasets import main

    main(["--freeze", str(tmp_path / "test")])
    assert "wrote" in capsys.readouterr().out
    stem = tasks.test_set_path()
    assert (tmp_path / "test.jsonl").read_bytes() == stem.with_suffix(".jsonl").read_bytes()
    assert np.array_equal(DigitScenes.load(tmp_path / "test").images, DigitScenes.test_set().images)


def test_vqaset_save_load_round_trip_and_a_clear_error_for_mixed_shapes(tmp_path):
    """``VQASet.save`` (the format ``skipit --data <folder>`` reads) round-trips exactly, POPE-like sets
    of differently sized images are refused with the fix, and ``summarise`` is evaluate's own scoring."""
    from skipit_core.errors import InputError
    from skipit_core.tasks import VQASet, summarise

    small = DigitScenes.test_set()[:6]
    back = VQASet.load(small.save(tmp_path / "mine"))
    assert np.array_equal(back.images, small.images) and back.questions == small.questions
    assert back.answers == small.answers and back.families == small.families and back.meta == small.meta
    mixed = VQASet([np.zeros((4, 4), np.uint8), np.zeros((5, 4), np.uint8)], ["q", "q"], ["a", "b"], ["f", "f"])
    with pytest.raises(InputError, match="share one shape.*Resize"):
        mixed.save(tmp_path / "mixed")
    r = summarise(["f", "f", "g"], np.array([True, False, True]), ["a", "b", "c"])
    assert (r.k, r.n) == (2, 3) and (r.ci_low, r.ci_high) == pytest.approx(wilson(2, 3))
