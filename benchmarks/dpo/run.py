"""One sweep: user weights x methods x seeds, for m = 2 and m = 3, each run through MultiObjectiveDPOTrainer."""

from __future__ import annotations

import copy
import logging
import random
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from . import task
from .baselines import GramRuleOptimizer, mgda_rule, pcgrad_rule

#: CLI name -> (label, ConflictAverseOptimizer settings or a baseline rule name).
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "weighted": ("Weighted sum (c=0)", {"c": 0.0, "clip": True}),
    "cagrad": ("CAGrad, weighted anchor (c=0.4)", {"c": 0.4, "clip": False}),
    "raco": ("RACO (c=0.4, clip)", {"c": 0.4, "clip": True}),
    "mgda": ("MGDA (ignores w)", {"baseline": "mgda"}),
    "pcgrad": ("PCGrad (w-weighted)", {"baseline": "pcgrad"}),
}
WEIGHTS = {
    2: [(0.8, 0.2), (0.5, 0.5), (0.2, 0.8)],
    3: [(0.6, 0.2, 0.2), (0.2, 0.6, 0.2), (0.2, 0.2, 0.6)],
}


@dataclass
class Budget:
    warmup_steps: int = 200  # supervised steps that make the reference
    pairs: int = 1536  # reference-sample pairs drawn (all-tie pairs dropped)
    steps: int = 50  # DPO optimizer steps
    batch: int = 32
    lr: float = 2e-3
    beta: float = 0.2
    eval_prompts: int = 512


QUICK = Budget(warmup_steps=60, pairs=256, steps=8, batch=16, eval_prompts=64)


@dataclass
class RunResult:
    m: int
    method: str
    weights: tuple[float, ...]
    seed: int
    win_rates: list[float]
    policy_means: list[float]
    reference_means: list[float]
    seconds: float
    coefficients: list[float] = field(default_factory=list)
    clip_active: float = float("nan")  # fraction of steps where RACO's clip changed the direction (NaN: not CAGrad)
    clip_change: float = float("nan")  # mean over steps of ||d(p~) - d(p)|| / ||g0|| (for CAGrad: what the clip would change)


def _trainer_class():
    from cagrad_clip.integrations.trl import MultiObjectiveDPOTrainer

    class BenchTrainer(MultiObjectiveDPOTrainer):
        """The trainer, with MGDA / PCGrad optimizers allowed in place of ConflictAverseOptimizer."""

        baseline: str | None = None
        baseline_seed = 0

        def wrap_optimizer(self, optimizer):
            if self.baseline is None:
                return super().wrap_optimizer(optimizer)
            rule = mgda_rule if self.baseline == "mgda" else pcgrad_rule(self.baseline_seed)
            return GramRuleOptimizer(optimizer, rule, self.objective_weights)

    return BenchTrainer


def _clip_counter():
    """A callback summing ``opt.last.clip_active`` / ``clip_change`` over the steps, on the device."""
    from transformers import TrainerCallback

    from cagrad_clip.integrations import find_conflict_averse

    class ClipCounter(TrainerCallback):
        def __init__(self) -> None:
            self.active: Any = 0.0
            self.change: Any = 0.0
            self.steps = 0

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            last = getattr(find_conflict_averse(optimizer), "last", None)
            if getattr(last, "clip_active", None) is not None:  # the baselines' optimizers have no clip
                self.active = self.active + last.clip_active.double()
                self.change = self.change + last.clip_change.double()
                self.steps += 1

        def fractions(self) -> tuple[float, float]:
            if not self.steps:
                return float("nan"), float("nan")
            return float(self.active) / self.steps, float(self.change) / self.steps

    return ClipCounter()


