"""Chapter 7 (your own model) on a saved checkpoint of every supported class, and the library it uses.

Each tiny random-init model of ``tests/tiny_vlms.py`` is saved with ``save_pretrained`` next to a real
processor of its class (a word-level tokenizer over the DigitScenes words whose special tokens carry
the ids the tiny configs use, the class's image processor at 16 px, a chat template), so the folder
loads like a hub checkpoint; the chapter then runs end to end on it (``-p model_id <folder> -p quick
True``). Where torchvision is missing, the processors that take a video processor (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL) are built and saved for images only, and ``sk.zoo.folder_processor`` reads them
back the same way. SmolVLM's own processor also needs ``num2words``; without it (and torchvision) the
SmolVLM folder gets the Idefics3 processor, which lays out a single image identically.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

import skipit_core as sk
from skipit_core.errors import InputError
from skipit_core.tasks import VOCABULARY, DigitScenes, build_prompts, encode, load_pope
from skipit_core.tasks.datasets import load_scienceqa
from skipit_core.zoo.build import has_torchvision

import tiny_vlms as tv

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = ROOT / "book" / "07_your_model.ipynb"
FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = list(tv.BUILDERS)

# special tokens at the ids the tiny configs use (tv.PAD_ID, tv.BOS_ID, eos 2, tv.IMAGE_ID and the next three)
_QWEN = {"<|image_pad|>": 100, "<|video_pad|>": 101, "<|vision_start|>": 102, "<|vision_end|>": 103}
_IDEFICS = {"<image>": 100, "<fake_token_around_image>": 101, "<global-img>": 102, "<end_of_utterance>": 103}
SPECIAL = {"llava": {"<image>": 100}, "llava_next": {"<image>": 100}, "qwen2_vl": _QWEN, "qwen2_5_vl": _QWEN,
           "qwen3_vl": _QWEN, "idefics3": _IDEFICS, "smolvlm": _IDEFICS, "paligemma": {"<image>": 100},
           "gemma3": {"<image_soft_token>": 100, "<start_of_image>": 102, "<end_of_image>": 103}}
# what a prompt holds for its image (the processor expands it)
PLACEHOLDER = {"qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>", "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
               "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>", "gemma3": "<start_of_image>"}
NORMALISE = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)
QWEN_PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}


def _has_num2words() -> bool:
    try:
        import num2words  # noqa: F401
    except ImportError:
        return False
    return True


def chat_template(name: str) -> str:
    """``USER: <image block> {question} ASSISTANT:`` with the family's image placeholder."""
    place = PLACEHOLDER.get(name, "<image>")
    return ("{% for message in messages %}{% if message['role'] == 'user' %}USER: "
            "{% for c in message['content'] %}{% if c['type'] == 'image' %}" + place + "{% endif %}{% endfor %}"
            "{% for c in message['content'] %}{% if c['type'] == 'text' %} {{ c['text'] }}{% endif %}{% endfor %} "
            "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def tokenizer(name: str, **extra):
    """Word-level tokenizer: every id of the tiny vocabulary is a token (unused ones as placeholders)."""
    words = ["<pad>", "<s>", "</s>", "<unk>", "user", ":", "assistant"]
    words += [w for w in VOCABULARY if w not in words]
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update(SPECIAL[name])
    taken = set(vocab.values())
    vocab.update({f"<unused{i}>": i for i in range(tv.TEXT["vocab_size"]) if i not in taken})
    assert len(set(vocab.values())) == len(vocab) == tv.TEXT["vocab_size"]
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>", *SPECIAL[name]])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tv.BOS_ID)])
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                      pad_token="<pad>", padding_side="left", model_max_length=512, **extra)


