"""CLI: ``python -m benchmarks.speed [--sections solver,step,memory,levers] [--quick] [--threads N] ...``.

Writes ``results/speed/speed.md`` (and ``speed.json``) under ``--out``. Each section's module
imports only when the section runs, so ``--sections memory`` works against any build of
``cagrad_clip`` (e.g. an older commit on ``PYTHONPATH``, to measure a "before").
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

from .common import RESULTS, keep_freed_memory, library_version, machine

SECTIONS = ("solver", "step", "memory", "levers")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (``--help`` lists them)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description="Speed and memory at the floor.")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 15; --quick 5)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's); 1 avoids thread-pool wake-up latency for small ops",
    )
    parser.add_argument("--compile", action="store_true", help="solver: also time torch.compile'd solvers")
    parser.add_argument("--ms", default=None, help="solver: comma list of m (default 2,4,8,16,32,64)")
    parser.add_argument("--batches", default=None, help="solver: comma list of batch sizes (default 1,1024)")
    parser.add_argument("--models", default=None, help="step: comma list of mlp-<width>, transformer (default transformer,mlp-2048)")
    parser.add_argument("--step-ms", default=None, help="step: comma list of m (default 2,4,8)")
    parser.add_argument("--mlp-batch", type=int, default=64, help="step: rows per MLP training step (default 64)")
    parser.add_argument(
        "--memory-models", default=None, help="memory: comma list of encoder, encoder-<d_model>, gpt2 (default encoder,gpt2,encoder-512)"
    )
    parser.add_argument("--memory-ms", default=None, help="memory: comma list of m (default 2,3,4,8)")
    parser.add_argument("--memory-batch", default="4,32", help="memory: sequences,tokens per step (default 4,32)")
    parser.add_argument("--dtypes", default=None, help="memory: comma list of fp32, bf16 (default both)")
    parser.add_argument(
        "--allocator",
        choices=("system", "caching"),
        default="system",
        help="system: the C allocator as configured (glibc returns large freed blocks to the kernel); caching: keep "
        "freed memory for reuse, as CUDA's caching allocator does (glibc only)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"report folder (default {RESULTS})")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate; fills in the per-section defaults (smaller with ``--quick``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    args.sections = sections
    q = args.quick
    args.repeats = args.repeats or (5 if q else 15)
    args.ms = _ints(args.ms) if args.ms else ([2, 8] if q else [2, 4, 8, 16, 32, 64])
    args.batches = _ints(args.batches) if args.batches else ([1, 16] if q else [1, 1024])
    args.models = args.models.split(",") if args.models else (["mlp-512"] if q else ["transformer", "mlp-2048"])
    args.step_ms = _ints(args.step_ms) if args.step_ms else ([2] if q else [2, 4, 8])
    args.memory_models = args.memory_models.split(",") if args.memory_models else (["encoder"] if q else ["encoder", "gpt2", "encoder-512"])
    args.memory_ms = _ints(args.memory_ms) if args.memory_ms else ([2] if q else [2, 3, 4, 8])
    dtypes = args.dtypes.split(",") if args.dtypes else (["bf16"] if q else ["fp32", "bf16"])
    bad = sorted(set(dtypes) - set(DTYPES))
    if bad:
        parser.error(f"unknown dtype(s) {bad}; choose from {list(DTYPES)}")
    args.dtypes = dtypes
    args.memory_batch = tuple(_ints(args.memory_batch))
    if len(args.memory_batch) != 2:
        parser.error("--memory-batch takes two numbers: sequences,tokens")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the requested sections and write the report."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    def log(msg: str) -> None:
        print(msg, flush=True)

    from .peers import TORCHJD_NOTE

    header, library = machine(TORCHJD_NOTE), library_version()
    if args.allocator == "caching":
        header += "; allocator: " + keep_freed_memory()
    log(f"machine: {header}\nlibrary: {library}")
    solver_rows = step_rows = memory_rows = lever_rows = []
    if "solver" in args.sections:
        from .solver import solver_section

        solver_rows = solver_section(args.ms, args.batches, args.repeats, 2 if args.quick else 6, 2 if args.quick else 4, args.compile, log)
    if "step" in args.sections:
        from . import models
        from .step import step_section

        models.MLP_BATCH = args.mlp_batch
        step_rows = step_section(args.models, args.step_ms, max(5, (2 * args.repeats) // 3), log)
    if "memory" in args.sections:
        from . import models
        from .memory import memory_section

        models.MEMORY_BATCH = args.memory_batch
        memory_rows = memory_section(args.memory_models, [DTYPES[d] for d in args.dtypes], args.memory_ms, log)
    if "levers" in args.sections:
        from .levers import lever_section
        from .models import MLP

        numel = sum(p.numel() for p in MLP(2048, 2).parameters())  # the width-2048 MLP: the overhead target's case
        lever_rows = lever_section(numel, [2, 8] if args.quick else [2, 4, 8], max(3, args.repeats // 3), log)
    from .report import render

    command = " ".join(["python -m benchmarks.speed", *(sys.argv[1:] if argv is None else argv)])
    text = render(command, header, library, solver_rows, step_rows, memory_rows, lever_rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.md").write_text(text + "\n")
    (args.out / "speed.json").write_text(
        json.dumps(
            {
                "command": command,
                "machine": header,
                "library": library,
                "solver": solver_rows,
                "step": step_rows,
                "memory": memory_rows,
                "levers": lever_rows,
            },
            indent=1,
        )
    )
    print()
    print(text)
    log(f"wrote {args.out / 'speed.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
