"""The torch floor: one number in pyproject.toml, refused at import below it, feature gates above it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cagrad_clip._torch_version import FSDP2_MIN_TORCH, MIN_TORCH, check_torch_version, release

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("version", "expected"),
    [("2.4.0", (2, 4)), ("2.13.0+cpu", (2, 13)), ("2.4.0a0+git3bcc3cd", (2, 4)), ("10.1.2.dev20261201", (10, 1))],
)
def test_release_reads_major_and_minor(version: str, expected: tuple[int, int]) -> None:
    assert release(version) == expected


def test_an_unreadable_version_string_is_named() -> None:
    with pytest.raises(ValueError, match="'nightly'"):
        release("nightly")


@pytest.mark.parametrize("version", ["2.3.1", "2.3.0+cu121", "1.13.1", "2.0.0"])
def test_a_torch_older_than_the_floor_is_refused_naming_the_fix(version: str) -> None:
    with pytest.raises(ImportError, match=re.escape(f"needs torch>=2.4, but torch {version} is installed")) as info:
        check_torch_version(version)
    assert "pip install 'torch>=2.4'" in str(info.value)


@pytest.mark.parametrize("version", ["2.4.0", "2.4.0a0+git3bcc3cd", "2.13.0+cpu", "3.0.0"])
def test_the_floor_and_newer_releases_import(version: str) -> None:
    check_torch_version(version)


def test_the_floor_is_the_one_pyproject_states() -> None:
    """pyproject.toml is the one place the floor is stated for installers; the code's constant and the
    README follow it."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    (dependency,) = re.findall(r'dependencies = \["torch>=(\d+)\.(\d+)"\]', pyproject)
    assert tuple(map(int, dependency)) == MIN_TORCH
    floor = ".".join(map(str, MIN_TORCH))
    assert f"torch>={floor}" in (ROOT / "README.md").read_text()
    assert f"torch>={floor}" in (ROOT / "docs" / "development.md").read_text()
    assert MIN_TORCH < FSDP2_MIN_TORCH


def test_importing_the_package_under_an_old_torch_fails_at_import_with_the_message() -> None:
    """The real import path: the check runs before any submodule that needs the floor's features."""
    code = "import torch; torch.__version__ = '2.3.0'; import cagrad_clip"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0
    assert "ImportError: cagrad-clip needs torch>=2.4, but torch 2.3.0 is installed" in proc.stderr
