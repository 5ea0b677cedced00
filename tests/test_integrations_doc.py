"""Run every block of docs/integrations.md marked ``<!-- runnable -->`` (skipped when a required package is missing)."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest
import torch

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
BLOCK = re.compile(r"<!-- runnable(?:: requires ([\w, ]+))? -->\s*```python\n(.*?)```", re.S)
BLOCKS = BLOCK.findall(DOC.read_text())


def test_the_doc_has_runnable_blocks():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("requires, code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_runnable_block(requires, code, tmp_path, monkeypatch):
    for package in filter(None, (p.strip() for p in requires.split(","))):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"needs {package}")
    monkeypatch.chdir(tmp_path)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # the snippets are written for the default float32
    try:
        exec(compile(code, f"{DOC.name}:runnable", "exec"), {"__name__": "integrations_doc"})
    finally:
        torch.set_default_dtype(dtype)
