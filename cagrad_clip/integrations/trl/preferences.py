"""Per-objective signs from the shapes real preference data comes in (for ``datasets.Dataset.map``).

* Per-attribute ratings of both responses (HelpSteer2 / UltraFeedback style): objective ``k``'s sign
  is the sign of ``chosen``'s rating minus ``rejected``'s on attribute ``k``, a tie within ``tolerance``
  (:func:`signs_from_ratings`).
* One preferred-response id per objective over two responses (PKU-SafeRLHF style:
  ``better_response_id``, ``safer_response_id``): :func:`pair_from_preferred_ids` writes ``chosen`` and
  ``rejected`` (``chosen`` is the response the first objective prefers) and each objective's sign
  relative to that orientation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["pair_from_preferred_ids", "signs_from_ratings"]


def _number(example: Mapping[str, Any], column: str) -> float:
    if column not in example:
        raise KeyError(f"the example has no {column!r} column; its columns are {sorted(example)}")
    value = example[column]
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"column {column!r} holds {value!r}; a rating must be a number (or None: unknown, a tie)")
    return float(value)


def signs_from_ratings(example: Mapping[str, Any], chosen: Sequence[str], rejected: Sequence[str], tolerance: float = 0.0) -> list[int]:
    """One sign per attribute: ``+1`` if ``example[chosen[k]] - example[rejected[k]] > tolerance``, ``-1``
    if it is ``< -tolerance``, else ``0`` (a tie; also when either rating is ``None`` or NaN).

    ``chosen`` and ``rejected`` name the rating columns of the two responses, attribute by attribute in
    the objectives' order. Use it in ``ds.map(lambda ex: {"objective_signs": signs_from_ratings(ex, ...)})``.
    """
    if isinstance(chosen, str) or isinstance(rejected, str):
        raise TypeError("chosen and rejected are lists of column names (one per objective), not single names")
    if len(chosen) != len(rejected) or not chosen:
        raise ValueError(f"chosen and rejected must name the same number (>= 1) of rating columns; got {len(chosen)} and {len(rejected)}")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    signs = []
    for a, b in zip(chosen, rejected):
        diff = _number(example, a) - _number(example, b)
        signs.append(0 if math.isnan(diff) or abs(diff) <= tolerance else (1 if diff > 0 else -1))
    return signs


def pair_from_preferred_ids(
    example: Mapping[str, Any],
    responses: Sequence[str] = ("response_0", "response_1"),
    preferred: Sequence[str] = ("better_response_id", "safer_response_id"),
) -> dict[str, Any]:
    """``{"chosen", "rejected", "objective_signs"}`` from two responses and one preferred-response id per
    objective (``0`` or ``1``: which of ``responses`` that objective prefers; ``None`` or ``-1``: a tie).

    ``chosen`` is the response the first objective (``preferred[0]``) prefers (``responses[0]`` when it
    has no preference), so its sign is ``+1`` (``0`` for a tie); every other objective's sign is ``+1``
    if it prefers ``chosen`` too, ``-1`` if it prefers ``rejected``. Use it in ``ds.map(pair_from_preferred_ids)``.
    """
    if len(responses) != 2:
        raise ValueError(f"responses must name the two response columns, got {list(responses)}")
    if isinstance(preferred, str) or not preferred:
        raise TypeError("preferred is a list of id columns, one per objective")
    ids: list[int | None] = []
    for column in preferred:
        if column not in example:
            raise KeyError(f"the example has no {column!r} column; its columns are {sorted(example)}")
        value = example[column]
        if value is None or value == -1:
            ids.append(None)
        elif isinstance(value, bool) or value not in (0, 1):
            raise ValueError(f"column {column!r} holds {value!r}; a preferred-response id is 0 or 1 (None or -1: no preference)")
        else:
            ids.append(int(value))
    first = ids[0] if ids[0] is not None else 0
    signs = [0 if i is None else (1 if i == first else -1) for i in ids]
    return {"chosen": example[responses[first]], "rejected": example[responses[1 - first]], "objective_signs": signs}
