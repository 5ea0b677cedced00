"""The miniature alignment task: prompts, a code judge, a word-level tokenizer and a tiny GPT-2 built in code.

A prompt asks to write about two keywords (``write about alpha beta :``). Three objectives, judged by
code on the response's words:

* ``coverage``: the fraction of the prompt's two keywords the response contains;
* ``brevity``: minus the number of words;
* ``politeness``: the number of distinct polite words (``please``, ``thanks``, ``kindly``) it contains.

Covering the keywords and being polite take words, so both conflict with brevity. The reference
policy is the tiny model after supervised training on random responses (1-8 words; the longer a
response, the likelier it holds keywords and polite words). Preference pairs are two samples of the
reference for one prompt, with one sign per objective from the judge (+1: ``chosen`` better for that
objective, -1: ``rejected`` better, 0: tie), the way the RACO authors' data labels one pair per objective.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F

KEYWORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
POLITE = ["please", "thanks", "kindly"]
FILLER = [
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
    "we",
    "all",
    "now",
    "more",
    "here",
    "there",
    "also",
    "just",
    "only",
    "some",
    "each",
    "much",
    "well",
    "too",
    "but",
    "yet",
]
SPECIAL = ["<pad>", "<eos>", "<unk>", "write", "about", ":"]
OBJECTIVES = ("coverage", "brevity", "politeness")


# --------------------------------------------------------------------------- the judge
def score(keywords: Sequence[str], response: str, m: int) -> tuple[float, ...]:
    """The first ``m`` of (coverage, brevity, politeness) of a response."""
    words = response.split()
    coverage = sum(k in words for k in keywords) / len(keywords)
    politeness = float(sum(p in words for p in POLITE))
    return (coverage, -float(len(words)), politeness)[:m]


def signs(keywords: Sequence[str], chosen: str, rejected: str, m: int) -> list[int]:
    """Per objective: +1 if ``chosen`` scores higher, -1 if ``rejected`` does, 0 on a tie."""
    a, b = score(keywords, chosen, m), score(keywords, rejected, m)
    return [int((x > y) - (x < y)) for x, y in zip(a, b)]


# --------------------------------------------------------------------------- data
def make_prompt(rng: random.Random) -> tuple[list[str], str]:
    keywords = rng.sample(KEYWORDS, 2)
    return keywords, f"write about {keywords[0]} {keywords[1]} : "


def random_response(rng: random.Random, keywords: Sequence[str], polite: bool = True) -> str:
    """1-8 words; the longer, the likelier it holds the keywords and (``polite``) a polite word (the conflict)."""
    n = rng.randint(1, 8)
    words = [rng.choice(FILLER) for _ in range(n)]
    for k in keywords:
        if rng.random() < n / 9:
            words[rng.randrange(n)] = k
    if polite and rng.random() < n / 12:
        words[rng.randrange(n)] = rng.choice(POLITE)
    return " ".join(words)


def random_batch(rng: random.Random, batch: int, polite: bool = True) -> tuple[list[str], list[str]]:
    """``batch`` prompts and a random response to each (the supervised data of the reference)."""
    prompts, responses = [], []
    for _ in range(batch):
        keywords, prompt = make_prompt(rng)
        prompts.append(prompt)
        responses.append(random_response(rng, keywords, polite))
    return prompts, responses


def word_tokenizer(words: Sequence[str]):
    """A whitespace word-level ``PreTrainedTokenizerFast`` over ``<pad>``, ``<eos>``, ``<unk>`` and ``words``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tokenizer():
    """The task's tokenizer: its closed vocabulary, word by word."""
    return word_tokenizer(SPECIAL[3:] + KEYWORDS + POLITE + FILLER)


