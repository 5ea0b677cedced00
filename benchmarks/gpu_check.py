"""GPU check: ``python -m benchmarks.gpu_check`` -- one script, under 5 minutes on one H100 / H200.

Checks on the first CUDA device, prints a table, writes ``$OUT/gpu_check.md`` (``OUT`` set) or
``results/gpu_check.md``, and exits non-zero if a check failed:

a. **no host sync**: warm-up steps, then one ``opt.zero_grad(); opt.step(losses)`` under
   ``torch.cuda.set_sync_debug_mode("error")`` with ``nonfinite="ignore"`` (a plain training step
   runs under the same mode first as a control: if it fails, the model itself syncs).
b. **CUDA graph**: ``opt.combine()`` captured in a CUDA graph and replayed on freshly accumulated
   gradients gives the eager ``.grad``; if the optimizer's combine cannot be captured, the same
   check on ``solve_cagrad`` of a fixed Gram plus the combination ``sum_i a_i g_i``; the table
   says which was captured.
c. **memory**: ``torch.cuda.max_memory_allocated`` of a step (second of two) over plain training
   for a bf16 GPT-2 (``transformers``, built from a config, random weights and tokens) for
   m = 2, 3, in units of parameter bytes: ours (and ``memory="low"`` where the constructor accepts
   it) and the RACO authors' recipe. Passes if ours is within ``--memory-slack`` of the floor m - 1.
d. **timings** (informational): median step time (CUDA events) of the floor (m ``autograd.grad``
   passes), ours and TorchJD (``backward`` + ``jac_to_grad``, CAGrad and UPGrad) on a 4-layer
   ``TransformerEncoder``, and the dual solver alone, ours against TorchJD's CAGrad weighting.

Without CUDA it prints ``no CUDA device: nothing checked`` and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

CHECKS = ("sync", "graph", "memory", "timing")
NO_CUDA = "no CUDA device: nothing checked"
C = 0.4


@dataclass
class CheckResult:
    """One check: ``passed`` is ``None`` for informational checks; ``rows`` become a table."""

    name: str
    passed: bool | None
    detail: str
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--checks`` picks a subset of ``sync, graph, memory, timing``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description="CUDA checks of cagrad_clip (under 5 minutes).")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma list of {', '.join(CHECKS)} (default: all)")
    parser.add_argument("--gpt2-layers", type=int, default=12, help="memory: GPT-2 layers (default 12: 124 M parameters)")
    parser.add_argument("--gpt2-width", type=int, default=768, help="memory: GPT-2 n_embd (default 768; 1024 + 24 layers: 355 M)")
    parser.add_argument("--memory-ms", default="2,3", help="memory: comma list of m (default 2,3)")
    parser.add_argument(
        "--memory-slack", type=float, default=0.25, help="memory: ours passes if extra <= (m - 1) + slack parameter bytes (default 0.25)"
    )
    parser.add_argument("--timing-ms", default="2,4,8", help="timing: comma list of m (default 2,4,8)")
    parser.add_argument("--repeats", type=int, default=20, help="timing: repeats per variant (default 20)")
    parser.add_argument("--out", type=Path, default=None, help="report file (default $OUT/gpu_check.md or results/gpu_check.md)")
    args = parser.parse_args(argv)
    checks = [c for c in args.checks.split(",") if c]
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        parser.error(f"unknown check(s) {unknown}; choose from {list(CHECKS)}")
    args.checks = checks
    args.memory_ms = [int(v) for v in args.memory_ms.split(",") if v]
    args.timing_ms = [int(v) for v in args.timing_ms.split(",") if v]
    return args


def report_path(out: Path | None, env: dict[str, str] | None = None) -> Path:
    """``--out``, else ``$OUT/gpu_check.md``, else ``results/gpu_check.md``."""
    env = dict(os.environ) if env is None else env
    if out is not None:
        return out
    if env.get("OUT"):
        return Path(env["OUT"]) / "gpu_check.md"
    return Path("results/gpu_check.md")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def render(results: list[CheckResult], machine: str, command: str) -> str:
    """The Markdown report: a summary table, then each check's own table."""
    status = {True: "PASS", False: "**FAIL**", None: "info"}
    out = ["# GPU check\n", f"Command: `{command}`  \nMachine: {machine}\n", "## Summary\n"]
    out += _table(["check", "status", "detail"], [[r.name, status[r.passed], r.detail.replace("|", "/")] for r in results])
    for r in results:
        if r.rows:
            out += ["", f"## {r.name}\n", *_table(r.header, r.rows)]
    failed = [r.name for r in results if r.passed is False]
    out += ["", f"**Overall: {'FAIL (' + ', '.join(failed) + ')' if failed else 'PASS'}**", ""]
    return "\n".join(out)


