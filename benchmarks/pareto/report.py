"""Markdown report and matplotlib figures (Agg backend, small PNGs)."""

from __future__ import annotations

import platform
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .common import Section  # noqa: E402

DPI = 100
COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def curves_figure(
    path: Path, panels: list[tuple[str, list[int], dict[str, np.ndarray]]], ylabel: str, title: str, logy: bool = True, ncols: int = 3
) -> None:
    """Panels of per-method curves (median over runs, band = 25-75 %)."""
    n = len(panels)
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 2.6 * nrows), squeeze=False)
    for p, (name, steps, curves) in enumerate(panels):
        ax = axes[p // ncols, p % ncols]
        for j, (label, vals) in enumerate(curves.items()):
            med = np.median(vals, axis=1)
            lo, hi = np.percentile(vals, 25, axis=1), np.percentile(vals, 75, axis=1)
            ax.plot(steps, med, color=COLORS[j % len(COLORS)], lw=1.2, label=label)
            ax.fill_between(steps, lo, hi, color=COLORS[j % len(COLORS)], alpha=0.15)
        if logy:
            ax.set_yscale("log")
        _label_panel(ax, name, "step", ylabel)
    _finish_grid(fig, axes, n, nrows, ncols, title, path, legend_size=6)


def fronts_figure(
    path: Path,
    panels: list[tuple[str, np.ndarray | None, dict[str, np.ndarray], np.ndarray | None]],
    xlabel: str,
    ylabel: str,
    title: str,
    ncols: int = 4,
) -> None:
    """2-D objective-space panels: reference front (line), each method's final points, targets."""
    n = len(panels)
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 2.8 * nrows), squeeze=False)
    markers = "os^vDP*X"
    for p, (name, front, pts, targets) in enumerate(panels):
        ax = axes[p // ncols, p % ncols]
        if front is not None:
            ax.plot(front[:, 0], front[:, 1], color="0.5", lw=1, label="reference front")
        if targets is not None:
            ax.plot(targets[:, 0], targets[:, 1], "k+", ms=7, label="w-optimum")
        for j, (label, v) in enumerate(pts.items()):
            ax.plot(v[:, 0], v[:, 1], markers[j % len(markers)], color=COLORS[j % len(COLORS)], ms=3.5, alpha=0.8, label=label, mfc="none")
        _label_panel(ax, name, xlabel, ylabel)
    _finish_grid(fig, axes, n, nrows, ncols, title, path, legend_size=5)


def machine_line() -> str:
    import os

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}"
    )


def write_report(out: Path, sections: list[Section], header: str, wall: float) -> Path:
    """Write ``report.md`` with every table and figure link; returns its path."""
    lines = ["# Synthetic Pareto benchmarks\n", header, f"\nMachine: {machine_line()}. Wall time: {wall:.0f} s.\n"]
    lines.append("\n## Summary\n")
    lines += [f"- {s.summary} ({s.seconds:.0f} s)\n" for s in sections]
    for s in sections:
        lines.append(f"\n## {s.title}\n\n")
        lines.append(s.markdown)
        for f in s.figures:
            lines.append(f"\n![{f}]({f})\n")
    path = out / "report.md"
    path.write_text("".join(lines))
    return path


def _label_panel(ax, name: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(name, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_xlabel(xlabel, fontsize=7)
    ax.set_ylabel(ylabel, fontsize=7)


def _finish_grid(fig, axes, n: int, nrows: int, ncols: int, title: str, path: Path, legend_size: int) -> None:
    """Blank the unused panels, legend on the first, title, save."""
    for p in range(n, nrows * ncols):
        axes[p // ncols, p % ncols].axis("off")
    axes[0, 0].legend(fontsize=legend_size)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save(fig, path)
