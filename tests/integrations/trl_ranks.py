"""One rank of the 2-rank DPO run of ``test_trl_ranks.py`` (started by ``torchrun``; also the one-process run).

    python -m torch.distributed.run --nproc_per_node 2 tests/integrations/trl_ranks.py OUT
    python tests/integrations/trl_ranks.py OUT          # one process, the same global batches
    TRL_RANKS_FSDP=1 python -m torch.distributed.run ...  # with the Trainer's FSDP2 arguments (left off on CPU)

Writes ``OUT/rank<r>.pt``: the trained parameters and the log history.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `tests.`

import datasets  # noqa: E402
import torch  # noqa: E402

from cagrad_clip.integrations.trl import MultiObjectiveDPOConfig, MultiObjectiveDPOTrainer  # noqa: E402
from tests.integrations import tiny  # noqa: E402

PAIRS, GLOBAL_BATCH, STEPS = 16, 8, 2


class SequentialDPOTrainer(tiny.InOrder, MultiObjectiveDPOTrainer):
    pass


def main(out: Path) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    fsdp = (
        dict(fsdp=True, fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]})
        if os.environ.get("TRL_RANKS_FSDP")
        else {}
    )
    tok = tiny.tokenizer()
    rows = tiny.preference_rows(PAIRS, 2, seed=21)
    model, ref = tiny.no_dropout_gpt2(tok), tiny.no_dropout_gpt2(tok, seed=1)
    args = MultiObjectiveDPOConfig(
        output_dir=str(out / "trainer"),
        objective_weights=[0.7, 0.3],
        c=0.4,
        beta=0.5,
        learning_rate=1.0,
        lr_scheduler_type="constant",
        optim="sgd",
        per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=STEPS,
        max_grad_norm=1.0,
        logging_strategy="steps",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **fsdp,
    )
    trainer = SequentialDPOTrainer(
        model=model, ref_model=copy.deepcopy(ref), args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok
    )
    trainer.train()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    store = type(trainer.conflict_averse_optimizer._store).__name__
    info = {"world": world, "fsdp_enabled": bool(getattr(trainer, "is_fsdp_enabled", False)), "store": store}
    torch.save({"params": state, "logs": trainer.state.log_history, **info}, out / f"rank{rank}.pt")
    if torch.distributed.is_initialized():  # join the process group's threads before exit (left running, one aborted a rank at teardown)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
