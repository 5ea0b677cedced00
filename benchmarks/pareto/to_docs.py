"""Copy finished reports into the docs.

``python -m benchmarks.pareto.to_docs INTRO.md RESULTS_DIR [RESULTS_DIR ...]`` writes
``docs/benchmarks.md`` = the hand-written introduction (machine, wall time, findings) followed by
the generated report(s) (summaries merged, sections in order), figures copied to ``docs/figures/``.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None, docs: Path = Path("docs")) -> Path:
    args = sys.argv[1:] if argv is None else argv
    intro, results = Path(args[0]), [Path(a) for a in args[1:]]
    (docs / "figures").mkdir(parents=True, exist_ok=True)
    headers, summary, sections = [], [], []
    for res in results:
        for png in sorted(res.glob("*.png")):
            shutil.copy(png, docs / "figures" / png.name)
        text = re.sub(r"\]\(([\w.-]+\.png)\)", r"](figures/\1)", (res / "report.md").read_text())
        parts = text.split("\n## ")
        headers.append(parts[0].replace("# Synthetic Pareto benchmarks\n", "").strip())
        for p in parts[1:]:
            if p.startswith("Summary"):
                summary += [line for line in p.splitlines() if line.startswith("- ")]
            else:
                sections.append("### " + p.strip())
    out = [intro.read_text().rstrip(), "\n\n## Generated report\n"]
    out += [h + "\n" for h in headers]
    out.append("\n### Summary lines\n\n" + "\n".join(summary) + "\n")
    out += ["\n" + s + "\n" for s in sections]
    path = docs / "benchmarks.md"
    path.write_text("\n".join(out))
    return path


if __name__ == "__main__":
    main()
