"""Memory and time of the low-memory routes against the default path (the table of ``docs/low_memory.md``).

    python -m benchmarks.low_memory            # --models encoder gpt2 gpt2-tied --dtypes float32 bfloat16 --repeats 7

The models are built in code (no download): a ``nn.TransformerEncoder`` trunk with one head per
objective, and a GPT-2 from a config (``transformers``); ``tests/test_low_memory.py`` uses the same
builders at a smaller size.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Callable, Sequence

import torch
import transformers
from torch import Tensor, nn

from cagrad_clip._low_memory import AutogramEngine, low_memory_backward
from cagrad_clip._settings import CAGradSettings

__all__ = ["EncoderModel", "encoder_case", "gpt2_case", "main", "measure"]


class EncoderModel(nn.Module):
    """A 4-layer ``nn.TransformerEncoder`` trunk (shared) and one linear head per objective."""

    def __init__(self, m: int, d_model: int = 32, ff: int = 64, layers: int = 4) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.heads = nn.ModuleList(nn.Linear(d_model, 1) for _ in range(m))
        self.unused = nn.Linear(3, 3)  # reached by no objective: must keep .grad = None

    def losses(self, x: Tensor, y: Tensor) -> list[Tensor]:
        feats = self.encoder(x).mean(1)
        return [((head(feats).squeeze(-1) - y[:, i]) ** 2).mean() for i, head in enumerate(self.heads)]


def encoder_case(m: int, dtype: torch.dtype = torch.float32, seed: int = 0, batch: int = 8, seq: int = 6, **sizes: int):
    torch.manual_seed(seed)
    model = EncoderModel(m, **sizes).to(dtype)
    d_model = model.heads[0].in_features
    x, y = torch.randn(batch, seq, d_model, dtype=dtype), torch.randn(batch, m, dtype=dtype)
    return model, (lambda: model.losses(x, y))


def gpt2_case(m: int, tie: bool, dtype: torch.dtype = torch.float32, seed: int = 0, vocab: int = 64, n_embd: int = 32,
              n_layer: int = 2, batch: int = 4, seq: int = 8, attn: str = "eager"):  # fmt: skip
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=max(seq, 16), n_embd=n_embd, n_layer=n_layer, n_head=4, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    config._attn_implementation = attn
    model = transformers.GPT2LMHeadModel(config).to(dtype)
    ids = torch.randint(0, vocab, (batch, seq))
    targets = [torch.randint(0, vocab, (batch * seq,)) for _ in range(m)]

    def losses() -> list[Tensor]:
        logits = model(ids).logits.reshape(-1, vocab)
        return [nn.functional.cross_entropy(logits, t) for t in targets]

    return model, losses


def _peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of (bytes allocated - bytes freed) by the CPU allocator while ``fn`` runs (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def measure(model_name: str, dtype: torch.dtype, m: int, repeats: int = 5) -> list[dict]:
    """Peak step memory (in parameter bytes) and step time of each route on one model.

    The models are parameter-dominated, as in full fine-tuning of a large model with a small
    micro-batch: the 4-layer encoder (d_model 512, 12.6 M parameters) on 4 x 16 tokens, the 4-layer
    GPT-2 (n_embd 512, vocab 8192, 21 M parameters untied, 16.8 M tied) on 2 x 32 tokens.

    A step is zero_grad, forward and the gradient work until ``.grad`` holds the direction (the
    base optimizer's step is not included). Memory counts what the step allocates beyond the
    parameters and inputs (the peak of the CPU allocator's live bytes, torch profiler); time is
    the process CPU time (one intra-op thread), fastest of ``repeats`` interleaved rounds, relative
    to the default path (``ConflictAverseOptimizer``:
    m ``autograd.grad`` passes into a stored (m, D) buffer).
    """
    from cagrad_clip import ConflictAverseOptimizer

    def build():
        if model_name == "encoder":
            model, losses = encoder_case(m, dtype, batch=4, seq=16, d_model=512, ff=2048)
            return model, losses, list(model.encoder.parameters()), lambda: AutogramEngine(model.encoder)
        tie = model_name == "gpt2-tied"
        model, losses = gpt2_case(m, tie=tie, dtype=dtype, vocab=8192, n_embd=512, n_layer=4, batch=2, seq=32)
        return model, losses, list(model.parameters()), lambda: AutogramEngine(model)

    settings = CAGradSettings()
    variants = ["plain sum backward", "default (m passes, stored)"] + (["hooks"] if m <= 2 else [])
    if model_name != "gpt2-tied":  # autogram refuses tied embeddings
        variants.append("autogram")
    steps, info = {}, {}
    for variant in variants:  # each on its own copy of the model (same seed, same data)
        model, losses, shared, make_engine = build()
        trainable = [p for p in model.parameters() if p.requires_grad]
        ids = {id(p) for p in shared}
        params = shared + [p for p in trainable if id(p) not in ids]
        engine = make_engine() if variant == "autogram" else None

        opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.0), c=settings.c, shared=shared)

        def step(variant=variant, model=model, losses=losses, shared=shared, params=params, engine=engine, opt=opt, fresh=False):
            model.zero_grad(set_to_none=True)
            values = losses()
            if variant == "plain sum backward":
                torch.stack(values).sum().backward()
            elif variant.startswith("default"):  # timed with a persistent optimizer; profiled with a fresh one (its buffers count)
                if fresh:
                    opt = ConflictAverseOptimizer(torch.optim.SGD(params, lr=0.0), c=settings.c, shared=shared)
                opt.zero_grad()
                opt.backward(values)
            else:
                w = settings.weights_tensor(m)
                low_memory_backward(values, params, len(shared), w, settings, route=variant, engine=engine)  # type: ignore[arg-type]

        step()  # warm-up
        model.zero_grad(set_to_none=True)
        steps[variant] = step
        peak = _peak_bytes(lambda: step(fresh=True))
        info[variant] = (sum(p.numel() * p.element_size() for p in params), sum(p.numel() for p in params), peak)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(repeats):  # interleaved rounds: drifting load from other work hits every variant alike
        for variant in variants:
            start = time.process_time()  # CPU time of this process: robust to other work on the shared cores
            steps[variant]()
            times[variant].append(time.process_time() - start)
    rows = []
    for variant in variants:
        param_bytes, numel, peak = info[variant]
        rows.append({"model": model_name, "dtype": str(dtype).removeprefix("torch."), "m": m, "variant": variant,
                     "peak_P": peak / param_bytes, "time_s": min(times[variant]), "params_M": numel / 1e6})  # fmt: skip
    base = next(r for r in rows if r["variant"].startswith("default"))
    plain = next(r for r in rows if r["variant"].startswith("plain"))
    for r in rows:
        r["time_rel"] = r["time_s"] / base["time_s"]
        r["extra_P"] = r["peak_P"] - plain["peak_P"]
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["encoder", "gpt2", "gpt2-tied"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread, load average {load} at the start")
    print("| model | dtype | m | variant | peak memory of a step (P) | over plain (P) | CPU time, min of rounds (s) | time / default |")
    print("|---|---|---|---|---|---|---|---|")
    for model_name in args.models:
        for dtype_name in args.dtypes:
            for m in (2,) if model_name == "gpt2-tied" else (2, 3):  # no low-memory route for tied weights at m = 3
                for r in measure(model_name, getattr(torch, dtype_name), m, args.repeats):
                    print(f"| {r['model']} ({r['params_M']:.2f} M) | {r['dtype']} | {r['m']} | {r['variant']} | {r['peak_P']:.2f} | "
                          f"{r['extra_P']:+.2f} | {r['time_s']:.3f} | {r['time_rel']:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
