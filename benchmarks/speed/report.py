"""Markdown for ``results/speed/speed.md``: one renderer per section, and the memory projection."""

from __future__ import annotations

import math

from .memory import VARIANTS as MEMORY_VARIANTS
from .step import TARGETS

#: Model sizes of the bf16 projection (parameters).
PROJECTION_SIZES = {"1 B": 1e9, "4 B": 4e9, "8 B": 8e9}


def _cell(value: float | str, fmt: str = "{:.2f}x") -> str:
    return fmt.format(value) if isinstance(value, float) else value


def render_solver(rows: list[dict]) -> list[str]:
    """Section 1: time per call and accuracy of every solver."""
    out = [
        "## Dual solver: time per call (ms, median) and accuracy\n",
        "Accuracy: `(F(p) - F_ref) / max_i H_ii`, median / max over the accuracy problems (F_ref: best of every "
        "method and the independent tight reference). `*` = peer timed on a sample of the batch in a Python loop "
        "and scaled to the batch.\n",
        "| m | batch | method | ms / call | vs TorchJD | accuracy median | accuracy max |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        tjd = next(
            (q["ms"] for q in rows if q["m"] == r["m"] and q["batch"] == r["batch"] and q["method"] == "TorchJD CAGrad"), float("nan")
        )
        speed = tjd / r["ms"] if r["ms"] == r["ms"] and r["ms"] > 0 else float("nan")
        star = "*" if r["extrapolated"] else ""
        out.append(
            f"| {r['m']} | {r['batch']} | {r['method']} | {r['ms']:.3f}{star} | {speed:.1f}x | {r['acc_median']:.1e} | {r['acc_max']:.1e} |"
        )
    return out + [""]


