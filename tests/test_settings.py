"""``cagrad_clip._settings``: the validated, frozen options of one CAGrad-Clip solve."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cagrad_clip import SOLVER_OPTIONS
from cagrad_clip._settings import (
    RESCALE_OPTIONS,
    CAGradSettings,
    check_c,
    normalize_weights,
    rescale_divisor,
)


@pytest.mark.parametrize(
    ("c", "error"),
    [
        (-0.1, ValueError),
        (float("inf"), ValueError),
        (float("-inf"), ValueError),
        (float("nan"), ValueError),
        ("0.4", TypeError),
        (True, TypeError),
        (None, TypeError),
        (torch.ones(2), TypeError),
        (1 + 2j, TypeError),
    ],
)
def test_bad_c(c, error) -> None:
    with pytest.raises(error, match="c must be"):
        CAGradSettings(c=c)
    with pytest.raises(error, match="c must be"):
        check_c(c)


@pytest.mark.parametrize("c", [np.float32(0.25), np.float64(0.25), torch.tensor(0.25), 0.25, 0, np.int64(2)])
def test_real_c_is_accepted_as_float(c) -> None:
    settings = CAGradSettings(c=c)
    assert type(settings.c) is float and settings.c == float(c)


def test_weights_are_normalised_to_a_tuple() -> None:
    settings = CAGradSettings(weights=[3.0, 1.0])
    assert settings.weights == (0.75, 0.25) and settings.num_objectives == 2
    assert CAGradSettings(weights=torch.tensor([1.0, 1.0])).weights == (0.5, 0.5)
    assert CAGradSettings().weights is None and CAGradSettings().num_objectives is None
    torch.testing.assert_close(CAGradSettings().weights_tensor(4), torch.full((4,), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match="2 weights"):
        settings.weights_tensor(3)


@pytest.mark.parametrize(
    ("weights", "error", "match"),
    [
        ("ab", TypeError, "string"),
        ([1.0, -1.0], ValueError, ">= 0"),
        ([0.0, 0.0], ValueError, "positive sum"),
        ([1.0, float("nan")], ValueError, "finite"),
        ([[0.5, 0.5]], ValueError, "shape"),
        ([], ValueError, "shape"),
        ([object()], TypeError, "real numbers"),
    ],
)
def test_bad_weights(weights, error, match) -> None:
    with pytest.raises(error, match=match):
        CAGradSettings(weights=weights)


def test_bad_options() -> None:
    with pytest.raises(TypeError, match="clip"):
        CAGradSettings(clip="yes")
    with pytest.raises(ValueError, match="rescale"):
        CAGradSettings(rescale="1+c^3")
    with pytest.raises(ValueError, match="solver"):
        CAGradSettings(solver="newton")
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="max_iter"):
            CAGradSettings(max_iter=bad)


def test_divisor_matches_each_rescale() -> None:
    assert set(RESCALE_OPTIONS) == {None, "1+c", "1+c^2"} and set(SOLVER_OPTIONS) == {"auto", "exact", "frank_wolfe"}
    assert [CAGradSettings(c=0.5, rescale=r).divisor for r in (None, "1+c", "1+c^2")] == [1.0, 1.5, 1.25]
    assert rescale_divisor("1+c", 2.0) == 3.0


def test_frozen_and_replace_validates() -> None:
    settings = CAGradSettings(c=0.4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.c = 0.5  # type: ignore[misc]
    assert settings.replace(c=0.5).c == 0.5 and settings.c == 0.4
    with pytest.raises(ValueError, match="c must be"):
        settings.replace(c=-1.0)
    with pytest.raises(TypeError, match="unknown setting"):
        settings.replace(radius=0.5)


def test_dict_round_trip_and_unknown_key() -> None:
    settings = CAGradSettings(weights=[0.8, 0.2], c=0.3, clip=False, rescale="1+c^2", solver="exact", max_iter=7)
    assert CAGradSettings.from_dict(settings.to_dict()) == settings
    with pytest.raises(ValueError, match="unknown setting"):
        CAGradSettings.from_dict({**settings.to_dict(), "radius": 1.0})
    with pytest.raises(TypeError, match="mapping"):
        CAGradSettings.from_dict([("c", 0.4)])  # type: ignore[arg-type]


def test_normalize_weights_none_needs_m() -> None:
    torch.testing.assert_close(normalize_weights(None, 2), torch.tensor([0.5, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="needs the number of objectives"):
        normalize_weights(None)


def test_complex_or_boolean_weights_are_refused_in_every_container() -> None:
    """Weights are real numbers, and ``c`` refuses a complex tensor: a complex or boolean tensor or
    NumPy array is refused as a complex list is (a cast would drop the imaginary part, with only
    torch's warning, or turn ``False`` into a zero weight)."""
    with pytest.raises(TypeError):
        normalize_weights([1 + 1j, 3 + 0j])
    with pytest.raises(TypeError):
        check_c(torch.tensor(1 + 1j))
    for weights in (torch.tensor([1 + 1j, 3 + 0j]), np.array([1 + 1j, 3]), torch.tensor([True, False]), np.array([True, False])):
        with pytest.raises(TypeError, match="weights must be real numbers"):
            normalize_weights(weights)
    torch.testing.assert_close(normalize_weights(np.array([1.0, 3.0])), torch.tensor([0.25, 0.75], dtype=torch.float64))


def test_a_batch_of_weights_is_normalised_row_by_row() -> None:
    """Weights of shape ``(..., m)``: each row sums to 1 (divided by its own sum, not broadcast across rows)."""
    got = normalize_weights(torch.tensor([[1.0, 3.0], [2.0, 2.0], [0.0, 5.0]]))
    torch.testing.assert_close(got, torch.tensor([[0.25, 0.75], [0.5, 0.5], [0.0, 1.0]], dtype=torch.float64), rtol=0, atol=0)
    assert normalize_weights(torch.ones(2, 4, 3)).shape == (2, 4, 3)


def test_rescale_divisor_checks_its_rescale() -> None:
    """The divisor of each convention, and an unknown convention refused (not divided by 1 silently)."""
    assert (rescale_divisor(None, 0.5), rescale_divisor("1+c", 0.5), rescale_divisor("1+c^2", 0.5)) == (1.0, 1.5, 1.25)
    with pytest.raises(ValueError, match=r"unknown rescale='1\+2c'"):
        rescale_divisor("1+2c", 0.5)  # type: ignore[arg-type]
