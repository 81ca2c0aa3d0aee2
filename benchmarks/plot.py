"""PNG plots for benchmark results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def bar_chart(path: Path, bars: list[tuple[str, float]], ylabel: str, title: str,
              reference: float | None = None) -> None:
    """One bar per (label, value); with `reference`, each bar is annotated with value / reference."""
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(bars)), 4.5))
    labels = [b[0] for b in bars]
    values = [b[1] for b in bars]
    rects = ax.bar(range(len(bars)), values, color=["#888888"] + ["#2b6cb0"] * (len(bars) - 1))
    for r, v in zip(rects, values):
        note = f"{v:.1f}" + (f"\n{v / reference:.2f}x" if reference else "")
        ax.annotate(note, (r.get_x() + r.get_width() / 2, v), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(bars)), labels, rotation=15, ha="right", fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, max(values) * 1.25)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
