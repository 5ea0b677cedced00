"""Multi-objective DPO with TRL: ``MultiObjectiveDPOTrainer`` (``pip install "cagrad-clip[trl]"``).

TRL's ``DPOTrainer`` with one DPO loss per objective, combined by
:class:`~cagrad_clip.ConflictAverseOptimizer` (RACO's clipped conflict-averse gradient)::

    args = MultiObjectiveDPOConfig(output_dir="out", objective_weights=[0.5, 0.3, 0.2], c=0.4, beta=0.2)
    MultiObjectiveDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok).train()

The dataset has TRL's preference columns (``prompt``, ``chosen``, ``rejected``) and ``objective_signs``:
one number per objective, ``+1`` if ``chosen`` is better for that objective, ``-1`` if ``rejected`` is,
``0`` for a tie (:func:`signs_from_ratings` and :func:`pair_from_preferred_ids` build them from
per-attribute ratings and from per-objective preferred-response ids). With ``Delta`` TRL's DPO margin
against the reference (policy-minus-reference log-ratio of ``chosen`` minus that of ``rejected``),
objective ``i``'s loss is TRL's ``loss_type`` of the signed margin ``s_i * beta * Delta`` (for the
default sigmoid loss, ``-mean log sigmoid(s_i * beta * Delta)``): the objectives share one policy
forward and one reference forward per batch and differ only in the signs (a tie gives no gradient).
Everything else is TRL's: tokenisation, the collator, the reference
(a ``ref_model``, a PEFT model with its adapter disabled, or ``precompute_ref_log_probs``), the
optimizer and scheduler from the config, checkpoints, logging.
"""

from .dpo import MultiObjectiveDPOConfig, MultiObjectiveDPOTrainer
from .preferences import pair_from_preferred_ids, signs_from_ratings
from .signs import SignsCollator

__all__ = ["MultiObjectiveDPOConfig", "MultiObjectiveDPOTrainer", "SignsCollator", "pair_from_preferred_ids", "signs_from_ratings"]