def machine_line() -> str:
    """GPU name, memory, torch / CUDA versions."""
    props = torch.cuda.get_device_properties(0)
    return (
        f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"Python {platform.python_version()}"
    )


# --------------------------------------------------------------------------- helpers
def _optimizer(model: nn.Module, **options: object):
    from cagrad_clip import ConflictAverseOptimizer

    return ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=1e-6), c=C, **options)  # type: ignore[arg-type]


def _low_memory_supported() -> bool:
    try:
        _optimizer(nn.Linear(1, 1), memory="low")
    except TypeError:
        return False
    return True


def _mlp(device: str) -> tuple[nn.Module, Callable[[], list[Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 3)).to(device)
    x, y = torch.randn(32, 64, device=device), torch.randn(32, 3, device=device)
    return model, lambda: list(((model(x) - y) ** 2).mean(0).unbind())


def _encoder(m: int, device: str) -> tuple[nn.Module, Callable[[], list[Tensor]]]:
    """The 4-layer TransformerEncoder (d_model 256) of the CPU memory benchmark, all parameters shared."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(256, nhead=4, dim_feedforward=1024, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False).to(device)
    x = torch.randn(16, 128, 256, device=device)
    targets = torch.randn(m, 16, 128, 256, device=device)

    def losses() -> list[Tensor]:
        out = model(x)
        return [((out - t) ** 2).mean() for t in targets]

    return model, losses


def cuda_median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median of ``repeats`` CUDA-event timings of ``fn`` (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# --------------------------------------------------------------------------- (a) no host sync
def check_sync() -> CheckResult:
    """A warmed-up step under ``set_sync_debug_mode("error")``; a plain step first as the control."""
    model, losses_fn = _mlp("cuda")
    base = torch.optim.SGD(model.parameters(), lr=1e-6)
    opt = _optimizer(model, nonfinite="ignore")

    def plain() -> None:
        base.zero_grad()
        sum(losses_fn()).backward()
        base.step()

    def ours() -> None:
        opt.zero_grad()
        opt.step(losses_fn())

    rows = []
    for name, fn in (("plain step (control)", plain), ("ours: opt.zero_grad(); opt.step(losses)", ours)):
        for _ in range(3):  # warm-up: device-side caches (weights, the solver's face index)
            fn()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            rows.append([name, "no sync"])
        except RuntimeError as error:
            rows.append([name, f"SYNC: {str(error).splitlines()[0][:120]}"])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    control_ok, ours_ok = rows[0][1] == "no sync", rows[1][1] == "no sync"
    if not control_ok:
        return CheckResult("a. no host sync in the step", None, "inconclusive: the plain step itself syncs", ["step", "result"], rows)
    return CheckResult("a. no host sync in the step", ours_ok, "nonfinite='ignore', after 3 warm-up steps", ["step", "result"], rows)


# --------------------------------------------------------------------------- (b) CUDA graph
def _graph_of_combine() -> tuple[float, str]:
    """Capture ``opt.combine()`` on accumulated gradients, replay once, compare with eager; max relative error."""
    model, losses_fn = _mlp("cuda")
    opt = _optimizer(model, nonfinite="ignore")
    params = list(model.parameters())
    for _ in range(3):  # warm-up, eager
        opt.zero_grad()
        opt.step(losses_fn())
    opt.zero_grad()
    opt.backward(losses_fn(), combine=True)
    eager = [p.grad.detach().clone() for p in params]
    opt.zero_grad()
    opt.backward(losses_fn(), combine=False)  # the same gradients again (same inputs, same weights)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.combine()
    graph.replay()
    torch.cuda.synchronize()
    replayed = [p.grad for p in params]
    return max(float((r - e).abs().max() / e.abs().max().clamp_min(1e-30)) for r, e in zip(replayed, eager)), "opt.combine()"


def _graph_of_solver() -> tuple[float, str]:
    """Capture ``solve_cagrad`` on a fixed Gram plus ``sum_i a_i g_i``; replay, compare with eager."""
    from cagrad_clip import solve_cagrad

    torch.manual_seed(0)
    G = torch.randn(4, 1 << 20, device="cuda")
    gram = G @ G.T
    weights = torch.full((4,), 0.25, device="cuda")

    def combine() -> Tensor:
        a = solve_cagrad(gram, weights, c=C, validate=False).coefficients
        return torch.mv(G.T, a)

    eager = combine()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            combine()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = combine()
    graph.replay()
    torch.cuda.synchronize()
    return float((out - eager).abs().max() / eager.abs().max()), "solve_cagrad on a fixed Gram + sum_i a_i g_i (combine() not capturable)"


def check_graph() -> CheckResult:
    """(b): the optimizer's combine if it can be captured, else the solver + combination."""
    rows = []
    try:
        error, what = _graph_of_combine()
    except Exception as exc:  # noqa: BLE001 - not capturable: say why, fall back to the solver
        rows.append(["opt.combine()", "not capturable", f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"])
        torch.cuda.synchronize()
        try:
            error, what = _graph_of_solver()
        except Exception as exc2:  # noqa: BLE001
            rows.append(["solve_cagrad + combination", "not capturable", f"{type(exc2).__name__}: {str(exc2).splitlines()[0][:100]}"])
            return CheckResult(
                "b. CUDA graph replay equals eager", False, "neither could be captured", ["captured", "result", "detail"], rows
            )
    ok = error <= 1e-5
    rows.append([what, "replay equals eager" if ok else "MISMATCH", f"max relative error {error:.1e}"])
    return CheckResult("b. CUDA graph replay equals eager", ok, f"captured: {what}", ["captured", "result", "detail"], rows)


# --------------------------------------------------------------------------- (c) memory
def _gpt2_case(m: int, layers: int, width: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    from benchmarks.speed.models import MemoryCase

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50257,
        n_positions=1024,
        n_embd=width,
        n_layer=layers,
        n_head=max(1, width // 64),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    with torch.device("cuda"):
        model = GPT2LMHeadModel(config).to(torch.bfloat16)
    model.train()
    ids = torch.randint(0, config.vocab_size, (4, 512), device="cuda")
    labels = torch.randint(0, config.vocab_size, (m, 4, 512), device="cuda")

    def losses() -> list[Tensor]:
        logits = model(input_ids=ids).logits
        return [nn.functional.cross_entropy(logits.flatten(0, 1), lab.flatten()) for lab in labels]

    return MemoryCase(model, losses)


def _step_peak(build: Callable[[], Callable[[], object]]) -> int:
    """Build, run one step, reset the peak, run the measured second step; ``max_memory_allocated``."""
    gc.collect()
    torch.cuda.empty_cache()
    step = build()
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del step
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def check_memory(layers: int, width: int, ms: list[int], slack: float) -> CheckResult:
    """(c): extra peak over plain training in parameter bytes, bf16 GPT-2."""
    from benchmarks.speed.memory import ours_low_step, ours_step, plain_step, raco_step
    from benchmarks.speed.models import param_bytes

    low = _low_memory_supported()
    rows, ok = [], True
    nbytes = numel = 0
    for m in ms:
        case = _gpt2_case(m, layers, width)
        nbytes, numel = param_bytes(case.model), sum(p.numel() for p in {id(p): p for p in case.model.parameters()}.values())
        del case
        plain = _step_peak(lambda: plain_step(_gpt2_case(m, layers, width)))
        variants: dict[str, Callable[[], Callable[[], object]]] = {"ours default": lambda: ours_step(_gpt2_case(m, layers, width))}
        if low:
            variants['ours memory="low"'] = lambda: ours_low_step(_gpt2_case(m, layers, width))
        variants["RACO recipe"] = lambda: raco_step(_gpt2_case(m, layers, width))
        cells = {}
        for name, build in variants.items():
            try:
                cells[name] = f"{(_step_peak(build) - plain) / nbytes:.2f}x"
            except torch.cuda.OutOfMemoryError:
                cells[name] = "out of memory"
            except Exception as exc:  # noqa: BLE001 - e.g. a mode refusing tied weights: reported in its cell
                cells[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
            gc.collect()
            torch.cuda.empty_cache()
        extra_default = float(cells["ours default"].rstrip("x")) if cells["ours default"].endswith("x") else float("inf")
        ok &= extra_default <= (m - 1) + slack
        rows.append(
            [
                str(m),
                f"{m - 1}x",
                cells["ours default"],
                cells.get('ours memory="low"', "n/a (not available in this build)"),
                cells["RACO recipe"],
                f"{plain / 2**30:.2f} GiB",
            ]
        )
    detail = (
        f"GPT-2 bf16, {numel / 1e6:.0f} M parameters ({nbytes / 2**30:.2f} GiB), batch 4 x 512 tokens; "
        f"pass: ours default <= (m - 1) + {slack}"
    )
    return CheckResult(
        "c. memory over plain training (parameter bytes)",
        ok,
        detail,
        ["m", "floor (m - 1)", "ours default", 'ours memory="low"', "RACO recipe", "plain peak"],
        rows,
    )


# --------------------------------------------------------------------------- (d) timings
def check_timing(ms: list[int], repeats: int) -> CheckResult:
    """(d): step times against the floor and TorchJD, and the solver against TorchJD's weighting (informational)."""
    from cagrad_clip import solve_cagrad

    try:
        from torchjd.aggregation import CAGrad, UPGrad
        from torchjd.aggregation._cagrad import CAGradWeighting
        from torchjd.autojac import backward as tjd_backward
        from torchjd.autojac import jac_to_grad

        CAGradWeighting(C)  # raises without cvxpy / clarabel
        have_tjd = True
    except Exception:  # noqa: BLE001 - the peer is optional
        have_tjd = False
    rows = []
    for m in ms:
        fns: dict[str, Callable[[], object]] = {}
        model, losses_fn = _encoder(m, "cuda")
        params = list(model.parameters())
        base = torch.optim.SGD(params, lr=1e-6)

        def floor(base=base, params=params, losses_fn=losses_fn) -> None:
            base.zero_grad()
            losses = losses_fn()
            grads: tuple = ()
            for i, loss in enumerate(losses):
                grads = torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1)
            for p, g in zip(params, grads):
                p.grad = g
            base.step()

        fns["floor"] = floor
        model2, losses2 = _encoder(m, "cuda")
        opt = _optimizer(model2, nonfinite="ignore")

        def ours(opt=opt, losses2=losses2) -> None:
            opt.zero_grad()
            opt.step(losses2())

        fns["ours"] = ours
        if have_tjd:
            for agg_name, agg in (("TorchJD CAGrad", CAGrad(C)), ("TorchJD UPGrad", UPGrad())):
                model3, losses3 = _encoder(m, "cuda")
                params3 = list(model3.parameters())
                base3 = torch.optim.SGD(params3, lr=1e-6)

                def tjd(base3=base3, params3=params3, losses3=losses3, agg=agg) -> None:
                    base3.zero_grad()
                    tjd_backward(losses3(), inputs=params3)
                    jac_to_grad(params3, agg)
                    base3.step()

                fns[agg_name] = tjd
        times = {}
        for name, fn in fns.items():
            try:
                times[name] = cuda_median_ms(fn, repeats)
            except Exception as exc:  # noqa: BLE001 - a failing peer is reported
                times[name] = float("nan")
                print(f"timing {name} m={m} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        G = torch.randn(m, 4096, device="cuda")
        gram = G @ G.T
        solver = {"ours solve_cagrad": lambda: solve_cagrad(gram, c=C, validate=False).coefficients}
        if have_tjd:
            weighting = CAGradWeighting(C)
            solver["TorchJD CAGradWeighting"] = lambda: weighting(gram)
        solver_times = {}
        for name, fn in solver.items():
            try:
                solver_times[name] = cuda_median_ms(fn, repeats)
            except Exception as exc:  # noqa: BLE001 - a failing peer is reported
                solver_times[name] = float("nan")
                print(f"timing {name} m={m} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        fl = times["floor"]
        rows.append(
            [
                str(m),
                f"{fl:.2f}",
                f"{times['ours']:.2f} ({times['ours'] / fl:.2f}x)",
                *(f"{times[k]:.2f} ({times[k] / fl:.2f}x)" if k in times else "n/a" for k in ("TorchJD CAGrad", "TorchJD UPGrad")),
                f"{solver_times['ours solve_cagrad']:.3f}",
                f"{solver_times['TorchJD CAGradWeighting']:.3f}" if have_tjd else "n/a",
            ]
        )
        del fns, model, model2, opt
        gc.collect()
        torch.cuda.empty_cache()
    return CheckResult(
        "d. step and solver time (ms, median of CUDA-event timings)",
        None,
        f"4-layer TransformerEncoder (d_model 256), fp32, batch 16 x 128; {repeats} repeats"
        + ("" if have_tjd else "; TorchJD not installed"),
        ["m", "floor ms", "ours ms (/ floor)", "TorchJD CAGrad ms", "TorchJD UPGrad ms", "solver ours ms", "solver TorchJD ms"],
        rows,
    )


def _run(name: str, fn: Callable[[], CheckResult]) -> CheckResult:
    """Run one check; an unexpected exception is a failed check, not a crash of the script."""
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        result = CheckResult(name, False, f"crashed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
    print(f"{result.name}: {result.passed} ({time.perf_counter() - t0:.1f} s) {result.detail}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the checks; 0 if none failed (or no CUDA device), 1 otherwise."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    results = []
    if "sync" in args.checks:
        results.append(_run("a. no host sync in the step", check_sync))
    if "graph" in args.checks:
        results.append(_run("b. CUDA graph replay equals eager", check_graph))
    if "memory" in args.checks:
        results.append(
            _run(
                "c. memory over plain training", lambda: check_memory(args.gpt2_layers, args.gpt2_width, args.memory_ms, args.memory_slack)
            )
        )
    if "timing" in args.checks:
        results.append(_run("d. step and solver time", lambda: check_timing(args.timing_ms, args.repeats)))
    command = " ".join(["python -m benchmarks.gpu_check", *(sys.argv[1:] if argv is None else argv)])
    text = render(results, machine_line(), command)
    path = report_path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    print(f"wrote {path}")
    return 1 if any(r.passed is False for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
