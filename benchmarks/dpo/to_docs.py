"""Copy a finished DPO report into the docs.

``python -m benchmarks.dpo.to_docs INTRO.md RESULTS_DIR`` writes ``docs/benchmarks_dpo.md`` = the
hand-written introduction (machine, wall time, findings) followed by the generated report, and copies
its figures to ``docs/figures/``. ``docs/benchmarks.md`` (the Pareto benchmarks) is not touched.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None, docs: Path = Path("docs")) -> Path:
    args = sys.argv[1:] if argv is None else argv
    intro, results = Path(args[0]), Path(args[1])
    (docs / "figures").mkdir(parents=True, exist_ok=True)
    for png in sorted(results.glob("*.png")):
        shutil.copy(png, docs / "figures" / png.name)
    report = re.sub(r"\]\(([\w.-]+\.png)\)", r"](figures/\1)", (results / "report.md").read_text())
    report = report.replace("# Multi-objective DPO benchmark\n", "## Generated report\n").replace("\n## ", "\n### ")
    path = docs / "benchmarks_dpo.md"
    path.write_text(intro.read_text().rstrip() + "\n\n" + report.strip() + "\n")
    return path


if __name__ == "__main__":
    main()
