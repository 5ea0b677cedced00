"""Multi-objective DPO on a causal LM with ``ConflictAverseOptimizer`` (RACO's use case).

Two objectives judged by code, in conflict:

* ``coverage``: the response mentions the prompt's required keywords (more is better);
* ``brevity``: the response is short (fewer words is better).

Preference pairs ``(y1, y2)`` are synthetic; for each objective ``i`` the judge gives a sign
``s_i = +1`` (y1 better), ``-1`` (y2 better) or ``0`` (tie). One forward pass of the policy per
pair serves every objective: ``Delta = beta * [(log pi(y1) - log ref(y1)) - (log pi(y2) - log ref(y2))]``
and ``L_i = -mean log sigmoid(s_i * Delta)`` (a tie gives no gradient). The reference model is
frozen. The optimizer takes both losses and follows RACO's clipped CAGrad direction
(``--method raco``), plain CAGrad with a weighted anchor (``cagrad``) or the weighted sum
(``weighted``, ``c = 0``), with AdamW and max-norm 1.0 clipping of the combined direction.

By default the model is a tiny GPT-2 built from a config in code (2 layers, a 40-word vocabulary)
and briefly fine-tuned on synthetic responses to serve as the reference, so everything runs on a
CPU in about a minute with no download. ``--model PATH`` loads a local pretrained checkpoint and
its tokenizer instead. ``--lora`` (needs ``peft``) trains LoRA adapters only; the reference is
then the same model with its adapters disabled.

At the end it samples responses from the trained policy and from the reference for held-out
prompts, judges them with the same code, and prints per-objective win rates (ties count half)::

    python examples/multi_objective_dpo.py --weights 0.8,0.2 --c 0.4 --method raco
    python examples/multi_objective_dpo.py --method weighted --out results/dpo_weighted.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import transformers
except ImportError as exc:  # pragma: no cover
    raise SystemExit("this example needs transformers: pip install 'cagrad-clip[examples]'") from exc

from cagrad_clip import ConflictAverseOptimizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the task's prompts and responses
from benchmarks.dpo.task import FILLER, KEYWORDS, generate, make_prompt, random_batch, tiny_gpt2  # noqa: E402
from benchmarks.dpo.task import random_response as _task_response  # noqa: E402

SPECIAL = ["<pad>", "<eos>", "write", "about", ":"]
OBJECTIVES = ("coverage", "brevity")


# --------------------------------------------------------------------------- the judge
def score(keywords: Sequence[str], response: str) -> tuple[float, float]:
    """(coverage, brevity) of a response: fraction of required keywords present; minus its word count."""
    words = response.split()
    coverage = sum(k in words for k in keywords) / len(keywords)
    return coverage, -float(len(words))


def preference_signs(keywords: Sequence[str], y1: str, y2: str) -> list[float]:
    """``s_i`` per objective: +1 if y1 wins, -1 if y2 wins, 0 on a tie."""
    a, b = score(keywords, y1), score(keywords, y2)
    return [float((x > y) - (x < y)) for x, y in zip(a, b)]


# ------------------------------------------------------------------- synthetic data
def random_response(rng: random.Random, keywords: Sequence[str]) -> str:
    """A response of 1-8 words; the longer it is, the likelier it covers the keywords (the conflict)."""
    return _task_response(rng, keywords, polite=False)


@dataclass
class Pair:
    keywords: list[str]
    prompt: str
    y1: str
    y2: str
    signs: list[float]


def make_pairs(n: int, rng: random.Random) -> list[Pair]:
    pairs = []
    for _ in range(n):
        keywords, prompt = make_prompt(rng)
        y1, y2 = random_response(rng, keywords), random_response(rng, keywords)
        pairs.append(Pair(keywords, prompt, y1, y2, preference_signs(keywords, y1, y2)))
    return pairs


# ------------------------------------------------------------ tokenizer and models
class WordTokenizer:
    """A whitespace tokenizer over the example's closed vocabulary (for the tiny in-code model)."""

    def __init__(self) -> None:
        self.vocab = SPECIAL + KEYWORDS + FILLER
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.pad_token_id, self.eos_token_id = 0, 1

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.ids[w] for w in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocab[i] for i in ids if i > 1)


