"""A tiny GPT-2 and a word-level tokenizer built in code (no download), and a small preference set."""

from __future__ import annotations

import random

import torch

from benchmarks.dpo.task import tiny_gpt2, word_tokenizer

WORDS = [
    "write",
    "about",
    ":",
    "alpha",
    "beta",
    "gamma",
    "delta",
    "please",
    "thanks",
    "the",
    "a",
    "is",
    "and",
    "of",
    "very",
    "good",
    "with",
    "it",
    "so",
    "then",
]


#: TRL's DPO metrics, which the multi-objective trainer logs under the same names
TRL_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
    "num_tokens",
)


class InOrder:
    """Mix into a Trainer: the examples in dataset order, so another loop can take the same batches."""

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def tokenizer():
    return word_tokenizer(WORDS)


def gpt2(tok, seed: int = 0, n_layer: int = 1):
    return tiny_gpt2(tok, seed, n_embd=32, n_layer=n_layer, n_head=2)


def preference_rows(n: int, m: int, seed: int = 0) -> list[dict]:
    """``n`` preference pairs with ``m`` random signs each (ties included)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.sample(["alpha", "beta", "gamma", "delta"], 2)
        prompt = f"write about {k[0]} {k[1]} : "

        def response() -> str:
            return " ".join(rng.choice(WORDS[3:]) for _ in range(rng.randint(1, 6)))

        signs = [rng.choice([1, 1, -1, -1, 0]) for _ in range(m)]
        rows.append({"prompt": prompt, "chosen": response(), "rejected": response(), "objective_signs": signs})
    return rows


def no_dropout_gpt2(tok, seed: int = 0, n_layer: int = 1):
    model = gpt2(tok, seed, n_layer)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


# ----------------------------------------------------------- the hand-written reference (independent of TRL)
def encode_pairs(tok, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``[prompt+chosen+eos ; prompt+rejected+eos]``: ids, attention mask, completion mask."""
    seqs, masks = [], []
    for key in ("chosen", "rejected"):
        for r in rows:
            p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
            c = tok(r[key], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seqs.append(p + c)
            masks.append([0] * len(p) + [1] * len(c))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    comp = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, mk) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        comp[i, : len(s)] = torch.tensor(mk)
    return ids, attn, comp


def sequence_logps(model, ids, attn, comp) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    logp = torch.gather(torch.log_softmax(logits, -1), 2, ids[:, 1:, None]).squeeze(-1)
    return (logp * comp[:, 1:]).sum(-1)


def hand_dpo_losses(policy, reference, tok, rows: list[dict], beta: float, signs_key: str = "objective_signs") -> list[torch.Tensor]:
    """``-mean log sigmoid(s_i beta Delta)`` per objective, written out by hand. ``reference`` is a model or a
    callable returning the reference log-probs of ``(ids, attn, comp)``."""
    ids, attn, comp = encode_pairs(tok, rows)
    logps = sequence_logps(policy, ids, attn, comp)
    with torch.no_grad():
        ref = reference(ids, attn, comp) if not isinstance(reference, torch.nn.Module) else sequence_logps(reference, ids, attn, comp)
    n = len(rows)
    ratio = logps - ref
    delta = ratio[:n] - ratio[n:]
    signs = torch.tensor([r[signs_key] for r in rows], dtype=delta.dtype)
    return [-torch.nn.functional.logsigmoid(signs[:, i] * beta * delta).mean() for i in range(signs.shape[1])]
