"""MultiObjectiveTrainerMixin on a plain transformers.Trainer against a hand-written loop."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cagrad_clip import ConflictAverseOptimizer  # noqa: E402
from cagrad_clip.integrations.hf import MultiObjectiveTrainerMixin  # noqa: E402
from tests.process_groups import fsdp2_missing, one_rank_group  # noqa: E402

from . import tiny  # noqa: E402

LR, WEIGHTS = 0.5, [0.8, 0.2]


def halves(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Next-token loss on the first and on the second half of each sequence (two conflicting objectives)."""
    logits = model(input_ids=input_ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
    half = nll.shape[1] // 2
    return [nll[:, :half].mean(), nll[:, half:].mean()]


class HalvesTrainer(MultiObjectiveTrainerMixin, transformers.Trainer):
    def objective_losses(self, model, inputs):
        return halves(model, inputs["input_ids"])  # "note" never reaches model.forward

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def rows(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(3, 20, (10,), generator=g), "note": torch.tensor(1.0)} for _ in range(n)]


def args(out, **kw):
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=2,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def test_accumulation_with_a_short_last_window_equals_the_hand_written_loop(tmp_path):
    tok = tiny.tokenizer()
    data = rows(5)  # micro-batches of 2, accumulation 2: windows (2 + 2) and (1)
    model = tiny.no_dropout_gpt2(tok)
    mine = copy.deepcopy(model)
    opt = ConflictAverseOptimizer(torch.optim.SGD(mine.parameters(), lr=LR), weights=WEIGHTS)
    for window in (data[:4], data[4:]):
        opt.zero_grad()
        opt.backward(halves(mine, torch.stack([r["input_ids"] for r in window])))
        torch.nn.utils.clip_grad_norm_(mine.parameters(), 1.0)
        opt.step()
    trainer = HalvesTrainer(
        model=model,
        args=args(tmp_path, gradient_accumulation_steps=2, num_train_epochs=1, logging_strategy="steps", logging_steps=1),
        train_dataset=data,
        objective_weights=WEIGHTS,
        objective_names=["head", "tail"],
    )
    trainer.train()
    assert trainer.state.global_step == 2
    diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), mine.parameters()))
    print(f"HF mixin: trainer vs hand-written loop, max parameter difference {diff:.2e}")
    assert diff < 1e-5
    logged = trainer.state.log_history[0]
    assert {"loss/head", "loss/tail", "coef/head", "coef/tail", "cos/head|tail"} <= set(logged)
    metrics = trainer.evaluate(rows(4))
    assert metrics["eval_loss"] == pytest.approx(0.8 * metrics["eval_loss/head"] + 0.2 * metrics["eval_loss/tail"], rel=1e-5)


def test_a_window_of_unequal_micro_batches_equals_one_step_on_all_its_examples(tmp_path):
    """Micro-batches of 2 and 1 examples in one accumulation window: each is weighted by its share of
    the window's examples (2/3, 1/3), so the update is one step on all 3 examples (no clipping)."""
    tok = tiny.tokenizer()
    data = rows(3)
    model = tiny.no_dropout_gpt2(tok)
    mine = copy.deepcopy(model)
    opt = ConflictAverseOptimizer(torch.optim.SGD(mine.parameters(), lr=LR), weights=WEIGHTS)
    opt.step(halves(mine, torch.stack([r["input_ids"] for r in data])))
    trainer = HalvesTrainer(
        model=model,
        args=args(tmp_path, gradient_accumulation_steps=2, num_train_epochs=1, max_grad_norm=0.0),
        train_dataset=data,
        objective_weights=WEIGHTS,
    )
    trainer.train()
    assert trainer.state.global_step == 1
    assert max((a - b).abs().max().item() for a, b in zip(model.parameters(), mine.parameters())) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(model.parameters(), tiny.no_dropout_gpt2(tok).parameters())) > 1e-2


def test_training_step_returns_the_weighted_loss_detached_from_the_graph(tmp_path):
    """What ``training_step`` returns is summed into the ``Trainer``'s running loss: it must not hold the
    graph. It is the ``w``-weighted loss of the micro-batch, scaled by its share of the window."""
    tok = tiny.tokenizer()
    data = rows(4)
    returned = []

    class Recording(HalvesTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            returned.append((loss, inputs["input_ids"].clone()))
            return loss

    trainer = Recording(
        model=tiny.no_dropout_gpt2(tok),
        args=args(tmp_path, gradient_accumulation_steps=2, num_train_epochs=1),
        train_dataset=data,
        objective_weights=WEIGHTS,
    )
    trainer.train()
    assert len(returned) == 2
    for k, (loss, _) in enumerate(returned):
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0
        assert not loss.requires_grad and loss.grad_fn is None, f"micro-batch {k}"
    # the first micro-batch ran before any step: its loss is the initial model's, halved (2 of 4 examples)
    with torch.no_grad():
        first = halves(tiny.no_dropout_gpt2(tok), returned[0][1])
    assert returned[0][0].item() == pytest.approx(0.5 * (WEIGHTS[0] * first[0].item() + WEIGHTS[1] * first[1].item()), rel=1e-6)


def test_a_missing_hook_or_optimizer_is_reported(tmp_path):
    tok = tiny.tokenizer()

    class NoHook(MultiObjectiveTrainerMixin, transformers.Trainer):
        pass

    with pytest.raises(NotImplementedError, match="objective_losses"):
        NoHook(model=tiny.no_dropout_gpt2(tok), args=args(tmp_path, max_steps=1), train_dataset=rows(2)).train()
    with pytest.raises(ValueError, match="objective_names"):
        HalvesTrainer(
            model=tiny.no_dropout_gpt2(tok), args=args(tmp_path), train_dataset=rows(2), objective_weights=[1, 1], objective_names=["a"]
        )


@pytest.mark.parametrize("how", ["argument", "kwargs"])
def test_the_users_nonfinite_policy_wins_and_a_nan_objective_is_handled_by_it(tmp_path, how):
    """``nonfinite=`` (or ``conflict_averse_kwargs["nonfinite"]``) reaches the optimizer instead of a
    duplicate keyword; with ``"raise"`` a NaN objective stops training before the parameters move."""
    tok = tiny.tokenizer()

    class NanTrainer(HalvesTrainer):
        def objective_losses(self, model, inputs):
            first, second = super().objective_losses(model, inputs)
            return [first, second * float("nan")]

    model = tiny.no_dropout_gpt2(tok)
    before = [p.detach().clone() for p in model.parameters()]
    options = {"nonfinite": "raise"} if how == "argument" else {}
    trainer = NanTrainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=rows(2), objective_weights=WEIGHTS, **options)
    if how == "kwargs":
        trainer.conflict_averse_kwargs["nonfinite"] = "raise"
    with pytest.raises(FloatingPointError, match="non-finite"):
        trainer.train()
    assert trainer.optimizer is not None
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="nonfinite"):
        HalvesTrainer(model=model, args=args(tmp_path), train_dataset=rows(2), nonfinite="sometimes")


