"""Gaps that mutation testing found in the dual solver's tests (``cagrad_clip/_dual``), each pinned against
an independent reference: a minimiser solved by hand, or the root of the stationarity condition in
60-digit decimal arithmetic."""

from __future__ import annotations

from decimal import Decimal, localcontext

import pytest
import torch

from cagrad_clip._dual import exact_line_search


def _line_search(beta1: float, s: float, q0: float, q1: float, q2: float, gamma_max: float) -> float:
    return float(exact_line_search(*(torch.tensor(x, dtype=torch.float64) for x in (beta1, s, q0, q1, q2, gamma_max))))


@pytest.mark.parametrize(("q2", "gamma_max", "minimiser"), [(1.0, 2.0, 1.0), (2.0, 1.0, 0.5)])
def test_line_search_finds_the_far_root_when_the_near_one_is_zero(q2: float, gamma_max: float, minimiser: float) -> None:
    """``h(g) = -g / 2 + sqrt(q2 g^2 - g + 1)``: ``h'(g) = 0`` at ``g = 1 / q2`` (``(2 q2 g - 1) = sqrt(Q(g))``,
    so ``Q(g) = 1``), inside ``[0, gamma_max]``. The squared stationarity condition has the roots 0 and
    ``1 / q2`` (constant term ``beta1^2 q0 - s^2 q1^2 / 4 = 0``): the quadratic formula must not take the far
    root as the difference ``qb - root`` (exactly 0 here), or the search ends at the kink or an end. Every
    number is a dyadic rational, so the root comes out exact."""
    assert _line_search(-0.5, 1.0, 1.0, -1.0, q2, gamma_max) == minimiser


def test_line_search_near_root_keeps_its_digits() -> None:
    """``h(g) = beta1 g + sqrt(g^2 + g + 1)`` with ``beta1 = -(1/2 + 2^-20)``: ``h'(0) = -2^-20`` and the
    minimiser is the small root ``g* ~ 1.27e-6`` of ``g^2 + g + (1 - 4 beta1^2) / (4 - 4 beta1^2) = 0``
    (``h'(g) = 0`` squared), here in 60-digit decimals. The coefficients are exact in float64, so the
    cancellation-free quadratic formula gives ``g*`` to a few ulps; taking the small root as
    ``(|qb| - root) / (2 qa)`` loses about 5 of its 16 digits."""
    beta1 = -(0.5 + 2.0**-20)
    with localcontext() as context:
        context.prec = 60
        b2 = Decimal(beta1) * Decimal(beta1)
        constant = (1 - 4 * b2) / (4 - 4 * b2)
        expected = float((-1 + (1 - 4 * constant).sqrt()) / 2)
    assert _line_search(beta1, 1.0, 1.0, 1.0, 1.0, 1.0) == pytest.approx(expected, rel=1e-14, abs=0.0)
