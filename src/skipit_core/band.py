"""Predict the band where vision tokens may skip layers, from measures alone, with a certificate.

The paper's central claim is that redundancy measured *without any answer or accuracy* tells where
vision tokens may skip layers. :func:`predict_band` turns a :class:`~skipit_core.capture.LayerProfile`
(geometry, tails and VAR of every layer) and per-layer Lipschitz constants (:func:`band_lipschitz`,
which perturbs the model's states and reads its own top answer, never a label) into a plan
``late_entry(a) | early_exit(b)`` and the finite-sample statement that supports it.

The rule (THEORY.md, "Predicting the band"). A candidate plan removes the vision tokens from the layers
``B = [0, a) U [b, L)``. It is admissible when both conditions of the theory hold on ``B``:

1. **Geometric / proximal (T1 + T2).** For each layer ``l`` in ``B`` pick the smallest ``eps_l`` on the
   profile's grid whose *upper confidence bound* ``q_l`` (Clopper-Pearson over images) on
   ``P(some vision token of an image has d > eps_l)`` is at most ``tail / |B|``. Then, for a new image,
   with probability ``>= 1 - sum_l q_l >= 1 - tail`` every vision token moves by at most ``eps_l`` in
   every band layer, so each layer's drift of the normalised vision block is at most
   ``D_l = sqrt(2 |V| eps_l)`` and skipping the band on the vision tokens changes the answer's
   log-probability by at most ``alpha_B * sum_{l in B} D_l`` (T1 with the triangle inequality;
   ``alpha_B = max_{l in B} alpha_l``). Admissible when that is ``<= tolerance``.
2. **Cross-modal (T5).** In every layer of ``B`` the upper confidence bound (empirical Bernstein over
   images, Maurer & Pontil 2009, Thm 4) of the mean attention mass ``tau`` that text queries able to see
   the image put on vision keys (VAR, :meth:`LayerProfile.vision_attention`) is ``<= var_max``. By T5 the
   text's attention output then moves by at most ``tau (max_V |v| + max_T |v|) <= 2 tau max |v|`` per head
   when the vision keys go.

Among admissible plans the one removing the most layers wins (ties: the smaller bound). All
confidence bounds hold simultaneously with probability ``>= confidence`` over the profiling images
(Bonferroni over the ``L (E + 1)`` bounds, ``E`` the size of the eps grid). The defaults below are fixed
in the library (:data:`DEFAULT_RULE`), never tuned per model: ``tolerance = 0.5`` nats (the answer's
probability changes by a factor within ``[e^-0.5, e^0.5] = [0.61, 1.65]``), ``tail = 0.05`` (the drift
statement covers 95% of images), ``var_max = 0.1`` (per head, at most a tenth of the attention moves).

What the certificate does not say: ``alpha_l`` are empirical Lipschitz ratios (:func:`theory.lipschitz_estimate`:
a *lower* estimate of the true constant), so the log-probability statement is conditional on them;
T1 bounds an identity skip of the vision tokens, T5 the removal of their keys: the plan does both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from torch import nn

from .bench import ideal_speedup
from .capture import LayerProfile, profile as profile_pass
from .errors import InputError
from .forward import iter_batches, run_forward
from .models import Backbone
from .skip import SkipPlan
from .stats import clopper_pearson
from .tasks.datasets import VQASet
from .tasks.evaluation import batches as task_batches
from .theory import LipschitzEstimate, lipschitz_estimate, pool_estimates

__all__ = ["BandRule", "DEFAULT_RULE", "BandPrediction", "predict_band", "band_lipschitz",
           "empirical_bernstein_upper", "BandStudy", "profile_and_predict"]


@dataclass(frozen=True)
class BandRule:
    """The thresholds of :func:`predict_band` (see the module docstring for where each comes from)."""

    tolerance: float = 0.5  # nats: the largest certified change of the answer's log-probability
    tail: float = 0.05  # images allowed outside the drift statement
    var_max: float = 0.1  # largest mean attention mass of text queries on vision keys in the band
    confidence: float = 0.95  # over the profiling images, for all bounds at once

    def check(self) -> "BandRule":
        if not (math.isfinite(self.tolerance) and self.tolerance > 0):
            raise InputError(f"tolerance must be a positive number of nats (e.g. 0.5); got {self.tolerance!r}.")
        for name in ("tail", "var_max", "confidence"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise InputError(f"{name} must be in (0, 1); got {value!r}.")
        return self


DEFAULT_RULE = BandRule()


@dataclass(frozen=True)
class BandPrediction:
    """Result of :func:`predict_band`.

    ``plan``: the predicted :class:`SkipPlan` (``none()`` when no layer qualifies); ``band``: the layers
    the vision tokens leave; ``bound``: the certified change of the answer's log-probability (nats);
    ``evidence``: one row per layer (every measured quantity, its confidence bound, pass/fail per
    condition); ``certificate``: the finite-sample statement in words; ``ideal_speedup``: decoder-FLOP
    speedup of the plan (None without a model); ``rule``: the rule as text with its thresholds.
    """

    plan: SkipPlan
    band: tuple[int, ...]
    bound: float
    evidence: pd.DataFrame
    certificate: str
    ideal_speedup: float | None
    rule: str
    thresholds: BandRule

    def __repr__(self) -> str:
        speed = "" if self.ideal_speedup is None else f", ideal speedup {self.ideal_speedup:.2f}x"
        return f"BandPrediction({self.plan}, {len(self.band)} layers, bound {self.bound:.3g} nats{speed})"


def empirical_bernstein_upper(total: np.ndarray, total_sq: np.ndarray, n: np.ndarray, delta: float,
                              value_range: float = 1.0) -> np.ndarray:
    """Upper confidence bound on a mean from ``n >= 2`` i.i.d. values in ``[0, value_range]``.

    Maurer & Pontil (2009), Theorem 4, for ``Z = X / R`` in [0, 1]: with probability ``>= 1 - delta``,
    ``E Z <= Z_bar + sqrt(2 V_n ln(2/delta) / n) + 7 ln(2/delta) / (3 (n - 1))``, ``V_n`` the unbiased
    sample variance. ``total``/``total_sq`` are the sums of the values and of their squares.
    """
    n = np.asarray(n, dtype=np.float64)
    if np.any(n < 2):
        raise InputError("the empirical Bernstein bound needs at least 2 samples per layer; profile more images.")
    mean = total / n / value_range
    var = np.maximum((total_sq / value_range**2 - n * mean**2) / (n - 1), 0.0)
    log = math.log(2.0 / delta)
    upper = mean + np.sqrt(2.0 * var * log / n) + 7.0 * log / (3.0 * (n - 1))
    return np.minimum(upper, 1.0) * value_range


# ---------------------------------------------------------------------------------------- the rule
def _alphas(alpha, n_layers: int) -> np.ndarray:
    if isinstance(alpha, (list, tuple)) and alpha and isinstance(alpha[0], LipschitzEstimate):
        alpha = [a.max for a in alpha]
    values = np.broadcast_to(np.asarray(alpha, dtype=np.float64), (n_layers,)).copy() \
        if np.ndim(alpha) == 0 else np.asarray(alpha, dtype=np.float64)
    if values.shape != (n_layers,) or not np.all(np.isfinite(values)) or np.any(values < 0):
        raise InputError(f"alpha must be one non-negative Lipschitz constant or one per layer ({n_layers}); got "
                         f"{np.shape(alpha)}. Estimate them with skipit_core.band.band_lipschitz(model, batches).")
    return values


def _check_profile(profile: LayerProfile, model: nn.Module | None) -> None:
    if not isinstance(profile, LayerProfile):
        raise InputError(f"predict_band takes a LayerProfile (skipit_core.profile(...)); got {type(profile).__name__}.")
    if profile.count("vision").max(initial=0) == 0:
        raise InputError("this profile holds no vision statistics (no image tokens were seen); profile images.")
    if "var_n.mean" not in profile.arrays or not profile.meta.get("attention", True):
        raise InputError("the cross-modal condition needs VAR over the queries that see the image: profile again "
                         "with attention=True (profiles saved by skipit 0.1.0 lack it).")
    if model is not None:
        bb = Backbone.of(model)
        mine = (type(bb.model).__name__, bb.n_layers, bb.hidden_size, bb.image_token_id)
        theirs = (profile.model_class, profile.n_layers, profile.hidden_size, profile.meta.get("image_token_id"))
        if mine != theirs:
            raise InputError(f"the profile was made on {theirs[0]} ({theirs[1]} layers, d={theirs[2]}), not on this "
                             f"model ({mine[0]}, {mine[1]} layers, d={mine[2]}); profile this model first.")


def _tail_uppers(profile: LayerProfile, delta: float) -> np.ndarray:
    """``[L, E]`` Clopper-Pearson upper bounds on P(max_i d_i > eps) for vision tokens, each at level delta."""
    m = 1  # "vision" in the per-sample arrays (text, vision, sink, all)
    k = profile.arrays["sample_any"][:, m, :]
    n = np.broadcast_to(profile.arrays["sample_n"][:, m][:, None], k.shape)
    return np.asarray(clopper_pearson(k, n, 1.0 - delta, side="upper")[1], dtype=np.float64)


def _band_layers(a: int, b: int, n_layers: int) -> tuple[int, ...]:
    return tuple(range(a)) + tuple(range(b, n_layers))


def predict_band(profile: LayerProfile, alpha, *, model: nn.Module | None = None,
                 tolerance: float = DEFAULT_RULE.tolerance, tail: float = DEFAULT_RULE.tail,
                 var_max: float = DEFAULT_RULE.var_max, confidence: float = DEFAULT_RULE.confidence
                 ) -> BandPrediction:
    """The widest ``late_entry(a) | early_exit(b)`` that the profile certifies (rule: module docstring).

    ``profile``: a :class:`LayerProfile` with vision tokens and VAR; ``alpha``: Lipschitz constants of
    the answer's log-probability in the normalised vision block, one per layer or one for all (or the
    list :func:`band_lipschitz` returns). ``model`` (optional) checks that the profile belongs to it and
    gives the ideal FLOP speedup. No label, answer or accuracy enters.
    """
    rule = BandRule(tolerance, tail, var_max, confidence).check()
    _check_profile(profile, model)
    L, grid = profile.n_layers, profile.eps_grid
    alphas = _alphas(alpha, L)
    delta = (1.0 - rule.confidence) / (L * (len(grid) + 1))
    q = _tail_uppers(profile, delta)  # [L, E]
    n_vision = profile.count("vision")[0] / profile.sample_count("vision")
    var_mean = profile.vision_attention("mean")
    var_upper = empirical_bernstein_upper(profile.arrays["var_sum.mean"], profile.arrays["var_sumsq.mean"],
                                          profile.arrays["var_n.mean"], delta)
    cross_ok = var_upper <= rule.var_max

    def eps_for(budget: float) -> tuple[np.ndarray, np.ndarray]:
        """Per layer: the smallest grid eps whose tail upper bound is <= budget (inf if none), and that bound."""
        ok = q <= budget
        first = ok.argmax(1)
        found = ok.any(1)
        return np.where(found, grid[first], np.inf), np.where(found, q[np.arange(L), first], 1.0)

    def bound(layers: tuple[int, ...]) -> float:
        eps, _ = eps_for(rule.tail / len(layers))
        idx = list(layers)
        return float(alphas[idx].max() * np.sqrt(2.0 * n_vision * eps[idx]).sum())

    best: tuple[int, float, int, int] = (0, 0.0, 0, L)  # (n layers, bound, a, b)
    for a in range(L + 1):
        for b in range(L, a - 1, -1):
            layers = _band_layers(a, b, L)
            if not layers or len(layers) < best[0] or not cross_ok[list(layers)].all():
                continue
            value = bound(layers)
            if value <= rule.tolerance and (len(layers), -value) > (best[0], -best[1]):
                best = (len(layers), value, a, b)
    n_band, value, a, b = best
    band = _band_layers(a, b, L) if n_band else ()
    plan = _plan(a, b, L) if n_band else SkipPlan.none()
    budget = rule.tail / max(n_band, 1)
    eps, q_used = eps_for(budget)
    drift = np.sqrt(2.0 * n_vision * eps)
    evidence = pd.DataFrame({
        "layer": np.arange(L), "d_vision_mean": profile.mean_cos_dist("vision"), "eps": eps,
        "tail_upper": q_used, "drift_bound": drift, "alpha": alphas, "geometric_term": alphas * drift,
        "pass_geometric": alphas * drift <= rule.tolerance, "var_mean": var_mean, "var_upper": var_upper,
        "pass_cross_modal": cross_ok, "in_band": np.isin(np.arange(L), band),
    })
    speed = None
    if model is not None:
        n_text = int(round((profile.count("text")[0] + profile.count("sink")[0]) / profile.n_samples))
        speed = float(ideal_speedup(model, int(round(n_vision)), n_text, plan))
    return BandPrediction(plan, band, value, evidence, _certificate(profile, rule, band, value, n_vision, L, grid),
                          speed, _rule_text(rule), rule)


def _plan(a: int, b: int, n_layers: int) -> SkipPlan:
    plan = SkipPlan.none()
    if a > 0:
        plan = plan | SkipPlan.late_entry(a)
    if b < n_layers:
        plan = plan | SkipPlan.early_exit(b)
    return plan


def _rule_text(rule: BandRule) -> str:
    return (f"widest late_entry(a) | early_exit(b) whose band B satisfies (T1+T2) max_B alpha_l * sum_B sqrt(2 |V| "
            f"eps_l) <= {rule.tolerance:g} nats, eps_l the smallest grid eps with Clopper-Pearson upper bound on "
            f"P(max_i d_i > eps_l) <= {rule.tail:g}/|B|, and (T5) empirical-Bernstein upper bound on the VAR of "
            f"text queries that see the image <= {rule.var_max:g} in every band layer; all bounds jointly at "
            f"confidence {rule.confidence:g} (Bonferroni)")


def _certificate(profile: LayerProfile, rule: BandRule, band: tuple[int, ...], value: float, n_vision: float,
                 n_layers: int, grid: np.ndarray) -> str:
    n = profile.sample_count("vision")
    tests = n_layers * (len(grid) + 1)
    if not band:
        return (f"No band is certified: for every candidate band, either the T1/T2 bound exceeds {rule.tolerance:g} "
                f"nats or some layer's VAR upper bound exceeds {rule.var_max:g} (n = {n} images, confidence "
                f"{rule.confidence:g} over {tests} joint bounds).")
    return (f"With probability >= {rule.confidence:g} over the {n} profiled images ({tests} bounds, Bonferroni): for a "
            f"new image from the same distribution, with probability >= {1 - rule.tail:g}, skipping layers "
            f"{_span(band)} on its {n_vision:.0f} vision tokens changes the answer's log-probability by at most "
            f"{value:.3g} nats (T1/T2; <= {rule.tolerance:g}; conditional on the empirical Lipschitz constants), and in "
            f"every layer of the band text queries that see the image put on average at most {rule.var_max:g} of "
            f"their attention on vision keys (T5).")


def _span(layers: Sequence[int]) -> str:
    parts, run = [], [layers[0]]
    for x in layers[1:]:
        if x != run[-1] + 1:
            parts.append(run)
            run = []
        run.append(x)
    parts.append(run)
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in parts)


# ------------------------------------------------------------------------------ Lipschitz constants
def band_lipschitz(model: nn.Module, batches: Iterable[Mapping] | Mapping, *, layers: Sequence[int] | None = None,
                   n_random: int = 4, step: float = 1e-2, seed: int = 0) -> list[LipschitzEstimate]:
    """Per layer ``l``, the empirical Lipschitz constant of the answer's log-probability as a function of
    the normalised vision block at layer ``l``'s input (the ``alpha`` of T1), label-free.

    The score is ``log p(y_hat)``, ``y_hat`` the model's own top next token on the unperturbed input (no
    label). The block ``X_hat [|V|, d]`` holds the unit-normalised vision rows; a perturbation
    ``X_hat + h u`` enters layer ``l`` as ``r_i (x_hat_i + h u_i)`` with the rows' original norms ``r_i``.
    Directions: the layer's own skip direction ``X_hat_out - X_hat_in`` (what skipping layer ``l`` does)
    and ``n_random`` Gaussian ones (:func:`theory.lipschitz_estimate`, central differences, ``step`` in
    float32). Every sample of a batch must hold the same number of vision tokens. Returns one
    :class:`LipschitzEstimate` per layer (``layers`` or all), pooled over batches.
    """
    bb = Backbone.of(model)
    chosen = list(range(bb.n_layers)) if layers is None else [int(l) for l in layers]
    per_layer: dict[int, list[LipschitzEstimate]] = {l: [] for l in chosen}
    for inputs, layout in iter_batches(bb, batches):
        counts = layout.n_vision
        if bool((counts != counts[0]).any()) or int(counts[0]) == 0:
            raise InputError("band_lipschitz needs the same, non-zero number of vision tokens in every sample of a "
                             "batch (one image size per batch).")
        top = run_forward(bb, inputs, layout, logits=True).argmax(-1)
        for l in chosen:
            per_layer[l].append(_layer_lipschitz(bb, inputs, layout, l, top, n_random, step, seed))
    return [pool_estimates(per_layer[l]) for l in chosen]


def _layer_lipschitz(bb: Backbone, inputs: dict, layout, l: int, top: torch.Tensor, n_random: int, step: float,
                     seed: int) -> LipschitzEstimate:
    B, n_v = layout.batch, int(layout.n_vision[0])
    rows = layout.vision.nonzero()[:, 1].view(B, n_v)  # vision positions per sample
    got: dict[str, torch.Tensor] = {}

    def grab(idx, x_in, x_out, kwargs, lay):
        pick = rows[..., None].expand(B, n_v, x_in.shape[-1])
        got["in"], got["out"] = x_in.gather(1, pick).float(), x_out.gather(1, pick).float()

    run_forward(bb, inputs, layout, post=lambda i, *a: grab(i, *a) if i == l else None, stop_after=l)
    norms = got["in"].norm(dim=-1, keepdim=True)
    x_hat = got["in"] / norms
    skip_dir = got["out"] / got["out"].norm(dim=-1, keepdim=True) - x_hat

    def score(block: torch.Tensor) -> torch.Tensor:
        def put(idx, x_in, kwargs, lay):
            if idx != l:
                return None
            pick = rows[..., None].expand(B, n_v, x_in.shape[-1])
            return x_in.scatter(1, pick, (block * norms).to(x_in.dtype))
        logits = run_forward(bb, inputs, layout, pre=put, logits=True)
        return torch.log_softmax(logits.double(), -1).gather(1, top[:, None])[:, 0]

    directions = skip_dir if bool((skip_dir.flatten(1).norm(dim=1) > 0).all()) else None
    return lipschitz_estimate(score, x_hat, directions=directions, n_random=n_random, step=step, seed=seed)


# ------------------------------------------------------------------------- profile, estimate, predict
@dataclass(frozen=True)
class BandStudy:
    """Result of :func:`profile_and_predict`: the ``profile`` of the profiling set, the Lipschitz estimates
    ``alpha`` (one per layer), the ``prediction`` made from them, and ``prefixes``: ``{n: profile of the
    first n images}`` for the sizes asked for (the whole set included), each a merge of the same passes."""

    profile: LayerProfile
    alpha: list[LipschitzEstimate]
    prediction: BandPrediction
    prefixes: dict[int, LayerProfile]

    def predict(self, n: int | None = None, **rule) -> BandPrediction:
        """:func:`predict_band` again with other thresholds (``tolerance=``, ``tail=``, ``var_max=``,
        ``confidence=``) and/or on the profile of the first ``n`` images (one of ``prefixes``); the same
        Lipschitz estimates. No forward pass."""
        if n is not None and n not in self.prefixes:
            raise InputError(f"no profile of the first {n} images; profiled prefixes: {sorted(self.prefixes)}. "
                             f"Pass prefixes=({n},) to profile_and_predict.")
        return predict_band(self.profile if n is None else self.prefixes[n], self.alpha, **rule)


def profile_and_predict(model: nn.Module, processor, data: VQASet, *, n_lipschitz: int = 128, batch_size: int = 32,
                        n_random: int = 2, seed: int = 0, prefixes: Sequence[int] = (), **rule) -> BandStudy:
    """The prediction of the band from a profiling set, in the three steps every chapter takes.

    1. ``profile(model, batches(processor, data, batch_size))``: geometry, tails and VAR of every layer
       over the images of ``data`` (a :class:`VQASet`; its answers are never read);
    2. :func:`band_lipschitz` on the first ``n_lipschitz`` items (``n_random`` random directions, ``seed``);
    3. :func:`predict_band` with ``model`` and the thresholds in ``rule`` (``tolerance``, ``tail``, ``var_max``,
       ``confidence``; the library's defaults otherwise).

    ``prefixes``: sizes ``n`` (``0 < n <= len(data)``) whose profile of the first ``n`` images is wanted too,
    e.g. to see how the certificate tightens with the number of images. The data are then profiled in
    consecutive chunks cut at those sizes and the chunk profiles merged (:meth:`LayerProfile.merge`), so
    the prefix profiles cost no extra forward pass. With sizes that are multiples of ``batch_size`` every
    batch is the one a single pass would form, and each prefix profile equals a single pass over its images
    up to float64 rounding (integer counters exactly); other cuts pad a few batches differently, which moves
    the float32 forward passes by rounding noise.
    """
    if not isinstance(data, VQASet) or len(data) == 0:
        raise InputError(f"data must be a non-empty VQASet of profiling images (e.g. DigitScenes('validation')"
                         f".generate(...)); got {type(data).__name__}.")
    if not isinstance(n_lipschitz, (int, np.integer)) or not 1 <= n_lipschitz <= len(data):
        raise InputError(f"n_lipschitz must be an integer in 1..{len(data)} (the size of data); got {n_lipschitz!r}.")
    cuts = sorted({int(n) for n in prefixes} | {len(data)})
    if cuts[0] < 1 or cuts[-1] > len(data) or any(not float(n).is_integer() for n in prefixes):
        raise InputError(f"prefixes must be sizes in 1..{len(data)} (the size of data); got {tuple(prefixes)!r}.")
    merged: dict[int, LayerProfile] = {}
    start, running = 0, None
    for stop in cuts:
        part = profile_pass(model, task_batches(processor, data[start:stop], batch_size))
        running = part if running is None else running.merge(part)
        merged[stop] = running
        start = stop
    full = merged[len(data)]
    alpha = band_lipschitz(model, task_batches(processor, data[:n_lipschitz], batch_size), n_random=n_random,
                           seed=seed)
    prediction = predict_band(full, alpha, model=model, **rule)
    return BandStudy(full, alpha, prediction, {n: merged[n] for n in cuts if n in set(prefixes) or n == len(data)})
