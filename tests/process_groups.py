"""Process-group helpers shared by the tests: a 1-rank gloo group, and whether FSDP2 can run here."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

import torch.distributed as dist

from cagrad_clip._torch_version import FSDP2_MIN_TORCH, torch_at_least


@contextlib.contextmanager
def one_rank_group() -> Iterator[None]:
    """A 1-rank gloo process group (FSDP2's ``fully_shard`` needs one), destroyed afterwards."""
    assert not dist.is_initialized(), "a process group is already initialised in the test process"
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method="file://" + os.path.join(tmp, "init"), rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def gloo_missing() -> str | None:
    """Why ``torch.distributed`` with gloo cannot run in this build, or ``None`` when it can."""
    if not (dist.is_available() and dist.is_gloo_available()):
        return "torch.distributed with the gloo backend is not available in this torch build"
    return None


def fsdp2_missing() -> str | None:
    """Why FSDP2 on CPU/gloo cannot run in this build (``None`` when it can): it needs gloo,
    ``torch.distributed.fsdp.fully_shard`` and the package's FSDP2 floor (it refuses DTensors below that)."""
    reason = gloo_missing()
    if reason is not None:
        return reason
    if not torch_at_least(FSDP2_MIN_TORCH):
        return f"FSDP2 on CPU (gloo) needs torch {'.'.join(map(str, FSDP2_MIN_TORCH))} or newer"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return "torch.distributed.fsdp.fully_shard (FSDP2) is not available in this torch build"
    return None