def train_one(
    reference, tok, rows: list[dict], m: int, method: str, weights: tuple[float, ...], seed: int, budget: Budget, out_dir: str
) -> tuple[Any, list[float], tuple[float, float]]:
    """DPO from the reference with one method and one weight vector; returns the policy, the last
    coefficients and the clip's activity (fraction of steps active, mean change)."""
    import datasets
    from transformers import PrinterCallback

    from cagrad_clip.integrations.trl import MultiObjectiveDPOConfig

    settings = dict(METHODS[method][1])
    baseline = settings.pop("baseline", None)
    args = MultiObjectiveDPOConfig(
        output_dir=out_dir,
        objective_weights=list(weights),
        objective_names=list(task.OBJECTIVES[:m]),
        beta=budget.beta,
        learning_rate=budget.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, budget.steps // 10),
        max_steps=budget.steps,
        per_device_train_batch_size=budget.batch,
        max_grad_norm=1.0,
        optim="adamw_torch",
        weight_decay=0.0,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=seed,
        dataloader_num_workers=0,
        **settings,
    )
    cls = _trainer_class()
    policy = copy.deepcopy(reference).requires_grad_(True)
    trainer = cls.__new__(cls)
    trainer.baseline, trainer.baseline_seed = baseline, seed
    trainer.__init__(
        model=policy, ref_model=copy.deepcopy(reference), args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok
    )
    trainer.remove_callback(PrinterCallback)
    counter = _clip_counter()
    trainer.add_callback(counter)
    trainer.train()
    last = trainer.conflict_averse_optimizer.last
    return policy.eval(), ([] if last is None else [float(x) for x in last.coefficients.tolist()]), counter.fractions()


def run(
    seeds: list[int],
    methods: list[str],
    ms: list[int],
    budget: Budget,
    weights: dict[int, list[tuple[float, ...]]] | None = None,
    progress: bool = True,
    rare: tuple[int, float] | None = None,
) -> list[RunResult]:
    """The whole sweep. MGDA ignores the weights: it runs once per (m, seed) and its result stands for every weight.
    ``rare=(objective, keep)``: that objective's signal is kept in a ``keep`` fraction of the pairs (:func:`task.thin_signal`)."""
    import datasets
    import transformers

    weights = weights or WEIGHTS
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.getLogger("trl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    tok = task.tokenizer()
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            t0 = time.perf_counter()
            reference = task.supervised_reference(tok, seed, budget.warmup_steps)
            eval_rng = random.Random(10_000 + seed)
            prompts = [task.make_prompt(eval_rng) for _ in range(budget.eval_prompts)]
            keywords, texts = [k for k, _ in prompts], [p for _, p in prompts]
            ref_out = task.sample(reference, tok, texts, seed=20_000 + seed)
            if progress:
                print(f"seed {seed}: reference ready in {time.perf_counter() - t0:.1f} s", flush=True)
            for m in ms:
                rows = task.preference_rows(reference, tok, budget.pairs, m, seed=30_000 + seed)
                if rare is not None:  # the rare-signal variant: one objective's signal kept in a fraction of the pairs
                    rows = task.thin_signal(rows, rare[0], rare[1], seed=50_000 + seed)
                for w in weights[m]:
                    for method in methods:
                        if method == "mgda" and w != weights[m][0]:
                            first = next(r for r in results if r.method == "mgda" and r.m == m and r.seed == seed)
                            results.append(
                                RunResult(
                                    m,
                                    method,
                                    w,
                                    seed,
                                    first.win_rates,
                                    first.policy_means,
                                    first.reference_means,
                                    0.0,
                                    first.coefficients,
                                    first.clip_active,
                                    first.clip_change,
                                )
                            )
                            continue
                        t1 = time.perf_counter()
                        policy, coefficients, (clip_active, clip_change) = train_one(reference, tok, rows, m, method, w, seed, budget, tmp)
                        pol_out = task.sample(policy, tok, texts, seed=40_000 + seed)
                        r = RunResult(
                            m,
                            method,
                            tuple(w),
                            seed,
                            task.win_rates(pol_out, ref_out, keywords, m),
                            task.mean_scores(pol_out, keywords, m),
                            task.mean_scores(ref_out, keywords, m),
                            time.perf_counter() - t1,
                            coefficients,
                            clip_active,
                            clip_change,
                        )
                        results.append(r)
                        if progress:
                            rates = " ".join(f"{x:.3f}" for x in r.win_rates)
                            print(f"  m={m} w={w} {method:8s} win rates {rates}  ({r.seconds:.1f} s)", flush=True)
    return results
