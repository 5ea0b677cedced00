"""The shared numerics core: the reduction dtype, autocast off, the blocked dot products (exact on integers)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from cagrad_clip import _numerics as numerics
from cagrad_clip._numerics import GRAM_BLOCK, blocked_dot, gram_of_block, no_autocast, reduction_dtype


def test_the_reduction_dtype_is_float64_if_any_input_is_else_float32() -> None:
    assert reduction_dtype() == torch.float32
    for dtypes, want in [
        ((torch.bfloat16,), torch.float32),
        ((torch.float16, torch.bfloat16), torch.float32),
        ((torch.float32,), torch.float32),
        ((torch.bfloat16, torch.float64), torch.float64),
        ((torch.float64,), torch.float64),
    ]:
        promoted = torch.float32
        for dtype in dtypes:  # torch's own promotion with float32, which the host-side rule must equal
            promoted = torch.promote_types(promoted, dtype)
        assert reduction_dtype(*dtypes) == want == promoted


def test_no_autocast_turns_the_callers_autocast_off() -> None:
    a = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        with no_autocast(a.device):
            assert (a @ a).dtype == torch.float32


def test_no_autocast_on_a_device_type_without_autocast_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("User specified an unsupported autocast device_type 'meta'")

    monkeypatch.setattr(torch, "autocast", refuse)
    assert isinstance(no_autocast(torch.device("meta")), contextlib.nullcontext)


def _integer_vectors(k: int, n: int, seed: int = 0) -> torch.Tensor:
    """``k`` rows of ``n`` small integers: every product and partial sum is exact in float32 and float64."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, (k, n), generator=g)


@pytest.mark.parametrize("n", [5, GRAM_BLOCK, 2 * GRAM_BLOCK, 2 * GRAM_BLOCK + 7, 3 * GRAM_BLOCK - 1, 4 * GRAM_BLOCK])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_blocked_dot_products_equal_the_integer_ones_exactly(n: int, dtype: torch.dtype) -> None:
    """Across zero, one, two and more whole blocks, with and without a remainder: ``gram_of_block`` and
    ``blocked_dot`` equal the int64 Gram exactly (no product lost or counted twice at a boundary)."""
    ints = _integer_vectors(3, n)
    want = ints @ ints.T
    rows = ints.to(dtype)
    assert torch.equal(gram_of_block(rows), want.to(dtype))
    got = torch.stack([torch.stack([blocked_dot(rows[i], rows[j]) for j in range(3)]) for i in range(3)])
    assert torch.equal(got, want.to(dtype))


def test_the_tiles_are_used_from_two_whole_blocks_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below two blocks one plain product; from two on one ``bmm`` over the tiles (the float32 chains stay
    ``GRAM_BLOCK`` long): checked by counting the ``bmm`` calls at a small block size."""
    monkeypatch.setattr(numerics, "GRAM_BLOCK", 4)
    calls = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(1) or bmm(*a))
    for n, tiled in [(7, False), (8, True), (9, True)]:
        calls.clear()
        ints = _integer_vectors(2, n, seed=n).double()
        assert torch.equal(gram_of_block(ints), ints @ ints.T) and bool(calls) == tiled
        calls.clear()
        assert blocked_dot(ints[0], ints[1]) == ints[0] @ ints[1] and bool(calls) == tiled
