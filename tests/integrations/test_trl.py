"""MultiObjectiveDPOTrainer against a hand-written loop with ConflictAverseOptimizer (tiny GPT-2, no download)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl")
import transformers  # noqa: E402 - after the skip: an optional dependency

datasets = pytest.importorskip("datasets")

from cagrad_clip import ConflictAverseOptimizer  # noqa: E402
from cagrad_clip.integrations import find_conflict_averse  # noqa: E402
from cagrad_clip.integrations.trl import MultiObjectiveDPOConfig, MultiObjectiveDPOTrainer  # noqa: E402

from . import tiny  # noqa: E402

BETA, LR = 0.5, 1.0  # SGD: the step is linear in the direction (Adam's first step, lr * sign(g), would amplify
# rounding-level differences of near-zero gradient entries to 2 lr)
WEIGHTS = {2: [0.7, 0.3], 3: [0.5, 0.3, 0.2]}
TOL = 1e-5


class SequentialDPOTrainer(tiny.InOrder, MultiObjectiveDPOTrainer):
    """The examples in dataset order, so a hand-written loop can take the same batches."""


@pytest.fixture(scope="module")
def tok():
    return tiny.tokenizer()


def config(out, m: int = 2, **kw) -> MultiObjectiveDPOConfig:
    base = dict(
        output_dir=str(out),
        objective_weights=WEIGHTS[m],
        c=0.4,
        beta=BETA,
        learning_rate=LR,
        lr_scheduler_type="constant",
        per_device_train_batch_size=4,
        max_grad_norm=1.0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        optim="sgd",
        bf16=False,  # TRL: bf16 by default
    )
    base.update(kw)
    return MultiObjectiveDPOConfig(**base)


def hand_loop(model, ref, tok, windows, m, *, clip=True, c=0.4, max_norm=1.0, optimizer="sgd", reference=None):
    """Independent reference: per window of rows, hand-written DPO losses, one ConflictAverseOptimizer step."""
    params = [p for p in model.parameters() if p.requires_grad]
    base = torch.optim.AdamW(params, lr=LR, weight_decay=0.0) if optimizer == "adamw" else torch.optim.SGD(params, lr=LR)
    opt = ConflictAverseOptimizer(base, weights=WEIGHTS[m], c=c, clip=clip)
    for rows in windows:
        opt.zero_grad()
        opt.backward(tiny.hand_dpo_losses(model, reference or ref, tok, rows, BETA))
        if max_norm:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
    return opt


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


def run_trainer(tok, rows, args, model, ref, trainer_cls=SequentialDPOTrainer, **kw):
    trainer = trainer_cls(model=model, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok, **kw)
    trainer.train()
    return trainer


@pytest.mark.parametrize("m", [2, 3])
def test_one_step_equals_hand_written_loop(tok, tmp_path, m):
    rows = tiny.preference_rows(8, m, seed=m)
    model, ref = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)
    mine = copy.deepcopy(model)
    hand_loop(mine, ref, tok, [rows], m)
    run_trainer(tok, rows, config(tmp_path, m, per_device_train_batch_size=8, max_steps=1), model, copy.deepcopy(ref))
    diff = max_diff(model, mine)
    print(f"m={m}: trainer vs hand-written loop, max parameter difference {diff:.2e}")
    assert diff < TOL
    assert max_diff(model, tiny.no_dropout_gpt2(tok)) > 1e-2  # it did train (the step is 1000 x TOL)


def test_accumulation_equals_one_batch_of_the_same_size_short_last_window_too(tok, tmp_path):
    # 10 pairs, micro-batches of 4, accumulation 2: windows (4+4) and a short last one (2).
    rows = tiny.preference_rows(10, 2, seed=5)
    model, ref = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)
    mine = copy.deepcopy(model)
    hand_loop(mine, ref, tok, [rows[:8], rows[8:]], 2)
    trainer = run_trainer(
        tok,
        rows,
        config(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=1),
        model,
        copy.deepcopy(ref),
    )
    assert trainer.state.global_step == 2
    diff = max_diff(model, mine)
    print(f"accumulation: trainer vs hand-written loop, max parameter difference {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize("variant", ["cagrad", "weighted"])
def test_settings_reach_the_optimizer(tok, tmp_path, variant):
    rows = tiny.preference_rows(8, 2, seed=3)
    model, ref = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)
    mine = copy.deepcopy(model)
    c, clip = (0.4, False) if variant == "cagrad" else (0.0, True)
    hand_loop(mine, ref, tok, [rows], 2, clip=clip, c=c)
    trainer = run_trainer(
        tok, rows, config(tmp_path, per_device_train_batch_size=8, max_steps=1, c=c, clip=clip), model, copy.deepcopy(ref)
    )
    assert max_diff(model, mine) < TOL
    if variant == "weighted":  # c = 0: the coefficients are w exactly
        torch.testing.assert_close(trainer.conflict_averse_optimizer.last.coefficients, torch.tensor(WEIGHTS[2]))


@pytest.mark.parametrize("reentrant", [None, True])
def test_precomputed_reference_and_gradient_checkpointing(tok, tmp_path, reentrant):
    rows = tiny.preference_rows(8, 2, seed=4)
    model, ref = tiny.no_dropout_gpt2(tok, n_layer=2), tiny.no_dropout_gpt2(tok, seed=1, n_layer=2)
    mine = copy.deepcopy(model)
    hand_loop(mine, ref, tok, [rows], 2)
    kwargs = None if reentrant is None else {"use_reentrant": True}
    args = config(
        tmp_path,
        per_device_train_batch_size=8,
        max_steps=1,
        precompute_ref_log_probs=True,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs=kwargs,
    )
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": bool(reentrant)}  # non-reentrant unless asked
    run_trainer(tok, rows, args, model, copy.deepcopy(ref))
    assert model.is_gradient_checkpointing
    assert max_diff(model, mine) < TOL


def test_lora_reference_is_the_model_with_its_adapter_disabled(tok, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import set_seed

    rows = tiny.preference_rows(8, 2, seed=6)
    base = tiny.no_dropout_gpt2(tok)
    # init_lora_weights=False: B is not zero, so the policy differs from the reference from the first step.
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"], init_lora_weights=False)
    set_seed(0)  # the trainer seeds with args.seed before it adds the adapter
    mine = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(lora))
    init = copy.deepcopy(mine)

    def reference(ids, attn, comp):
        with mine.disable_adapter():
            return tiny.sequence_logps(mine, ids, attn, comp)

    hand_loop(mine, None, tok, [rows, rows], 2, reference=reference)
    trainer = run_trainer(tok, rows, config(tmp_path, per_device_train_batch_size=8, max_steps=2), base, None, peft_config=lora)
    assert trainer.ref_model is None
    model = trainer.model
    diff = max_diff(model, mine)
    print(f"LoRA: trainer vs hand-written loop, max parameter difference {diff:.2e}")
    assert diff < TOL
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert max_diff(model, init) > 1e-2  # it trained


def test_fp16_loss_scaling_scales_every_objective(tok, tmp_path):
    """CPU has no fp16 AMP in accelerate: inject a GradScaler and check the step equals the unscaled one.
    With SGD a missing or doubled scale would change the step by the scale factor."""
    rows = tiny.preference_rows(8, 2, seed=7)
    model, ref = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)
    mine = copy.deepcopy(model)
    hand_loop(mine, ref, tok, [rows], 2, max_norm=0)
    args = config(tmp_path, per_device_train_batch_size=8, max_steps=1, max_grad_norm=0.0)
    opt = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=LR), weights=WEIGHTS[2], nonfinite="ignore")
    trainer = SequentialDPOTrainer(
        model=model,
        ref_model=copy.deepcopy(ref),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
        optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)),
    )
    trainer.accelerator.scaler = scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    trainer.train()
    assert scaler.get_scale() == 2.0**12  # no overflow, no skipped step
    assert max_diff(model, mine) < TOL
    hand_norm = hand_loop(tiny.no_dropout_gpt2(tok), ref, tok, [rows], 2, max_norm=0).last.anchor_norm.item()
    assert opt.last is not None  # the one step's combination saw the scaled gradients
    assert opt.last.anchor_norm.item() > 1000 * hand_norm


def test_bf16_runs_close_to_fp32(tok, tmp_path):
    rows = tiny.preference_rows(8, 2, seed=8)
    model, ref = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)
    mine = copy.deepcopy(model)
    hand_loop(mine, ref, tok, [rows], 2)
    trainer = run_trainer(tok, rows, config(tmp_path, per_device_train_batch_size=8, max_steps=1, bf16=True), model, copy.deepcopy(ref))
    assert torch.isfinite(trainer.conflict_averse_optimizer.last.coefficients).all()
    moved = max_diff(mine, tiny.no_dropout_gpt2(tok))
    assert max_diff(model, mine) < 0.05 * moved  # autocast changes the numbers, not the step


def test_resume_from_checkpoint_equals_a_straight_run(tok, tmp_path):
    rows = tiny.preference_rows(16, 2, seed=9)
    ref = tiny.no_dropout_gpt2(tok, seed=1)
    args = dict(
        per_device_train_batch_size=4,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        learning_rate=1e-2,
    )  # Adam: its state must be restored too
    straight = tiny.no_dropout_gpt2(tok)
    first = run_trainer(tok, rows, config(tmp_path / "a", **args), straight, copy.deepcopy(ref), MultiObjectiveDPOTrainer)
    resumed = tiny.no_dropout_gpt2(tok)
    trainer = MultiObjectiveDPOTrainer(
        model=resumed,
        ref_model=copy.deepcopy(ref),
        args=config(tmp_path / "a", **args),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    assert max_diff(straight, resumed) < 1e-6
    a, b = first.conflict_averse_optimizer.optimizer, trainer.conflict_averse_optimizer.optimizer
    for p, q in zip(straight.parameters(), resumed.parameters()):  # Adam's moments and step count carried over
        assert float(a.state[p]["step"]) == float(b.state[q]["step"]) == 4
        torch.testing.assert_close(a.state[p]["exp_avg_sq"], b.state[q]["exp_avg_sq"], rtol=1e-5, atol=1e-12)
    assert trainer.conflict_averse_optimizer.weights.tolist() == pytest.approx(WEIGHTS[2])


def test_resuming_with_new_settings_applies_this_runs_config_and_logs_each_change(tok, tmp_path, caplog):
    """A new training phase from a checkpoint: the optimizer's state is the checkpoint's, its objective
    settings this run's, and one log line names what changed. The steps after the resume equal a run
    that reconfigures the optimizer at the same step by hand."""
    rows = tiny.preference_rows(16, 2, seed=9)
    ref = tiny.no_dropout_gpt2(tok, seed=1)
    args = dict(per_device_train_batch_size=4, max_steps=4, save_strategy="steps", save_steps=2, optim="adamw_torch", learning_rate=1e-2)
    run_trainer(tok, rows, config(tmp_path / "a", **args), tiny.no_dropout_gpt2(tok), copy.deepcopy(ref), MultiObjectiveDPOTrainer)
    resumed = tiny.no_dropout_gpt2(tok)
    trainer = MultiObjectiveDPOTrainer(
        model=resumed,
        ref_model=copy.deepcopy(ref),
        args=config(tmp_path / "b", **args, objective_weights=[0.2, 0.8], c=0.1, clip=False),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
    )
    with caplog.at_level("WARNING", logger="cagrad_clip.integrations.hf"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    settings = trainer.conflict_averse_optimizer.settings
    assert (list(settings.weights), settings.c, settings.clip) == (pytest.approx([0.2, 0.8]), 0.1, False)
    (line,) = [r.getMessage() for r in caplog.records if "resumed from" in r.getMessage()]
    assert "weights: [0.7, 0.3] -> [0.2, 0.8]" in line and "c: 0.4 -> 0.1" in line and "clip: True -> False" in line
    assert "rescale" not in line
    # the reference: the straight run's first 2 steps, then the same optimizer reconfigured by hand
    by_hand = tiny.no_dropout_gpt2(tok)
    straight = MultiObjectiveDPOTrainer(
        model=by_hand,
        ref_model=copy.deepcopy(ref),
        args=config(tmp_path / "c", **{**args, "save_strategy": "no"}),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[_ReconfigureAt(2, weights=[0.2, 0.8], c=0.1, clip=False)],
    )
    straight.train()
    assert max_diff(by_hand, resumed) < 1e-6


class _ReconfigureAt(transformers.TrainerCallback):
    def __init__(self, step: int, **settings) -> None:
        self.step, self.settings = step, settings

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step == self.step:
            find_conflict_averse(optimizer).configure(**self.settings)


def test_optimizer_is_built_from_the_config_and_user_optimizers_work(tok, tmp_path):
    rows = tiny.preference_rows(8, 2, seed=10)
    model, ref = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)
    trainer = run_trainer(tok, rows, config(tmp_path, max_steps=1, weight_decay=0.1, c=0.3, clip=False, optim="adamw_torch"), model, ref)
    opt = trainer.conflict_averse_optimizer
    assert isinstance(opt, ConflictAverseOptimizer) and opt.c == 0.3 and opt.clip is False
    assert isinstance(opt.optimizer, torch.optim.AdamW)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]  # TRL's weight-decay groups
    assert trainer.optimizer is not opt  # accelerate's wrapper around ours, reached by type

    own = ConflictAverseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), weights=[0.2, 0.8], c=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(own, lambda step: 1.0)
    trainer = run_trainer(tok, rows, config(tmp_path, max_steps=2), model, ref, optimizers=(own, sched))
    assert trainer.conflict_averse_optimizer is own and own.optimizer.state_dict()["param_groups"][0]["lr"] == 0.1
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = MultiObjectiveDPOTrainer(
        model=model,
        ref_model=ref,
        args=config(tmp_path, max_steps=1),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
        optimizers=(plain, torch.optim.lr_scheduler.LambdaLR(plain, lambda s: 1.0)),
    )
    assert trainer.conflict_averse_optimizer.optimizer is plain


def test_logs_and_evaluation(tok, tmp_path):
    rows = tiny.preference_rows(8, 3, seed=11)
    model, ref = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)
    names = ["coverage", "brevity", "politeness"]
    args = config(tmp_path, 3, max_steps=2, logging_strategy="steps", logging_steps=1, objective_names=names)
    trainer = run_trainer(tok, rows, args, model, ref, eval_dataset=datasets.Dataset.from_list(rows))
    logged = trainer.state.log_history[0]
    for name in names:
        for key in (f"loss/{name}", f"coef/{name}", f"rewards/{name}/margins", f"rewards/{name}/accuracies"):
            assert key in logged, key
    assert "cos/coverage|brevity" in logged and -1 <= logged["cos/brevity|politeness"] <= 1
    metrics = trainer.evaluate()
    per_objective = [metrics[f"eval_loss/{n}"] for n in names]
    assert metrics["eval_loss"] == pytest.approx(sum(w * x for w, x in zip(WEIGHTS[3], per_objective)), rel=1e-5)
    hand = tiny.hand_dpo_losses(model.eval(), ref, tok, rows, BETA)
    assert per_objective == pytest.approx([h.item() for h in hand], abs=1e-5)


def test_logged_margins_and_accuracies_average_over_each_objectives_decided_pairs(tok, tmp_path):
    """``rewards/<objective>/margins`` is the mean of ``s_i beta Delta`` over the pairs objective ``i``
    decides (a tie prefers neither side and is left out), ``accuracies`` the share of them with
    ``s_i beta Delta > 0``: against a hand computation with the initial policy (the first step logs
    what its forward saw, before the update). Every objective has ties here (2, 1 and 3 of 8)."""
    rows = tiny.preference_rows(8, 3, seed=12)
    signs = torch.tensor([r["objective_signs"] for r in rows], dtype=torch.float32)
    decided = signs != 0
    assert (~decided).sum(0).tolist() == [2, 1, 3]
    model, ref = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)
    ids, attn, comp = tiny.encode_pairs(tok, rows)
    with torch.no_grad():
        ratio = tiny.sequence_logps(model, ids, attn, comp) - tiny.sequence_logps(ref, ids, attn, comp)
    delta = BETA * (ratio[:8] - ratio[8:])
    names = ["coverage", "brevity", "politeness"]
    args = config(tmp_path, 3, per_device_train_batch_size=8, max_steps=1, logging_strategy="steps", logging_steps=1, objective_names=names)
    logged = run_trainer(tok, rows, args, model, copy.deepcopy(ref)).state.log_history[0]
    for i, name in enumerate(names):
        margins = signs[decided[:, i], i] * delta[decided[:, i]]
        assert logged[f"rewards/{name}/margins"] == pytest.approx(margins.mean().item(), abs=1e-5), name
        assert logged[f"rewards/{name}/accuracies"] == pytest.approx((margins > 0).float().mean().item(), abs=1e-6), name
    assert logged["rewards/margins"] == pytest.approx(delta.mean().item(), abs=1e-5)


@pytest.mark.slow
def test_torch_compile_trains_the_same_step_as_eager(tok, tmp_path):
    """``torch_compile=True`` (the Trainer compiles the policy): the reference log-probs come from the
    reference model whatever its truth value (a compiled module has none)."""
    rows = tiny.preference_rows(8, 2, seed=5)
    model, ref = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    try:
        run_trainer(tok, rows, config(tmp_path / "c", per_device_train_batch_size=8, max_steps=1, torch_compile=True), model, ref)
    finally:
        torch.set_flush_denormal(False)  # inductor's fast-math kernels (torch 2.4, 2.5) turn flush-to-zero on process-wide
        torch._dynamo.reset()
    run_trainer(tok, rows, config(tmp_path / "e", per_device_train_batch_size=8, max_steps=1), eager, copy.deepcopy(ref))
    assert max_diff(model, eager) < TOL
    assert max_diff(model, tiny.no_dropout_gpt2(tok)) > 1e-2


def test_bad_input_is_refused_with_a_clear_message(tok, tmp_path):
    model, ref = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)

    def make(rows, **kw):
        return MultiObjectiveDPOTrainer(
            model=model, ref_model=ref, args=config(tmp_path, **kw), train_dataset=datasets.Dataset.from_list(rows), processing_class=tok
        )

    with pytest.raises(ValueError, match="3 signs per example but there are 2 objective_weights; give one weight per objective"):
        make(tiny.preference_rows(4, 3))
    bad = tiny.preference_rows(4, 2)
    bad[1]["objective_signs"] = [1, 0.5]
    with pytest.raises(ValueError, match=r"train_dataset: column 'objective_signs', row 1: \[1.0, 0.5\] holds \[0.5\]; signs must be"):
        make(bad)
    missing = [{k: v for k, v in r.items() if k != "objective_signs"} for r in tiny.preference_rows(4, 2)]
    with pytest.raises(ValueError, match="no 'objective_signs' column"):
        make(missing)
    with pytest.raises(ValueError, match="loss_type"):
        config(tmp_path, loss_type=["nca_pair"])
    with pytest.raises(ValueError, match="objective_names"):
        config(tmp_path, objective_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="objective_weights"):
        config(tmp_path, objective_weights=[0.5, -1.0])
    for bad_setting, message in (
        ({"c": -0.1}, "c must be finite"),
        ({"c": float("nan")}, "c must be finite"),
        ({"rescale": "2c"}, "rescale"),
    ):
        with pytest.raises(ValueError, match=message):  # the library's own settings check, not a copy of it
            config(tmp_path, **bad_setting)
    with pytest.raises(TypeError, match="clip must be True or False"):
        config(tmp_path, clip="yes")
    from trl import DPOConfig

    with pytest.raises(TypeError, match="MultiObjectiveDPOConfig"):
        MultiObjectiveDPOTrainer(
            model=model,
            ref_model=ref,
            args=DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False),
            train_dataset=datasets.Dataset.from_list(tiny.preference_rows(4, 2)),
            processing_class=tok,
        )


def test_streamed_data_is_checked_per_batch(tok, tmp_path):
    model, ref = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)
    rows = tiny.preference_rows(8, 2, seed=12)
    stream = datasets.Dataset.from_list(rows).to_iterable_dataset()
    trainer = MultiObjectiveDPOTrainer(
        model=model, ref_model=ref, args=config(tmp_path, max_steps=1), train_dataset=stream, processing_class=tok
    )
    trainer.train()
    assert trainer.state.global_step == 1
    rows[1]["objective_signs"] = [1, 2]  # not the first example (checked at construction): its batch refuses it
    bad = datasets.Dataset.from_list(rows).to_iterable_dataset()
    trainer = MultiObjectiveDPOTrainer(
        model=model, ref_model=ref, args=config(tmp_path, max_steps=1), train_dataset=bad, processing_class=tok
    )
    with pytest.raises(ValueError, match=r"a batch's column 'objective_signs', row \d+: \[.*\] holds \[2.0\]; signs must be"):
        trainer.train()
    assert trainer.state.global_step == 0
    rows[0]["objective_signs"] = [1, 2]
    with pytest.raises(ValueError, match=r"train_dataset: column 'objective_signs', row 0: \[1.0, 2.0\] holds \[2.0\]"):
        MultiObjectiveDPOTrainer(
            model=model,
            ref_model=ref,
            args=config(tmp_path, max_steps=1),
            train_dataset=datasets.Dataset.from_list(rows).to_iterable_dataset(),
            processing_class=tok,
        )


@pytest.mark.parametrize("streamed", [False, True])
def test_objective_names_must_match_the_number_of_signs(tok, tmp_path, streamed):
    """objective_weights=None: the number of objectives is the signs' length, known only from the data. A
    mismatched objective_names used to pass construction and crash at the first log (after a checkpoint)."""
    model, ref = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)
    rows = tiny.preference_rows(8, 3, seed=13)

    def make(names, eval_rows=None):
        ds = datasets.Dataset.from_list(rows)
        args = config(tmp_path, objective_weights=None, objective_names=names, max_steps=1, logging_strategy="steps", logging_steps=1)
        return MultiObjectiveDPOTrainer(
            model=model,
            ref_model=ref,
            args=args,
            train_dataset=ds.to_iterable_dataset() if streamed else ds,
            eval_dataset=None if eval_rows is None else datasets.Dataset.from_list(eval_rows),
            processing_class=tok,
        )

    for names in (["a", "b"], ["a", "b", "c", "d"]):  # shorter and longer than the 3 signs
        with pytest.raises(ValueError, match=rf"3 signs per example but there are {len(names)} objective_names") as err:
            make(names)
        assert "give one name per objective" in str(err.value)
    with pytest.raises(ValueError, match="eval_dataset.* 2 signs per example but there are 3 objective_names"):
        make(["a", "b", "c"], eval_rows=tiny.preference_rows(4, 2))
    trainer = make(["a", "b", "c"])  # a matching length constructs and trains
    trainer.train()
    assert {"loss/a", "coef/c", "cos/a|b"} <= set(trainer.state.log_history[0])
