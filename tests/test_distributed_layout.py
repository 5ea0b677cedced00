"""What the refusals of unsupported DTensor layouts name: the parameter at fault and its placements.

One gloo rank (``one_rank_group``) and ``distribute_tensor`` make the DTensor parameters; the optimizer
refuses them at construction, before any step.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from cagrad_clip import ConflictAverseOptimizer
from tests.process_groups import fsdp2_missing, one_rank_group

pytestmark = pytest.mark.skipif(fsdp2_missing() is not None, reason=fsdp2_missing() or "")

F64 = torch.float64


def test_a_mix_of_dtensor_and_plain_parameters_names_the_first_plain_one() -> None:
    """Parameters ``[DTensor (4,), plain (2, 3), DTensor (5,)]``: the refusal names parameter 1 and its shape
    ``(2, 3)``, the plain one, not a DTensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    with one_rank_group():
        mesh = init_device_mesh("cpu", (1,))
        first = nn.Parameter(distribute_tensor(torch.ones(4, dtype=F64), mesh, [Shard(0)]))
        plain = nn.Parameter(torch.ones(2, 3, dtype=F64))
        last = nn.Parameter(distribute_tensor(torch.ones(5, dtype=F64), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match=re.escape("parameter 1 (shape (2, 3)) is a plain tensor but others are DTensors")):
            ConflictAverseOptimizer(torch.optim.SGD([first, plain, last], lr=0.1))


def test_an_unsupported_placement_is_refused_showing_the_placements() -> None:
    """A ``Replicate`` parameter after a ``Shard(0)`` one on a 1-D mesh, then a ``(Shard(0), Shard(0))``
    parameter on a 2-D mesh: each refusal names the parameter's index and shows its own placements."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    with one_rank_group():
        mesh = init_device_mesh("cpu", (1,))
        sharded = nn.Parameter(distribute_tensor(torch.ones(4, dtype=F64), mesh, [Shard(0)]))
        replicated = nn.Parameter(distribute_tensor(torch.ones(4, dtype=F64), mesh, [Replicate()]))
        expected = f"parameter 1 has placements {(Replicate(),)!r} on a 1-D mesh"
        with pytest.raises(NotImplementedError, match=re.escape(expected)):
            ConflictAverseOptimizer(torch.optim.SGD([sharded, replicated], lr=0.1))
        square = init_device_mesh("cpu", (1, 1))
        hsdp = nn.Parameter(distribute_tensor(torch.ones(4, dtype=F64), square, [Shard(0), Shard(0)]))
        expected = f"parameter 0 has placements {(Shard(0), Shard(0))!r} on a 2-D mesh"
        with pytest.raises(NotImplementedError, match=re.escape(expected)):
            ConflictAverseOptimizer(torch.optim.SGD([hsdp], lr=0.1))
