"""What does `skipit_core.capture.profile` cost next to a plain forward?

Builds a random-init LLaVA-shaped model from configs (Llama backbone: hidden 256, 8 layers, 8 heads,
MLP 1024, vocabulary 32000; a 1-layer CLIP tower giving 144 image tokens; 32 text tokens + BOS per
prompt) and times, side by side in one run, on a batch of 16:

1. a plain forward (sdpa);
2. ``profile`` (cosine-distance statistics, histograms, tails, VAR from the layers' q/k);
3. ``profile(attention=False)`` (geometric/proximal statistics only);
4. ``output_hidden_states=True`` plus the same geometric statistics computed post hoc from the
   returned states. HF's last ``hidden_states`` entry is taken after the final norm, so the last
   layer's output still needs a hook in this route;
5. the classic route for VAR as well: eager attention with ``output_attentions=True`` and
   ``output_hidden_states=True``, statistics post hoc.

Every route calls the model with ``logits_to_keep=1`` so the vocabulary head does not dominate.
Then it measures peak resident memory (``ru_maxrss`` growth in a fresh subprocess, after a warm-up)
of ``profile`` over 1x and 10x as many samples: the accumulators are sums and histograms, so it must
stay flat.

    python benchmarks/profile_overhead.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import transformers as tf

from skipit_core.capture import _Accumulator, profile
from skipit_core.forward import BatchLayout, run_forward
from skipit_core.models import Backbone, TokenKind

IMAGE_ID, BATCH, TEXT_TOKENS = 31999, 16, 32


def build(attn: str = "sdpa") -> tf.LlavaForConditionalGeneration:
    torch.manual_seed(0)
    cfg = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=48, patch_size=4),
        text_config=tf.LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                                   num_attention_heads=8, num_key_value_heads=8, vocab_size=32000,
                                   max_position_embeddings=1024, pad_token_id=0),
        image_token_index=IMAGE_ID, vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_seq_length=144,
    )
    model = tf.LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(attn)
    return model


def batch(seed: int, size: int = BATCH) -> dict:
    """``size`` prompts: BOS, 8 text tokens, 144 image tokens, 24 text tokens (no padding)."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(2, 30000, (size, TEXT_TOKENS), generator=gen)
    ids = torch.cat([torch.ones(size, 1, dtype=torch.long), text[:, :8],
                     torch.full((size, 144), IMAGE_ID), text[:, 8:]], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(size, 3, 48, 48, generator=gen)}


def plain(model, inputs):
    with torch.no_grad():
        model(**inputs, logits_to_keep=1)


def with_hidden_states(model, inputs, eager_attentions: bool = False):
    """Route 4/5: HF outputs + a hook for the last layer's output + the same statistics post hoc."""
    bb = Backbone.of(model)
    last = {}
    handle = bb.layers[-1].register_forward_hook(lambda m, a, out: last.__setitem__("x", out))
    try:
        with torch.no_grad():
            out = model(**inputs, logits_to_keep=1, output_hidden_states=True,
                        output_attentions=eager_attentions)
    finally:
        handle.remove()
    states = list(out.hidden_states[:-1]) + [last["x"]]  # [-1] is post-final-norm: replaced
    layout = BatchLayout.of(bb, inputs, states[0].device)
    acc = _Accumulator(bb, states[0].device, 2000, [0.01], attention=False, keep=0)
    acc.begin(layout)
    with torch.no_grad():
        for l in range(bb.n_layers):
            acc.post(l, states[l], states[l + 1], {}, layout)
        if eager_attentions:
            vision = (layout.kinds == TokenKind.VISION).float()
            text = (layout.kinds == TokenKind.TEXT).float()
            var = [((a.float().mean(1) @ vision[..., None])[..., 0] * text).sum(1) / text.sum(1)
                   for a in out.attentions]
            torch.stack(var)
    acc.end(layout)


def timeit(routes: list, repeats: int) -> list[tuple[float, float]]:
    """Median time of each route and median of its per-round ratio to the first route. Routes run
    round-robin (one of each per round) so load changes on a shared machine hit all of them alike."""
    for _, fn in routes:
        fn()  # warm-up
    times = [[] for _ in routes]
    for _ in range(repeats):
        for i, (_, fn) in enumerate(routes):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [(statistics.median(t), statistics.median(a / b for a, b in zip(t, times[0]))) for t in times]


def memory_child(n_batches: int) -> None:
    """Subprocess: ru_maxrss growth (MiB) of profile over n_batches batches, after a warm-up."""
    torch.set_num_threads(1)
    model = build()
    first = batch(0)
    profile(model, [first])  # warm-up: allocator, lazy inits
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prof = profile(model, (batch(i) for i in range(n_batches)))  # generator: batches made on the fly
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    nbytes = sum(a.nbytes for a in prof.arrays.values())
    print(json.dumps({"samples": prof.n_samples, "maxrss_growth_mib": (after - before) / 1024,
                      "maxrss_mib": after / 1024, "profile_bytes": nbytes}))


def measure_memory(n_batches: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(n_batches)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child)
    torch.set_num_threads(args.threads)
    model, eager = build(), build("eager")
    inputs = batch(0)
    n_tok = inputs["input_ids"].numel()
    print(f"model: LLaVA-shaped, Llama d=256 x 8 layers, batch {BATCH} x {inputs['input_ids'].shape[1]} "
          f"tokens (144 image + 32 text + BOS), torch {torch.__version__}, {args.threads} thread(s), "
          f"median of {args.repeats} round-robin rounds ('x plain' = median per-round ratio)")
    routes = [
        ("plain forward (sdpa)", lambda: plain(model, inputs)),
        ("profile (stats + VAR)", lambda: profile(model, [inputs])),
        ("profile(attention=False)", lambda: profile(model, [inputs], attention=False)),
        ("output_hidden_states + post-hoc stats", lambda: with_hidden_states(model, inputs)),
        ("eager + output_attentions/hidden_states + post-hoc stats + VAR",
         lambda: with_hidden_states(eager, inputs, eager_attentions=True)),
    ]
    print(f"{'route':<66} {'time (s)':>9} {'x plain':>8} {'ms/1k tok':>10}")
    for (name, _), (t, ratio) in zip(routes, timeit(routes, args.repeats)):
        print(f"{name:<66} {t:>9.3f} {ratio:>8.2f} {1e6 * t / n_tok:>10.1f}")
    print()
    print("peak memory of profile (fresh process, ru_maxrss growth after a warm-up):")
    one, ten = measure_memory(1), measure_memory(10)
    for m in (one, ten):
        print(f"  {m['samples']:>4} samples: peak RSS {m['maxrss_mib']:.0f} MiB (+{m['maxrss_growth_mib']:.1f} MiB "
              "over the warm-up), "
              f"profile arrays {m['profile_bytes'] / 1024:.0f} KiB")
    print(f"  ratio 10x/1x samples: peak growth {ten['maxrss_growth_mib'] - one['maxrss_growth_mib']:+.1f} MiB, "
          f"arrays {ten['profile_bytes'] / one['profile_bytes']:.2f}x")


if __name__ == "__main__":
    main()
