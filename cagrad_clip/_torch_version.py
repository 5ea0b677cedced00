"""The torch releases this package supports: the floor, checked once at import, and feature gates.

The floor is stated once for installers, as ``torch>=2.4`` in ``pyproject.toml`` (a test keeps
:data:`MIN_TORCH` equal to it). 2.4 is the oldest release with everything the step uses:
``torch._foreach_norm(..., dtype=)`` (the default store's batched finiteness check) and
``torch.amp.is_autocast_available`` (the reductions leave the caller's autocast). The version table
measured by ``python tools/torch_versions.py`` is in docs/development.md.
"""

from __future__ import annotations

import re

import torch

__all__ = ["FSDP2_MIN_TORCH", "MIN_TORCH", "check_torch_version", "release", "torch_at_least"]

#: The oldest torch (major, minor) the package imports on.
MIN_TORCH = (2, 4)
#: The oldest torch on which the FSDP2 (DTensor) path passes the contract suite, which runs FSDP2 on
#: CPU/gloo: FSDP2 runs there from 2.7, but 2.7 and 2.8 sum float32/bfloat16 gradients over gloo ranks
#: instead of averaging them (float64 is averaged; measured with plain SGD, no wrapper), so a step is
#: world-size times too long. Older releases are refused when the parameters are DTensors.
FSDP2_MIN_TORCH = (2, 9)


def release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a torch version string: ``"2.4.0a0+git1234"`` and ``"2.13.0+cpu"`` alike."""
    match = re.match(r"\s*(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"cannot read a torch release from version string {version!r}")
    return int(match.group(1)), int(match.group(2))


def torch_at_least(minimum: tuple[int, int]) -> bool:
    """Whether the running torch is at least ``minimum`` (its pre-releases count as that release)."""
    return release(str(torch.__version__)) >= minimum


def check_torch_version(version: str) -> None:
    """Raise ``ImportError`` naming the fix if ``version`` is older than :data:`MIN_TORCH`."""
    if release(version) < MIN_TORCH:
        floor = ".".join(map(str, MIN_TORCH))
        raise ImportError(
            f"cagrad-clip needs torch>={floor}, but torch {version} is installed: the step uses "
            f"torch._foreach_norm(..., dtype=) and torch.amp.is_autocast_available, which came in {floor}. "
            f"Upgrade torch (pip install 'torch>={floor}') or use the build you have with an older tool."
        )
