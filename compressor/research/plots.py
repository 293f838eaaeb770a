"""PNG figures: the per-block sensitivity profile, frontiers, plan heatmaps, predicted vs
measured. Each returns PNG bytes (the API serves them; the CLI writes them to files)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from compressor.pipeline.profile_store import Profile


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def profile_png(block_alpha: Sequence[float], block_proxy: Sequence[float], title: str,
                spearman: float | None = None, alpha_from: str = "Fisher trace") -> bytes:
    """Per-block sensitivity (Σ α over the block's linears) beside Block Influence, each scaled
    to its mean so both share one axis."""
    n = len(block_alpha)
    a_mean = sum(block_alpha) / max(n, 1) or 1.0
    p_mean = sum(block_proxy) / max(len(block_proxy), 1) or 1.0
    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = range(n)
    ax.bar([x - 0.2 for x in xs], [a / a_mean for a in block_alpha], width=0.4,
           label=f"end-to-end α (KL per t², {alpha_from})")
    ax.bar([x + 0.2 for x in xs], [p / p_mean for p in block_proxy], width=0.4,
           label="Block Influence (1 − cos)")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("relative to mean")
    sub = f" (Spearman {spearman:.2f})" if spearman is not None else ""
    ax.set_title(title + sub, fontsize=10)
    ax.set_xticks(list(xs))
    ax.legend(fontsize=8)
    return _png(fig)


def frontier_png(curves: Mapping[str, Sequence[tuple[float, float]]], xlabel: str, ylabel: str,
                 title: str, logy: bool = False) -> bytes:
    """One line per strategy of (x, y) points (e.g. bytes vs measured perplexity)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pts in curves.items():
        pts = sorted(pts)
        style = {"lw": 2.5, "color": "black"} if name == "optimal" else {"lw": 1.2}
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name, **style)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def heatmap_png(matrix: Sequence[Sequence[float]], row_labels: Sequence[str],
                col_labels: Sequence[str], title: str, fmt: str = "{:.0f}") -> bytes:
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(col_labels), 1.0 + 0.32 * len(row_labels)))
    im = ax.imshow(matrix, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6, color="white")
    fig.colorbar(im, ax=ax)
    ax.set_title(title, fontsize=10)
    return _png(fig)


def scatter_png(points: Mapping[str, Sequence[tuple[float, float]]], xlabel: str, ylabel: str,
                title: str) -> bytes:
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, pts in points.items():
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=name, s=18)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(fig)


def profile_plot_png(profile: Profile) -> bytes:
    """Per-block sensitivity (end-to-end α) beside the Block Influence proxy."""
    fisher = profile.config.get("sensitivity", "probe") == "fisher"
    return profile_png(profile.block_sensitivity, profile.block_proxy,
                       f"sensitivity per block — {profile.model_ref}",
                       profile.stats.get("spearman_alpha_vs_proxy"),
                       "Fisher trace" if fisher else "noise probe")