class LabelledTrainer(MultiObjectiveTrainerMixin, transformers.Trainer):
    """Objectives that read dataset columns model.forward does not take (per-objective targets)."""

    def objective_losses(self, model, inputs):
        logits = model(input_ids=inputs["input_ids"]).logits[:, -1]
        return [
            torch.nn.functional.cross_entropy(logits, inputs["target_a"]),
            torch.nn.functional.cross_entropy(logits, inputs["target_b"]),
        ]

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def test_a_datasets_dataset_keeps_the_objective_columns_or_names_the_fix(tmp_path):
    """The Trainer's default remove_unused_columns=True drops the columns model.forward does not take:
    objective_columns= keeps them (the same steps as remove_unused_columns=False); without it the
    KeyError names both fixes."""
    datasets = pytest.importorskip("datasets")
    tok = tiny.tokenizer()
    g = torch.Generator().manual_seed(4)
    data = datasets.Dataset.from_dict(
        {
            "input_ids": torch.randint(3, 20, (6, 8), generator=g).tolist(),
            "target_a": torch.randint(3, 20, (6,), generator=g).tolist(),
            "target_b": torch.randint(3, 20, (6,), generator=g).tolist(),
            "source": ["web"] * 6,  # a column no one reads: still removed
        }
    )
    kept, plain, broken = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok)
    common = dict(max_steps=2, remove_unused_columns=True)
    LabelledTrainer(model=kept, args=args(tmp_path / "k", **common), train_dataset=data, objective_columns=["target_a", "target_b"]).train()
    reference = data.remove_columns(["source"])
    LabelledTrainer(model=plain, args=args(tmp_path / "p", max_steps=2), train_dataset=reference).train()
    assert max((a - b).abs().max().item() for a, b in zip(kept.parameters(), plain.parameters())) == 0.0
    assert max((a - b).abs().max().item() for a, b in zip(kept.parameters(), tiny.no_dropout_gpt2(tok).parameters())) > 1e-3
    trainer = LabelledTrainer(model=broken, args=args(tmp_path / "b", **common), train_dataset=data)
    with pytest.raises(
        KeyError, match=r"objective_losses read inputs\['target_a'\].*objective_columns=\['target_a', \.\.\.\].*remove_unused_columns=False"
    ):
        trainer.train()
    with pytest.raises(TypeError, match="objective_columns must be a list of column names"):
        LabelledTrainer(model=broken, args=args(tmp_path / "b"), train_dataset=data, objective_columns="target_a")


def test_deepspeed_is_refused_with_the_reason_and_the_fsdp2_alternative():
    from cagrad_clip.integrations.hf import check_no_deepspeed

    class Fake:
        is_deepspeed_enabled = True

    with pytest.raises(ValueError, match=r"DeepSpeed is not supported: its engine runs the backward pass.*FSDP2 instead"):
        check_no_deepspeed(Fake())
    Fake.is_deepspeed_enabled = False
    check_no_deepspeed(Fake())


@pytest.mark.skipif(fsdp2_missing() is not None, reason=fsdp2_missing() or "")
def test_a_model_sharded_by_hand_is_refused_when_the_trainers_fsdp_is_off():
    from types import SimpleNamespace

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from cagrad_clip.integrations.hf import check_sharding

    with one_rank_group():
        sharded = torch.nn.Module()
        sharded.w = torch.nn.Parameter(distribute_tensor(torch.zeros(2), init_device_mesh("cpu", (1,)), [Shard(0)]))
        plain = torch.nn.Linear(2, 2)
        two = SimpleNamespace(world_size=2)
        with pytest.raises(ValueError, match="FSDP2 shards .* the Trainer's FSDP is off: accelerate would wrap the model in DDP"):
            check_sharding(SimpleNamespace(args=two, model=sharded, is_fsdp_enabled=False))
        check_sharding(SimpleNamespace(args=two, model=sharded, is_fsdp_enabled=True))  # the Trainer shards: fine
        check_sharding(SimpleNamespace(args=two, model=plain, is_fsdp_enabled=False))
        check_sharding(SimpleNamespace(args=SimpleNamespace(world_size=1), model=sharded, is_fsdp_enabled=False))