def tiny_gpt2(tok, seed: int, n_embd: int = 64, n_layer: int = 2, n_head: int = 4):
    """A GPT-2 over ``tok``'s vocabulary (``len(tok)``), no dropout (so the objectives' gradients of one
    forward agree); by default 2 layers, width 64, 4 heads."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=len(tok),
        n_positions=32,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return transformers.GPT2LMHeadModel(config)


def _batch(tok, prompts: Sequence[str], responses: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, masks = [], []
    for p, r in zip(prompts, responses):
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        r_ids = tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(p_ids + r_ids)
        masks.append([0] * len(p_ids) + [1] * len(r_ids))
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    resp = torch.zeros((len(rows), width))
    for b, (row, mask) in enumerate(zip(rows, masks)):
        ids[b, : len(row)] = torch.tensor(row)
        attn[b, : len(row)] = 1
        resp[b, : len(row)] = torch.tensor(mask, dtype=torch.float)
    return ids, attn, resp


def supervised_reference(tok, seed: int, steps: int, batch: int = 64, lr: float = 3e-3):
    """The reference policy: the tiny model taught the response format on random responses."""
    rng = random.Random(seed)
    model = tiny_gpt2(tok, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        ids, attn, resp = _batch(tok, *random_batch(rng, batch))
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (nll * resp[:, 1:]).sum() / resp[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def generate(model, encoded: Sequence[Sequence[int]], pad_id: int, eos_id: int, max_new_tokens: int) -> list[list[int]]:
    """Temperature-1 continuations of left-padded token ids, each cut at its first ``eos_id``."""
    width = max(map(len, encoded))
    ids = torch.tensor([[pad_id] * (width - len(e)) + list(e) for e in encoded])
    attn = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    out = model.generate(
        input_ids=ids,
        attention_mask=attn,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(eos_id)] if eos_id in row else row)
    return rows


@torch.no_grad()
def sample(model, tok, prompts: Sequence[str], seed: int, max_new_tokens: int = 12, batch: int = 256) -> list[str]:
    """Temperature-1 samples (left-padded prompts), decoded up to the first ``<eos>``."""
    torch.manual_seed(seed)
    out_texts: list[str] = []
    model.eval()
    for start in range(0, len(prompts), batch):
        enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts[start : start + batch]]
        for row in generate(model, enc, tok.pad_token_id, tok.eos_token_id, max_new_tokens):
            out_texts.append(" ".join(tok.convert_ids_to_tokens([i for i in row if i != tok.pad_token_id])))
    return out_texts


def preference_rows(reference, tok, n: int, m: int, seed: int) -> list[dict]:
    """``n`` pairs of reference samples with per-objective signs (pairs tied on every objective dropped)."""
    rng = random.Random(seed)
    prompts = [make_prompt(rng) for _ in range(n)]
    texts = [p for _, p in prompts]
    a = sample(reference, tok, texts, seed=seed + 101)
    b = sample(reference, tok, texts, seed=seed + 202)
    rows = []
    for (keywords, prompt), y1, y2 in zip(prompts, a, b):
        s = signs(keywords, y1, y2, m)
        if any(s) and y1 and y2:
            rows.append({"prompt": prompt, "chosen": y1, "rejected": y2, "objective_signs": s})
    return rows


def thin_signal(rows: list[dict], objective: int, keep: float, seed: int) -> list[dict]:
    """The rare-signal variant: objective ``objective``'s sign becomes a tie (0) in all but a ``keep``
    fraction of the pairs (seeded), and pairs then tied on every objective are dropped, as always.
    Ties dilute that objective's mean loss, so its gradient is about ``keep`` times shorter."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        signs = list(row["objective_signs"])
        if rng.random() >= keep:
            signs[objective] = 0
        if any(signs):
            out.append({**row, "objective_signs": signs})
    return out


def win_rates(policy: Sequence[str], reference: Sequence[str], keywords: Sequence[Sequence[str]], m: int) -> list[float]:
    """Per objective, the fraction of prompts where the policy's response beats the reference's (ties: half)."""
    wins = [0.0] * m
    for a, b, k in zip(policy, reference, keywords):
        for i, s in enumerate(signs(k, a, b, m)):
            wins[i] += 1.0 if s > 0 else 0.5 if s == 0 else 0.0
    return [w / len(policy) for w in wins]


def mean_scores(texts: Sequence[str], keywords: Sequence[Sequence[str]], m: int) -> list[float]:
    scores = [score(k, t, m) for t, k in zip(texts, keywords)]
    return [sum(s[i] for s in scores) / len(scores) for i in range(m)]