def render_step(rows: list[dict]) -> list[str]:
    """Section 2: step time of every variant and ours against the floor and the targets."""
    out = [
        "## Training step: median ms per iteration and ratio to the floor (b)\n",
        "(a) plain summed loss; (b) the floor: m `autograd.grad` passes + base step; (b2) the floor plus the float32 "
        "Gram and one combination of a contiguous (m, D) block, allocated once (the arithmetic of any conflict-averse "
        "step in its cheapest layout, without gather or solve: a bound); (c) ours, `opt.step(losses)`; "
        "(c0) ours without `combine()` (`opt.backward(losses, combine=False)` + base step); "
        "(d) TorchJD `backward`/`mtl_backward` + `jac_to_grad`. All variants of one (model, m) interleaved in one "
        "process, medians over the repeats.\n",
        "| model | m | variant | ms | / floor |",
        "|---|---:|---|---:|---:|",
    ]
    for r in rows:
        out.append(f"| {r['model']} | {r['m']} | {r['variant']} | {r['ms']:.2f} | {r['ratio']:.3f} |")
    out += [
        "",
        "Ours against the floor and the issue's targets (`combine()` alone: Gram + solve + write-back, timed "
        "separately on freshly accumulated gradients; graph freed: the autograd graph is gone after the step):\n",
        "| model | m | floor ms | ours ms | ours / floor | target | met | bound (b2) / floor | combine() alone | combine(): ops "
        "| graph freed | combine(): top ops (self CPU) |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if r["variant"] != "(c) ours":
            continue
        fl = next(q for q in rows if q["model"] == r["model"] and q["m"] == r["m"] and q["variant"] == "(b) floor")
        bound = next((q["ratio"] for q in rows if q["model"] == r["model"] and q["m"] == r["m"] and q["variant"].startswith("(b2)")), None)
        target = TARGETS.get(r["model"])
        met = "" if target is None else ("yes" if r["ratio"] <= target else "**no**")
        out.append(
            f"| {r['model']} | {r['m']} | {fl['ms']:.2f} | {r['ms']:.2f} | {r['ratio']:.3f} | "
            f"{'' if target is None else f'<= {target:.2f}'} | {met} | {'n/a' if bound is None else f'{bound:.3f}'} | "
            f"{r['combine_ms']:.2f} ms "
            f"({100 * r['combine_ms'] / fl['ms']:.1f}%) | {r.get('combine_ops', 'n/a')} | {'yes' if r['graph_freed'] else 'NO'} | "
            + ", ".join(f"{name} {100 * share:.0f}%" for name, share in r.get("combine_top_ops", []))
            + " |"
        )
    return out + [""]


def render_memory(rows: list[dict], library: str) -> list[str]:
    """Section 3: extra peak over plain training in parameter bytes, and the bf16 projection."""
    out = [
        "## Memory: extra peak of a training step over plain training, in units of parameter bytes\n",
        f"Library measured: {library}.\n",
        "Metric: (peak CPU allocator bytes live during the second of two full training steps, "
        "`opt.zero_grad(); opt.step(losses)`) minus (the same for plain `sum(losses).backward(); base.step()` "
        "training of the same model), divided by the model's parameter bytes. Counted from before the model is "
        "built (parameters, `.grad`, activations, transients, state kept between steps). Base optimizer: SGD "
        "without momentum (no state on either side). Floor: m - 1 (all gradients but one alive at once; the "
        "last one can be `.grad`). A failed or unavailable method says so in its cell.\n",
    ]
    header = "| model | params | dtype | m | floor (m - 1) | " + " | ".join(MEMORY_VARIANTS) + " |"
    out += [header, "|---|---:|---|---:|---:|" + "---:|" * len(MEMORY_VARIANTS)]
    notes: dict[str, int] = {}

    def cell(value: float | str) -> str:
        if isinstance(value, float) or not value or value.startswith("n/a"):
            return _cell(value)
        return f"failed [{notes.setdefault(value, len(notes) + 1)}]"

    for r in rows:
        cells = " | ".join(cell(r["cells"].get(v, "")) for v in MEMORY_VARIANTS)
        out.append(f"| {r['model']} | {r['params'] / 1e6:.2f} M | {r['dtype']} | {r['m']} | {r['m'] - 1}x | {cells} |")
    out.append("")
    out += [f"[{k}] {v.removeprefix('failed: ')}" + "  " for v, k in notes.items()]
    if notes:
        out.append("")
    out += render_projection(rows)
    return out


def projection_fit(rows: list[dict]) -> tuple[str, dict[tuple[str, int], tuple[float, float]]]:
    """Per (variant, m): extra bytes = slope x parameter bytes + constant, from the bf16 encoder rows.

    With two encoder widths measured, the slope and the constant come from the smallest and the
    largest (a fixed-size transient, e.g. a float32 chunk of a few MiB, is the constant); with one,
    the slope is its ratio and the constant 0. Returns a description of the basis and the fits.
    """
    bf16 = [r for r in rows if r["dtype"] == "bfloat16" and r["model"].startswith("encoder")]
    fits: dict[tuple[str, int], tuple[float, float]] = {}
    sizes = sorted({(r["params"], r["model"]) for r in bf16})
    if not sizes:
        return "", fits
    small, large = sizes[0][1], sizes[-1][1]
    for r in (q for q in bf16 if q["model"] == small):
        other = next((q for q in bf16 if q["model"] == large and q["m"] == r["m"]), None)
        for v, e1 in r.get("extra_bytes", {}).items():
            e2 = other["extra_bytes"].get(v) if other is not None and small != large else None
            if e2 is None:
                fits[(v, r["m"])] = (e1 / r["param_bytes"], 0.0)
            else:
                slope = (e2 - e1) / (other["param_bytes"] - r["param_bytes"])
                fits[(v, r["m"])] = (slope, e1 - slope * r["param_bytes"])
    if small == large:
        basis = f"measured ratio of `{small}` (bf16) x parameters x 2 bytes"
    else:
        basis = (
            f"slope and constant through `{small}` and `{large}` (bf16): extra = slope x parameters x 2 bytes + constant; "
            "the slope is what a method costs per parameter byte, the constant its fixed-size transients"
        )
    return basis, fits


def render_projection(rows: list[dict]) -> list[str]:
    """Extra GB for 1 B, 4 B and 8 B bf16 parameters from :func:`projection_fit`."""
    basis, fits = projection_fit(rows)
    if not fits:
        return []
    ms = sorted({m for _, m in fits})
    out = [
        "### Projection to large bf16 models (arithmetic, not measured)\n",
        f"Extra GB (1 GB = 1e9 bytes) from the {basis}. Slopes per m: "
        + "; ".join(f"m = {m}: " + ", ".join(f"{v} {fits[(v, m)][0]:.2f}" for v in MEMORY_VARIANTS if (v, m) in fits) for m in ms)
        + ".\n",
        "| params | m | floor (m - 1) | " + " | ".join(MEMORY_VARIANTS) + " |",
        "|---:|---:|---:|" + "---:|" * len(MEMORY_VARIANTS),
    ]
    for label, n in PROJECTION_SIZES.items():
        for m in ms:
            cells = []
            for v in MEMORY_VARIANTS:
                fit = fits.get((v, m))
                cells.append("n/a" if fit is None else f"{(fit[0] * n * 2 + fit[1]) / 1e9:.1f} GB")
            out.append(f"| {label} | {m} | {(m - 1) * n * 2 / 1e9:.1f} GB | {' | '.join(cells)} |")
    return out + [""]


def render_levers(rows: list[dict]) -> list[str]:
    """Section 4: the Gram and write-back levers."""
    out = [
        f"## Levers inside the combination: float32 gradients of {rows[0]['numel']:,} entries per objective\n",
        "| m | variant | ms (median) | rel. error vs float64 |",
        "|---:|---|---:|---:|",
    ]
    for r in rows:
        err = "" if math.isnan(r["rel_error"]) else f"{r['rel_error']:.1e}"
        out.append(f"| {r['m']} | {r['variant']} | {r['ms']:.2f} | {err} |")
    return out + [""]


def render(command: str, header: str, library: str, solver: list[dict], step: list[dict], memory: list[dict], levers: list[dict]) -> str:
    """The whole report; sections without rows are left out."""
    out = [f"# Speed and memory at the floor\n\nCommand: `{command}`  \nMachine: {header}  \nLibrary: {library}\n"]
    if solver:
        out += render_solver(solver)
    if step:
        out += render_step(step)
    if memory:
        out += render_memory(memory, library)
    if levers:
        out += render_levers(levers)
    return "\n".join(out)