def build_processor(name: str):
    """The processor of class family ``name`` for 16 px images, matching ``tv.make(name)``'s vision tokens."""
    template = chat_template(name)
    if name in ("llava", "llava_next"):
        size = dict(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, **NORMALISE)
        common = dict(tokenizer=tokenizer(name), patch_size=8, vision_feature_select_strategy="default",
                      num_additional_image_tokens=1, chat_template=template)
        if name == "llava":
            return tf.LlavaProcessor(image_processor=tf.CLIPImageProcessor(**size), **common)
        return tf.LlavaNextProcessor(image_processor=tf.LlavaNextImageProcessor(image_grid_pinpoints=[[16, 16]], **size),
                                     **common)
    if name in QWEN_PROCESSORS:
        patches = dict(patch_size=4, merge_size=2, temporal_patch_size=1)
        image = tf.Qwen2VLImageProcessor(min_pixels=256, max_pixels=256, **patches, **NORMALISE)
        cls = getattr(tf, QWEN_PROCESSORS[name])
        if has_torchvision():
            video_cls = tf.Qwen3VLVideoProcessor if name == "qwen3_vl" else tf.Qwen2VLVideoProcessor
            return cls(image_processor=image, tokenizer=tokenizer(name), video_processor=video_cls(**patches),
                       chat_template=template)
        return sk.zoo.images_only(cls, image_processor=image, tokenizer=tokenizer(name), chat_template=template)
    if name in ("idefics3", "smolvlm"):
        own = name == "smolvlm" and has_torchvision() and _has_num2words()
        image_cls = tf.SmolVLMImageProcessor if own else tf.Idefics3ImageProcessor
        image = image_cls(size={"longest_edge": 16}, max_image_size={"longest_edge": 16}, do_image_splitting=False,
                          **NORMALISE)
        if own:
            return tf.SmolVLMProcessor(image_processor=image, tokenizer=tokenizer(name),
                                       video_processor=tf.SmolVLMVideoProcessor(), image_seq_len=4,
                                       chat_template=template)
        return tf.Idefics3Processor(image_processor=image, tokenizer=tokenizer(name), image_seq_len=4,
                                    chat_template=template)
    if name == "paligemma":
        image = tf.SiglipImageProcessor(size={"height": 16, "width": 16}, **NORMALISE)
        image.image_seq_length = 16
        return tf.PaliGemmaProcessor(image_processor=image, tokenizer=tokenizer(name), chat_template=template)
    if name == "gemma3":
        tok = tokenizer(name, extra_special_tokens={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                                    "eoi_token": "<end_of_image>"})
        return tf.Gemma3Processor(image_processor=tf.Gemma3ImageProcessor(size={"height": 16, "width": 16}, **NORMALISE),
                                  tokenizer=tok, image_seq_length=4, chat_template=template)
    raise KeyError(name)


def save_processor(processor, folder: Path) -> None:
    """``processor.save_pretrained(folder)``; one built for images only is written by hand in the same
    layout (tokenizer, chat template, processor_config.json with the image processor's settings)."""
    if getattr(processor, "video_processor", "absent") is not None:
        processor.save_pretrained(folder)
        return
    processor.tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(processor.chat_template)
    image = {k: v for k, v in processor.image_processor.to_dict().items() if not k.startswith("_")}
    image["image_processor_type"] = "Qwen2VLImageProcessor"
    (folder / "processor_config.json").write_text(json.dumps(
        {"processor_class": type(processor).__name__, "image_processor": image}, indent=2, sort_keys=True))


def save_checkpoint(name: str, folder: Path) -> Path:
    """A tiny random-init checkpoint of family ``name`` with its processor, as a hub folder holds it."""
    model = tv.make(name).model
    model.generation_config.pad_token_id = tv.PAD_ID
    model.save_pretrained(folder)
    save_processor(build_processor(name), folder)
    return folder


def _images(data, nested: bool):
    images = [data.image(i) for i in range(len(data))]
    return [[im] for im in images] if nested else images


@pytest.fixture(scope="module")
def items():
    return DigitScenes("validation").generate(n_per_family=1, seed=0)[:4]


