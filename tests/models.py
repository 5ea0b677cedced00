"""Model factories shared by the tests (plain functions, so spawned ranks can import them too)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TwoHeads", "make_two_heads"]


class TwoHeads(nn.Module):
    """A float64 tanh trunk ``5 -> 8 -> 6`` shared by two scalar heads (one objective each).

    ``stray=True`` adds two parameters after the heads (constant values: the trunk's and heads'
    random initialisation is unchanged): ``extra``, which a test reaches from some batches only, and
    ``unused``, which no loss reaches.
    """

    def __init__(self, *, stray: bool = False) -> None:
        super().__init__()
        f64 = dict(dtype=torch.float64)  # explicit: init draws must not depend on the default dtype
        self.trunk = nn.Sequential(nn.Linear(5, 8, **f64), nn.Tanh(), nn.Linear(8, 6, **f64), nn.Tanh())
        self.head_a = nn.Linear(6, 1, **f64)
        self.head_b = nn.Linear(6, 1, **f64)
        if stray:
            self.extra = nn.Parameter(torch.tensor([1.0, -0.5], dtype=torch.float64))
            self.unused = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.head_a(h), self.head_b(h)


def make_two_heads(seed: int = 0, *, stray: bool = False) -> TwoHeads:
    """:class:`TwoHeads` initialised from ``torch.manual_seed(seed)`` (the global RNG: build it outside threads)."""
    torch.manual_seed(seed)
    return TwoHeads(stray=stray)
