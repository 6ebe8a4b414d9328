"""One visual style and the few plot kinds the book repeats.

* :func:`plot_layers`: per-layer curves (one line per series), optionally with a shaded layer band;
* :func:`plot_profile`: the geometric and cross-modal profile of a :class:`~skipit_core.capture.LayerProfile`;
* :func:`plot_sweep`: a metric against a skip parameter with confidence intervals.

Layers are 0-based on every x axis, matching the library.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from .errors import InputError

__all__ = ["set_theme", "plot_layers", "plot_profile", "plot_sweep", "MODALITY_COLORS"]

MODALITY_COLORS = {"vision": "#d1495b", "text": "#00798c", "sink": "#8d96a3", "all": "#30638e"}


def set_theme() -> None:
    """The book's seaborn theme: white grid, colour-blind palette, readable sizes."""
    sns.set_theme(style="whitegrid", palette="colorblind", context="notebook",
                  rc={"figure.figsize": (7.0, 3.6), "axes.spines.top": False,
                      "axes.spines.right": False, "figure.dpi": 110})


def _shade(ax: plt.Axes, band: tuple[int, int] | None, label: str) -> None:
    if band is not None:
        lo, hi = band
        ax.axvspan(lo - 0.5, hi + 0.5, color="#edae49", alpha=0.25, lw=0, label=label)


def plot_layers(series: Mapping[str, Sequence[float]], ylabel: str, *, band: tuple[int, int] | None = None,
                band_label: str = "predicted band", title: str | None = None, ax: plt.Axes | None = None,
                logy: bool = False) -> plt.Axes:
    """Plot per-layer values, one line per entry of ``series`` (x = layer index, 0-based).

    ``band = (a, b)`` shades layers a..b inclusive.
    """
    if not series:
        raise InputError("plot_layers needs at least one series, e.g. {'vision': values}.")
    ax = ax or plt.subplots()[1]
    for name, values in series.items():
        values = np.asarray(values, dtype=float)
        ax.plot(np.arange(len(values)), values, marker="o", ms=3.5, lw=1.6, label=name,
                color=MODALITY_COLORS.get(name))
    _shade(ax, band, band_label)
    ax.set_xlabel("layer (0-based)")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.legend(frameon=False)
    return ax


def plot_profile(profile, *, modalities: Sequence[str] = ("vision", "text"),
                 band: tuple[int, int] | None = None, axes: Sequence[plt.Axes] | None = None
                 ) -> np.ndarray:
    """Two panels: mean cosine distance between each layer's input and output per modality (in
    [0, 2]) and the vision attention ratio (VAR) next to its uniform-share reference."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    plot_layers({m: profile.mean_cos_dist(m) for m in modalities},
                "mean cosine distance d(input, output)", band=band, ax=axes[0],
                title="How much each layer moves a token")
    plot_layers({"text queries that see the image": profile.vision_attention("mean"),
                 "last token": profile.vision_attention("last"),
                 "uniform share": profile.vision_attention("uniform")},
                "attention mass on vision keys", band=band, ax=axes[1],
                title="Vision attention ratio (VAR)")
    uniform = axes[1].lines[2]
    uniform.set(linestyle="--", color=MODALITY_COLORS["sink"], marker="")
    axes[1].set_ylim(0, 1)
    axes[1].legend(frameon=False)
    plt.tight_layout()
    return np.asarray(axes)


def plot_sweep(x: Sequence[float], y: Mapping[str, Sequence[float]], *,
               low: Mapping[str, Sequence[float]] | None = None,
               high: Mapping[str, Sequence[float]] | None = None,
               xlabel: str, ylabel: str, reference: float | None = None,
               reference_label: str = "no skipping", ax: plt.Axes | None = None) -> plt.Axes:
    """A metric against a skip parameter (e.g. accuracy vs the Early Exit layer k), one line per
    strategy, with error bars from ``low``/``high`` (confidence interval bounds)."""
    ax = ax or plt.subplots()[1]
    x = np.asarray(x, dtype=float)
    for name, values in y.items():
        values = np.asarray(values, dtype=float)
        if low is not None and high is not None:
            err = np.vstack([values - np.asarray(low[name]), np.asarray(high[name]) - values])
            ax.errorbar(x, values, yerr=err, marker="o", ms=4, capsize=3, label=name)
        else:
            ax.plot(x, values, marker="o", ms=4, label=name)
    if reference is not None:
        ax.axhline(reference, color="k", lw=1, ls="--", label=reference_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False)
    return ax
