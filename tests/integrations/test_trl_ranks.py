"""The DPO trainer on 2 CPU ranks started by ``torchrun`` equals one process on the same global batches:
the parameters, and every logged metric (over all ranks' pairs, not rank 0's)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from . import tiny  # noqa: E402

WORKER = Path(__file__).with_name("trl_ranks.py")
ROOT = Path(__file__).resolve().parents[2]
#: the logged numbers compared (TRL's, the per-objective ones, the optimizer's)
KEYS = (
    "loss",
    "loss/objective_0",
    "loss/objective_1",
    "rewards/objective_0/margins",
    "rewards/objective_1/margins",
    "rewards/objective_0/accuracies",
    "rewards/objective_1/accuracies",
    *tiny.TRL_METRICS,
    "coef/objective_0",
    "coef/objective_1",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str], out: Path, **extra: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    proc = subprocess.run(cmd + [str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    _run([sys.executable, str(WORKER)], one)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), str(WORKER)]
    _run(torchrun, two)
    single = torch.load(one / "rank0.pt", weights_only=False)
    ranks = [torch.load(two / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return single, ranks


def test_the_trainers_fsdp_arguments_on_cpu_train_plain_data_parallel_equal_to_one_process(runs, tmp_path):
    """transformers leaves FSDP off with use_cpu=True (is_fsdp_enabled is False): the run is plain data
    parallel, unsharded, and still equal to one process. (FSDP through the Trainer needs GPUs.)"""
    single, _ = runs
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), str(WORKER)]
    _run(torchrun, tmp_path, TRL_RANKS_FSDP="1")
    for r in range(2):
        rank = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert (rank["fsdp_enabled"], rank["store"]) == (False, "DirectStore")
        for name, value in single["params"].items():
            torch.testing.assert_close(rank["params"][name], value, rtol=0, atol=1e-5)


def test_torchrun_starts_two_ranks_that_end_with_the_same_parameters_as_one_process(runs):
    single, ranks = runs
    assert [r["world"] for r in ranks] == [2, 2] and single["world"] == 1
    for name, value in single["params"].items():
        for rank in ranks:
            torch.testing.assert_close(rank["params"][name], value, rtol=0, atol=1e-5)
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name])


def test_every_logged_metric_is_over_all_ranks_pairs(runs):
    single, ranks = runs
    want = [entry for entry in single["logs"] if "loss" in entry]
    for rank in ranks:
        got = [entry for entry in rank["logs"] if "loss" in entry]
        assert len(got) == len(want) == 2
        for g, w in zip(got, want):
            for key in KEYS:
                assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), key
