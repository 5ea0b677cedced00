"""The Python code blocks of the README and the user guide run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/guide.md", "docs/low_memory.md"]
#: What a page's examples need beyond the test extra (the page says so too).
NEEDS = {"docs/low_memory.md": ["torchjd"]}


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("doc", DOCS)
def test_code_blocks_run(doc):
    for module in NEEDS.get(doc, []):
        pytest.importorskip(module, reason=f"{doc}'s examples need {module} (the bench extra)")
    blocks = python_blocks(ROOT / doc)
    assert blocks, f"{doc} has no python code block"
    namespace: dict = {}
    default_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float32)
        for block in blocks:
            exec(compile(block, str(doc), "exec"), namespace)
    finally:
        torch.set_default_dtype(default_dtype)


@pytest.mark.parametrize(
    ("page", "intro"), [("benchmarks.md", "benchmarks/pareto/INTRO.md"), ("benchmarks_dpo.md", "benchmarks/dpo/INTRO.md")]
)
def test_the_benchmark_pages_are_their_tracked_introduction_then_the_generated_report(page, intro):
    """Each page is rebuilt by its ``to_docs`` from a tracked introduction and a run's report: the page
    must begin with that introduction, so an edit to one side only is caught."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / page).read_text()
    head = (root / intro).read_text().rstrip()
    assert text.startswith(head)
    assert "\n## Generated report\n" in text[len(head) :]