class HFTokenizer:
    """Adapter for a pretrained tokenizer (``--model PATH``)."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([i for i in ids if i not in (self.eos_token_id, self.pad_token_id)], skip_special_tokens=True)


def tiny_model(tok: WordTokenizer, seed: int):
    return tiny_gpt2(tok, seed)


def batch_sequences(tok, prompts: Sequence[str], responses: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + response + eos``: (input_ids, attention_mask, response-token mask)."""
    rows, masks = [], []
    for p, r in zip(prompts, responses):
        p_ids, r_ids = tok.encode(p), tok.encode(r) + [tok.eos_token_id]
        rows.append(p_ids + r_ids)
        masks.append([0] * len(p_ids) + [1] * len(r_ids))
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    resp = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, (row, mask) in enumerate(zip(rows, masks)):
        ids[b, : len(row)] = torch.tensor(row)
        attn[b, : len(row)] = 1
        resp[b, : len(row)] = torch.tensor(mask, dtype=torch.bool)
    return ids, attn, resp


def sequence_logps(model, ids: torch.Tensor, attn: torch.Tensor, resp: torch.Tensor) -> torch.Tensor:
    """Sum of the response tokens' log-probabilities, one per row."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    logp = torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, 1:, None]).squeeze(-1)
    return (logp * resp[:, 1:]).sum(-1)


@torch.no_grad()
def sample(model, tok, prompts: Sequence[str], max_new_tokens: int, seed: int) -> list[str]:
    """Temperature-1 samples (left-padded prompts, so a pretrained tokenizer's ragged prompts work)."""
    torch.manual_seed(seed)
    rows = generate(model, [tok.encode(p) for p in prompts], tok.pad_token_id, tok.eos_token_id, max_new_tokens)
    return [tok.decode(row) for row in rows]


def supervised_warmup(model, tok, steps: int, batch: int, rng: random.Random, lr: float = 3e-3) -> None:
    """Teach the tiny model the response format (1-8 words, keywords sometimes) so it is a usable reference."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        ids, attn, resp = batch_sequences(tok, *random_batch(rng, batch, polite=False))
        loss = -(sequence_logps(model, ids, attn, resp).sum() / resp[:, 1:].sum())
        opt.zero_grad()
        loss.backward()
        opt.step()


# --------------------------------------------------------------------------- DPO
def dpo_losses(policy, reference_logps: torch.Tensor, tok, pairs: Sequence[Pair], beta: float) -> list[torch.Tensor]:
    """One policy forward over ``[y1; y2]`` for the batch, one DPO loss per objective (differing in sign)."""
    prompts = [p.prompt for p in pairs]
    ids, attn, resp = batch_sequences(tok, prompts + prompts, [p.y1 for p in pairs] + [p.y2 for p in pairs])
    logps = sequence_logps(policy, ids, attn, resp) - reference_logps
    n = len(pairs)
    delta = beta * (logps[:n] - logps[n:])  # (B,)
    signs = torch.tensor([p.signs for p in pairs], dtype=delta.dtype)  # (B, m)
    return [-F.logsigmoid(signs[:, i] * delta).mean() for i in range(signs.shape[1])]


@torch.no_grad()
def reference_logps_of(reference, tok, pairs: Sequence[Pair]) -> torch.Tensor:
    prompts = [p.prompt for p in pairs]
    ids, attn, resp = batch_sequences(tok, prompts + prompts, [p.y1 for p in pairs] + [p.y2 for p in pairs])
    return sequence_logps(reference, ids, attn, resp)


def win_rates(policy_texts: Sequence[str], reference_texts: Sequence[str], keywords: Sequence[Sequence[str]]) -> list[float]:
    wins = [0.0] * len(OBJECTIVES)
    for a, b, k in zip(policy_texts, reference_texts, keywords):
        for i, s in enumerate(preference_signs(k, a, b)):
            wins[i] += 1.0 if s > 0 else 0.5 if s == 0 else 0.0
    return [w / len(policy_texts) for w in wins]


def mean_scores(texts: Sequence[str], keywords: Sequence[Sequence[str]]) -> list[float]:
    scores = [score(k, t) for t, k in zip(texts, keywords)]
    return [sum(s[i] for s in scores) / len(scores) for i in range(len(OBJECTIVES))]


# --------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=["raco", "cagrad", "weighted"], default="raco")
    ap.add_argument("--weights", default="0.8,0.2", help="user weights for (coverage, brevity)")
    ap.add_argument("--c", type=float, default=0.4, help="trust-region radius (ignored by --method weighted)")
    ap.add_argument("--beta", type=float, default=0.2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32, help="preference pairs per step")
    ap.add_argument("--pairs", type=int, default=4096, help="size of the synthetic preference set")
    ap.add_argument("--warmup-steps", type=int, default=300, help="supervised warm-up of the tiny reference model")
    ap.add_argument("--eval-prompts", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--model", default=None, help="local pretrained checkpoint (directory) instead of the tiny model")
    ap.add_argument("--lora", action="store_true", help="train LoRA adapters only (needs peft)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (the tiny model gains nothing from more, and a busy machine loses a lot)"
    )
    ap.add_argument("--out", default=None, help="write the result table (markdown) to this file")
    return ap.parse_args(argv)


def build(args: argparse.Namespace, rng: random.Random):
    if args.model is None:
        tok = WordTokenizer()
        model = tiny_model(tok, args.seed)
        supervised_warmup(model, tok, args.warmup_steps, 64, rng)
    else:
        tok = HFTokenizer(transformers.AutoTokenizer.from_pretrained(args.model))
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model)
    model.eval()  # no dropout: the per-objective gradients of one forward must be consistent
    if args.lora:
        try:
            import peft
        except ImportError as exc:
            raise SystemExit("--lora needs peft: pip install peft") from exc
        targets = ["c_attn", "c_proj"] if args.model is None else "all-linear"
        policy = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))

        @contextlib.contextmanager
        def as_reference() -> Iterator[object]:
            with policy.disable_adapter():
                yield policy

        return tok, policy, as_reference
    reference = copy.deepcopy(model).requires_grad_(False)

    @contextlib.contextmanager
    def as_reference() -> Iterator[object]:
        yield reference

    return tok, model, as_reference


def run(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Train, evaluate, print (and optionally write) the table; returns the numbers."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, object]:
    weights = [float(x) for x in args.weights.split(",")]
    if len(weights) != len(OBJECTIVES):
        raise SystemExit(f"--weights needs {len(OBJECTIVES)} numbers for {OBJECTIVES}")
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    tok, policy, as_reference = build(args, rng)
    pairs = make_pairs(args.pairs, rng)

    trainable = [p for p in policy.parameters() if p.requires_grad]
    c = 0.0 if args.method == "weighted" else args.c
    opt = ConflictAverseOptimizer(
        torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0), weights=weights, c=c, clip=args.method != "cagrad"
    )
    for step in range(args.steps):
        batch = rng.sample(pairs, args.batch)
        with as_reference() as reference:
            ref = reference_logps_of(reference, tok, batch)
        losses = dpo_losses(policy, ref, tok, batch, args.beta)
        opt.zero_grad()
        opt.backward(losses)  # m backward passes; .grad now holds the combined direction
        torch.nn.utils.clip_grad_norm_(trainable, max_norm=1.0)
        opt.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            coef = ", ".join(f"{a:.3f}" for a in opt.last.coefficients.tolist())
            print(
                f"step {step:4d}  losses "
                + "  ".join(f"{n}={loss.item():.4f}" for n, loss in zip(OBJECTIVES, losses))
                + f"  coefficients [{coef}]",
                flush=True,
            )

    eval_rng = random.Random(args.seed + 1)
    prompts = [make_prompt(eval_rng) for _ in range(args.eval_prompts)]
    keywords, texts = [k for k, _ in prompts], [p for _, p in prompts]
    policy_out = sample(policy, tok, texts, args.max_new_tokens, seed=args.seed + 2)
    with as_reference() as reference:
        reference_out = sample(reference, tok, texts, args.max_new_tokens, seed=args.seed + 2)
    rates = win_rates(policy_out, reference_out, keywords)
    pol, ref = mean_scores(policy_out, keywords), mean_scores(reference_out, keywords)
    result = {
        "method": args.method,
        "weights": weights,
        "c": c,
        "win_rates": dict(zip(OBJECTIVES, rates)),
        "policy_means": dict(zip(OBJECTIVES, pol)),
        "reference_means": dict(zip(OBJECTIVES, ref)),
        "seconds": time.perf_counter() - t0,
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in policy.parameters()),
    }
    table = format_table([result])
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return result


def format_table(results: Sequence[dict[str, object]]) -> str:
    lines = [
        "| method | weights | c | win rate coverage | win rate brevity | keywords covered (policy / ref) | words (policy / ref) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        w, pm, rm = r["win_rates"], r["policy_means"], r["reference_means"]
        lines.append(
            f"| {r['method']} | {','.join(str(x) for x in r['weights'])} | {r['c']} | {w['coverage']:.3f} | "
            f"{w['brevity']:.3f} | {pm['coverage']:.3f} / {rm['coverage']:.3f} | {-pm['brevity']:.2f} / {-rm['brevity']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    run(sys.argv[1:])
