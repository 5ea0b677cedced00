"""The DPO-independent parts of a multi-objective preference trainer: per-objective signs.

Each example carries one sign per objective (``+1`` chosen better, ``-1`` rejected better, ``0`` a tie).
:class:`SignsCollator` validates and collates them batch by batch; :func:`check_dataset` checks a
dataset up front. A second trainer (another TRL loss family) reuses both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["SignsCollator", "check_dataset", "signs_tensor"]


def signs_tensor(rows: Sequence[Any], column: str, m: int | None, source: str = "objective_weights", where: str = "") -> Tensor:
    """Validate a batch (or dataset) of sign rows: a ``(n, m)`` float tensor with entries in {-1, 0, 1}.

    Booleans are refused (``False`` would read as 0, a tie, and silently drop every pair whose rejected
    response is better), and so is any value outside {-1, 0, +1}; both errors name the first bad row.
    ``source`` names the config field that fixed ``m``; ``where`` (e.g. ``"train_dataset: "``) prefixes the messages.
    """
    for r, row in enumerate(rows):
        try:
            values = [] if isinstance(row, (str, bytes)) else list(row)
        except TypeError:
            values = []
        if not values and not (isinstance(row, Sequence) and len(row) == 0):
            raise ValueError(f"{where}column {column!r}, row {r}: {row!r} is not a list of signs (one per objective)")
        for x in values:
            # Python's and numpy's booleans, and boolean tensors
            if type(x).__name__ in ("bool", "bool_") or (isinstance(x, Tensor) and x.dtype == torch.bool):
                raise ValueError(
                    f"{where}column {column!r}, row {r}: {values!r} holds booleans; signs are numbers: +1 (chosen better), "
                    "-1 (rejected better) or 0 (a tie). Map them explicitly (e.g. 1 if chosen_better else -1): False is not a tie"
                )
    try:
        signs = torch.tensor([[float(x) for x in row] for row in rows], dtype=torch.float32, device="cpu")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}column {column!r} must hold one list of numbers per example, all of the same length") from exc
    if signs.dim() != 2 or signs.shape[1] == 0:
        raise ValueError(f"{where}column {column!r} must hold one non-empty list of signs per example; got shape {tuple(signs.shape)}")
    if m is not None and signs.shape[1] != m:
        if source == "objective_names":
            fix = "give one name per objective (one per sign, in the same order), or leave objective_names unset (objective_0, ...)"
        elif source == "objective_betas":
            fix = "give one beta per objective (one per sign, in the same order), or leave objective_betas unset (beta for all)"
        else:
            fix = "give one weight per objective (one per sign, in the same order)"
        raise ValueError(f"{where}column {column!r} has {signs.shape[1]} signs per example but there are {m} {source}; {fix}")
    bad = ~((signs == 1) | (signs == 0) | (signs == -1))
    if bool(bad.any()):
        r = int(bad.any(1).nonzero()[0, 0])
        raise ValueError(
            f"{where}column {column!r}, row {r}: {signs[r].tolist()} holds {sorted(set(signs[r][bad[r]].tolist()))}; "
            "signs must be +1 (chosen better), -1 (rejected better) or 0 (a tie)"
        )
    return signs


class SignsCollator:
    """Wraps a preference collator: takes ``column`` out of the examples, collates the rest, and adds
    the validated signs as a ``(batch, m)`` float tensor (TRL's collator would drop them).

    ``num_objectives`` (if known) is checked on every batch; ``source`` names the setting it comes from.
    """

    def __init__(self, collator: Any, column: str, num_objectives: int | None, source: str = "objective_weights") -> None:
        self.collator, self.column, self.num_objectives, self.source = collator, column, num_objectives, source

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        missing = [i for i, ex in enumerate(examples) if self.column not in ex]
        if missing:
            raise KeyError(f"examples {missing} have no {self.column!r} (per-objective signs); keys: {sorted(examples[missing[0]])}")
        signs = signs_tensor([ex[self.column] for ex in examples], self.column, self.num_objectives, self.source, "a batch's ")
        batch = self.collator([{k: v for k, v in ex.items() if k != self.column} for ex in examples])
        batch[self.column] = signs
        return batch


def check_dataset(dataset: Any, column: str, m: int | None, name: str, source: str) -> None:
    """Fail at construction on data without (valid) signs, or with a number of signs other than ``m``.

    A map-style dataset is checked whole. A streamed one (no ``__len__``, e.g. an ``IterableDataset``)
    can only tell its number of signs by iterating, so its *first example* is checked here: TRL's
    ``DPOTrainer`` itself reads ``next(iter(dataset))`` of every dataset it prepares while it is built,
    so this reads one example and assumes nothing about the stream that TRL does not (re-iterable).
    The rest of a stream is checked batch by batch by :class:`SignsCollator` (``m`` included), which
    runs before the batch's forward pass, so before any optimizer step or checkpoint.
    """
    column_names = getattr(dataset, "column_names", None)
    if isinstance(column_names, dict):
        return
    missing = (
        f"{name} has no {column!r} column (one sign per objective: +1 chosen better, -1 rejected better, 0 tie); "
        f"its columns are {{}}. Set signs_column= to use another column."
    )
    if column_names is not None and column not in column_names:
        raise ValueError(missing.format(column_names))
    if hasattr(dataset, "__len__"):
        if column_names is not None and len(dataset):
            signs_tensor(dataset[column], column, m, source, f"{name}: ")
        return
    first = next(iter(dataset), None)
    if isinstance(first, dict):
        if column not in first:
            raise ValueError(missing.format(sorted(first)))
        signs_tensor([first[column]], column, m, source, f"{name}: ")
