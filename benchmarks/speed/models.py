"""The models the step and memory sections train, built in code (no downloads).

Step section (float32): ``mlp-512`` / ``mlp-2048`` (3 hidden layers, every parameter shared) and
``transformer`` (2-layer ``TransformerEncoder``, d_model 128, shared, one linear head per objective).

Memory section: ``encoder`` (the issue's 4-layer ``TransformerEncoder``, d_model 256, 4 heads,
feed-forward 1024: D = 3,159,040; ``encoder-<d_model>`` the same at another width, e.g.
``encoder-512``: D = 12.6 M, which the projection uses as a second size) and ``gpt2`` (a 2-layer GPT-2 from ``transformers``, built from a
config with a 1024-token vocabulary; input and output embeddings tied, as GPT-2's default). In both,
every parameter is shared and objective ``i`` is the same forward pass scored against its own target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

#: Rows per MLP training step (``--mlp-batch`` changes it).
MLP_BATCH = 64
#: (sequences, tokens) per memory-section step (``--memory-batch`` changes it). Small on purpose: the
#: activations stay well below the parameters, so the ratio measures the gradient storage.
MEMORY_BATCH = (4, 32)
STEP_MODELS = ("mlp-512", "mlp-2048", "transformer")
MEMORY_MODELS = ("encoder", "gpt2", "encoder-512")


class MLP(nn.Module):
    """3 hidden layers of ``width``; one shared output layer with an output per objective."""

    def __init__(self, width: int, m: int, d_in: int = 256) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()
        )
        self.out = nn.Linear(width, m)

    def losses(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        """One mean squared error per objective, and the shared features."""
        feats = self.trunk(x)
        pred = self.out(feats)
        return list(((pred - y) ** 2).mean(0).unbind()), feats


class Transformer(nn.Module):
    """A small TransformerEncoder trunk (shared) with one linear head per objective (task-specific)."""

    def __init__(self, m: int, d_model: int = 128) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=256, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.heads = nn.ModuleList(nn.Linear(d_model, 1) for _ in range(m))

    def losses(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        """One mean squared error per head, and the shared features."""
        feats = self.encoder(x).mean(1)
        return [((head(feats).squeeze(-1) - y[:, i]) ** 2).mean() for i, head in enumerate(self.heads)], feats


@dataclass
class StepCase:
    """A step-section model with its batch and its shared / task-specific parameters."""

    model: nn.Module
    x: Tensor
    y: Tensor
    shared: list[nn.Parameter]
    heads: list[list[nn.Parameter]] | None


def make_step_case(kind: str, m: int, seed: int = 0) -> StepCase:
    """``mlp-<width>`` or ``transformer`` for ``m`` objectives, seeded."""
    torch.manual_seed(seed)
    if kind.startswith("mlp-"):
        model = MLP(int(kind.split("-")[1]), m)
        return StepCase(model, torch.randn(MLP_BATCH, 256), torch.randn(MLP_BATCH, m), list(model.parameters()), None)
    if kind == "transformer":
        tmodel = Transformer(m)
        return StepCase(
            tmodel,
            torch.randn(16, 32, 128),
            torch.randn(16, m),
            list(tmodel.encoder.parameters()),
            [list(h.parameters()) for h in tmodel.heads],
        )
    raise ValueError(f"unknown step model {kind!r}; choose mlp-<width> or transformer")


@dataclass
class MemoryCase:
    """A memory-section model and a closure computing its ``m`` losses (one forward pass)."""

    model: nn.Module
    losses: Callable[[], list[Tensor]]


def make_memory_case(kind: str, m: int, dtype: torch.dtype, seed: int = 0) -> MemoryCase:
    """``encoder``, ``encoder-<d_model>`` or ``gpt2`` in ``dtype`` with its inputs (:data:`MEMORY_BATCH`) and ``m`` targets, seeded."""
    torch.manual_seed(seed)
    batch, tokens = MEMORY_BATCH
    if kind == "encoder" or kind.startswith("encoder-"):
        width = 256 if kind == "encoder" else int(kind.split("-")[1])
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width, dropout=0.0, batch_first=True)
        model: nn.Module = nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False).to(dtype)
        x = torch.randn(batch, tokens, width, dtype=dtype)
        targets = torch.randn(m, batch, tokens, width, dtype=dtype)

        def losses() -> list[Tensor]:
            out = model(x)
            return [((out - t) ** 2).mean() for t in targets]

        return MemoryCase(model, losses)
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=1024,
            n_positions=max(64, tokens),
            n_embd=256,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
        )
        gpt = GPT2LMHeadModel(config).to(dtype)
        gpt.train()
        ids = torch.randint(0, config.vocab_size, (batch, tokens))
        labels = torch.randint(0, config.vocab_size, (m, batch, tokens))

        def losses() -> list[Tensor]:
            logits = gpt(input_ids=ids).logits.float()
            return [nn.functional.cross_entropy(logits.flatten(0, 1), lab.flatten()) for lab in labels]

        return MemoryCase(gpt, losses)
    raise ValueError(f"unknown memory model {kind!r}; choose from {MEMORY_MODELS}")


def param_bytes(model: nn.Module) -> int:
    """Bytes of the model's distinct parameters (tied weights counted once)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
