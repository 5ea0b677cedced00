"""Shared configuration and result containers of the Pareto benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .methods import Method

DTYPE_NAME = "float64"


@dataclass
class Config:
    """What the CLI selected. ``quick`` shrinks budgets, not the protocol."""

    out: Path
    methods: list[Method]
    seeds: list[int]
    quick: bool = False
    progress: bool = True
    c: float = 0.4


@dataclass
class Section:
    """One problem's part of the report."""

    title: str
    markdown: str
    figures: list[str] = field(default_factory=list)
    summary: str = ""
    seconds: float = 0.0
    data: dict = field(default_factory=dict)


def md_table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table; floats get 4 significant digits."""

    def fmt(v: object) -> str:
        if isinstance(v, (float, np.floating)):
            if not np.isfinite(v):
                return str(v)
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
