"""tools/torch_versions.py: its parsing of specs and of pytest's summary (the venv runs are not in CI)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("torch_versions", Path(__file__).resolve().parents[1] / "tools" / "torch_versions.py")
assert _spec is not None and _spec.loader is not None
torch_versions = importlib.util.module_from_spec(_spec)
sys.modules["torch_versions"] = torch_versions  # dataclasses look their module up there
_spec.loader.exec_module(torch_versions)


def test_specs_name_a_torch_release_and_a_python() -> None:
    spec = torch_versions.Spec.parse("2.13.0+cpu@3.11")
    assert (spec.torch, spec.python, spec.slug) == ("2.13.0+cpu", "3.11", "torch2.13.0_cpu-py3.11")
    assert torch_versions.Spec.parse("2.4.0@/opt/py/bin/python3.10").slug == "torch2.4.0-pypython3.10"
    for bad in ("2.4.0", "2.4.0@", "latest@3.11", "@3.11"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not TORCH@PYTHON"):
            torch_versions.Spec.parse(bad)


def test_a_release_comes_from_the_index_alone_and_a_local_build_keeps_the_configuration(monkeypatch) -> None:
    monkeypatch.setenv("PIP_FIND_LINKS", "/opt/wheels")
    monkeypatch.setenv("PIP_CONSTRAINT", "/etc/cap.txt")
    release = torch_versions.pip_env(torch_versions.Spec("2.13.0", "3.11"))
    assert release["PIP_CONFIG_FILE"] == os.devnull
    assert "PIP_FIND_LINKS" not in release and "PIP_CONSTRAINT" not in release
    assert torch_versions.pip_env(torch_versions.Spec("2.13.0+cpu", "3.11"))["PIP_FIND_LINKS"] == "/opt/wheels"
    local = torch_versions.pip_env(torch_versions.Spec("2.13.0+cpu", "3.11"))
    assert local.get("PIP_CONFIG_FILE") == os.environ.get("PIP_CONFIG_FILE")


def test_the_summary_reads_pytests_counts_and_failed_ids() -> None:
    log = "\n".join(
        [
            "....F..E",
            "FAILED tests/test_fsdp.py::test_x[fsdp] - AssertionError: Tensor-likes are not close!",
            "ERROR tests/test_distributed.py::test_y - RuntimeError",
            "2 failed, 1084 passed, 160 skipped, 1 xfailed, 1 error in 301.25s (0:05:01)",
        ]
    )
    counts, failures = torch_versions.summarise(log)
    assert counts == "2 failed, 1084 passed, 160 skipped, 1 xfailed, 1 error"
    assert failures == ["tests/test_fsdp.py::test_x[fsdp]", "tests/test_distributed.py::test_y"]
    assert torch_versions.summarise("Traceback ...")[0] == "no pytest summary (see the log)"


def test_the_floor_the_tool_reads_is_the_packages() -> None:
    from cagrad_clip._torch_version import MIN_TORCH

    assert torch_versions.floor(Path(__file__).resolve().parents[1]) == MIN_TORCH
    assert torch_versions.release("2.13.0+cpu") == (2, 13)