# ------------------------------------------------------------------------------------------------ library
@pytest.mark.parametrize("name", FAMILIES)
def test_saved_processor_gives_the_inputs_the_model_expects(name, items, tmp_path):
    """Every folder's processor, read back by the library, expands the image to exactly the number of
    vision embeddings the model produces, and gives the inputs the processor built here gives."""
    folder = save_checkpoint(name, tmp_path / name)
    built, loaded = build_processor(name), sk.zoo.load_vlm_processor(folder)
    assert type(loaded).__name__ == type(built).__name__
    prompts = build_prompts(loaded, items.questions)
    assert prompts == build_prompts(built, items.questions)
    a = built(images=_images(items, True), text=prompts, return_tensors="pt", padding=True)
    b = loaded(images=_images(items, True), text=prompts, return_tensors="pt", padding=True)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    tiny = tv.make(name)
    assert (b["input_ids"] == tv.IMAGE_ID).sum(1).tolist() == [tiny.image_tokens] * len(items)
    with torch.no_grad():
        logits = tiny.model(**b).logits
    assert logits.shape[:2] == b["input_ids"].shape and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_requirements_match_the_real_model(name):
    """The meta model has the real model's parameters; bytes are parameters x dtype size; the KV cache
    is 2 L h_kv d_h positions B s; the FLOPs are bench.flops of the real model plus its lm_head."""
    tiny = tv.make(name)
    real = tiny.model
    meta = sk.zoo.meta_model(real.config)
    assert all(p.device.type == "meta" for p in meta.parameters())
    n_real = sum(p.numel() for p in real.parameters())
    assert sum(p.numel() for p in meta.parameters()) == n_real
    bb = sk.Backbone.of(real)
    for dtype, size in ((torch.float32, 4), ("bfloat16", 2), (torch.float16, 2)):
        r = sk.zoo.requirements(real.config, n_vision=tiny.image_tokens, n_text=7, dtype=dtype, batch_size=3,
                                new_tokens=2)
        assert r.parameters == n_real == sum(r.parts.values())
        assert r.weight_bytes == n_real * size
        assert r.kv_cache_bytes == 2 * bb.n_layers * bb.n_kv_heads * bb.head_dim * (tiny.image_tokens + 7 + 2) * 3 * size
        assert r.memory_bytes == r.weight_bytes + r.kv_cache_bytes
    report = sk.bench.flops(real, tiny.image_tokens, 7)
    assert r.prefill_flops == report.total + report.head_per_position
    assert r.parts["language"] == sum(p.numel() for p in bb.text_model.parameters())
    tied = real.get_output_embeddings().weight is real.get_input_embeddings().weight
    assert (r.parts["lm_head"] == 0) == tied
    # from a processor batch: the first prompt's image tokens and real (unpadded) text tokens
    inputs = tiny.inputs(prompts=((2, 3), (5, 1)))
    from_inputs = sk.zoo.requirements(real, inputs, dtype="float32")
    assert (from_inputs.n_vision, from_inputs.n_text) == (tiny.image_tokens, 1 + 2 + 3)
    assert from_inputs.seconds(100, 1e9) == pytest.approx(100 * from_inputs.prefill_flops / 1e9)


def test_requirements_of_a_bundled_model_from_its_config():
    model, processor = sk.zoo.load_vlm("digits-llava", device="cpu")
    probe = next(sk.tasks.batches(processor, DigitScenes.test_set()[:1], 1))
    r = sk.zoo.requirements("digits-llava", probe, dtype=torch.float32)
    assert r.weight_bytes == sum(p.numel() * p.element_size() for p in model.parameters())
    assert r.n_vision == 64 and r.n_vision + r.n_text == int(probe["attention_mask"][0].sum())
    assert type(sk.zoo.load_config("digits-llava")).__name__ == "LlavaConfig"


def test_published_configs_have_the_published_parameter_counts():
    """LLaVA-1.5-7B written out from its config.json: 7,063,427,072 parameters, the count of the published
    safetensors (llava-hf/llava-1.5-7b-hf), 32 decoder layers of d = 4096 and 576 vision tokens per image;
    Qwen2-VL-7B-Instruct: 8,291,375,616 parameters, 28 layers, 4 key-value heads."""
    config = sk.zoo.published_config("llava-hf/llava-1.5-7b-hf")
    meta = sk.zoo.meta_model(config)
    assert sum(p.numel() for p in meta.parameters()) == 7_063_427_072
    bb = sk.Backbone.of(meta)
    assert (bb.n_layers, bb.hidden_size) == (32, 4096)
    assert (config.vision_config.image_size // config.vision_config.patch_size) ** 2 == 576
    qwen = sk.zoo.meta_model(sk.zoo.published_config("Qwen/Qwen2-VL-7B-Instruct"))  # 8,291,375,616 published
    assert sum(p.numel() for p in qwen.parameters()) == 8_291_375_616
    assert (sk.Backbone.of(qwen).n_layers, sk.Backbone.of(qwen).n_kv_heads) == (28, 4)
    with pytest.raises(InputError, match="load_config"):
        sk.zoo.published_config("llava-hf/llava-1.5-13b-hf")


def test_requirements_refuse_bad_input():
    config = tv.make("llava").model.config
    with pytest.raises(InputError, match="inputs"):
        sk.zoo.requirements(config)
    with pytest.raises(InputError, match="batch_size"):
        sk.zoo.requirements(config, n_vision=4, n_text=3, batch_size=0)
    with pytest.raises(InputError, match="n_text"):
        sk.zoo.requirements(config, n_vision=4, n_text=0)
    with pytest.raises(InputError, match="dtype"):
        sk.zoo.requirements(config, n_vision=4, n_text=3, dtype="int8")
    with pytest.raises(InputError, match="positive"):
        sk.zoo.requirements(config, n_vision=4, n_text=3).seconds(100, 0.0)
    with pytest.raises(InputError):
        sk.zoo.load_config("digits-lava")


def test_matmul_rate_is_a_positive_rate():
    rate = sk.zoo.matmul_rate("cpu", size=64, repeats=3)
    assert np.isfinite(rate) and rate > 0
    with pytest.raises(InputError):
        sk.zoo.matmul_rate("cpu", size=0)


def test_load_scienceqa_reads_image_questions_as_lettered_options():
    data = load_scienceqa(FIXTURES / "scienceqa" / "scienceqa.jsonl")
    rows = [json.loads(line) for line in open(FIXTURES / "scienceqa" / "scienceqa.jsonl")]
    with_image = [r for r in rows if r["image"] is not None]
    assert len(data) == len(with_image) < len(rows)  # the text-only question is left out
    assert data.answers == ["abcde"[r["answer"]] for r in with_image]
    assert data.families == [r["subject"] for r in with_image]
    for question, row in zip(data.questions, with_image):
        assert row["question"] in question and question.endswith("Answer with the option's letter.")
        assert all(f"{'ABCDE'[k]}. {c}" in question for k, c in enumerate(row["choices"]))
    assert data.chance() == pytest.approx(np.mean([1 / len(r["choices"]) for r in with_image]))
    assert len(load_scienceqa(FIXTURES / "scienceqa" / "scienceqa.jsonl", limit=1)) == 1
    with pytest.raises(InputError, match="index"):
        load_scienceqa([dict(with_image[0], image=np.zeros((4, 4, 3), np.uint8), answer=5)])
    with pytest.raises(InputError, match="choices"):
        load_scienceqa([{"question": "q", "answer": 0, "image": None}])
    with pytest.raises(InputError, match="no ScienceQA image rows"):
        load_scienceqa([dict(rows[2])])


def test_chance_is_the_mean_of_one_over_the_answer_set():
    test = DigitScenes.test_set()
    by_family = sk.tasks.evaluate.__globals__["summarise"](list(test.families), np.zeros(len(test), bool),
                                                           [""] * len(test)).by_family
    assert test.chance() == pytest.approx(float((by_family["chance"] * by_family["n"]).sum() / len(test)))
    assert load_pope(FIXTURES / "pope" / "pope.jsonl").chance() == 0.5
    odd = sk.tasks.VQASet(np.zeros((1, 4, 4), np.uint8), ["q"], ["blue"], ["colours"])
    with pytest.raises(InputError, match="choices"):
        odd.chance()


# ------------------------------------------------------------------------------------------------ the chapter
def _run_chapter(tmp_path: Path, **parameters) -> str:
    papermill = pytest.importorskip("papermill")
    out = tmp_path / "chapter.ipynb"
    papermill.execute_notebook(str(CHAPTER), str(out), parameters=dict(quick=True, **parameters),
                               cwd=str(CHAPTER.parent), kernel_name="python3", progress_bar=False)
    cells = json.loads(out.read_text())["cells"]
    assert all(c.get("execution_count") for c in cells if c["cell_type"] == "code" and "".join(c["source"]).strip())
    return "\n".join(o.get("text", "") if isinstance(o.get("text"), str) else "".join(o.get("text", []))
                     for c in cells for o in c.get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.book
@pytest.mark.parametrize("name", FAMILIES)
def test_chapter_runs_on_a_saved_checkpoint_of_every_class(name, tmp_path):
    folder = save_checkpoint(name, tmp_path / name)
    printed = _run_chapter(tmp_path, model_id=str(folder))
    cls = type(tv.make(name).model).__name__
    assert f"{cls} built on the meta device" in printed
    assert f"{cls}: " in printed and "parameters" in printed and "KV cache" in printed  # the memory plan
    assert "predicted plan: " in printed
    assert "exact: True | same FLOP count as the meta model: True" in printed


@pytest.mark.book
@pytest.mark.parametrize("dataset, source", [("pope", FIXTURES / "pope" / "pope.jsonl"),
                                             ("scienceqa", FIXTURES / "scienceqa" / "scienceqa.jsonl")])
def test_chapter_runs_on_the_other_datasets(dataset, source, tmp_path):
    folder = save_checkpoint("llava", tmp_path / "llava")
    printed = _run_chapter(tmp_path, model_id=str(folder), dataset=dataset, data_source=str(source))
    assert "predicted plan: " in printed and ("pope" if dataset == "pope" else "scienceqa-img") in printed
