"""Run the 2-rank half of the matrix: 2 gloo CPU workers, started with ``spawn`` (never ``fork``).

Starting an interpreter that imports torch costs seconds of CPU per process, so one pair of
workers runs a list of *jobs*, one job per ``(path, dtype)``: each job gets its own gloo process
group (a fresh file-store rendezvous, destroyed at the job's end) and runs every 2-rank case of
:data:`tests.contract.cases.CASES` inside it, one after another. Every case's outcome is saved as
soon as it is known, so a worker that crashes or hangs costs only the case it was in: the parent
kills the pair (by their handles) after ``timeout_s``, records that case as crashed, and starts a
fresh pair for the jobs that remain.

Importable without pytest or scipy: the workers import it.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .cases import CASES, execute
from .paths import by_name

__all__ = ["WORLD", "run_jobs"]

WORLD = 2
GLOO_TIMEOUT_S = 30  # a collective one rank never joins fails after this long instead of hanging


def _cases() -> list[Any]:
    return [case for case in CASES if WORLD in case.procs]


def _outcome_file(tmp: str, job: int, case: str, rank: int) -> str:
    return os.path.join(tmp, f"job{job}-{case}-rank{rank}.pt")


def _worker(rank: int, jobs: list[tuple[int, str, str, int]], tmp: str, attempt: int) -> None:
    torch.set_num_threads(1)
    cases = _cases()
    for index, path_name, dtype_name, first in jobs:
        path, dtype = by_name(path_name), getattr(torch, dtype_name)
        dist.init_process_group(
            "gloo",
            init_method="file://" + os.path.join(tmp, f"init-{attempt}-{index}"),
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S),
        )
        try:
            for case in cases[first:]:
                reason = path.missing(WORLD, case.name, dtype)
                outcome = {"ok": False, "skip": reason} if reason is not None else execute(path, case, dtype, WORLD, rank)
                target = _outcome_file(tmp, index, case.name, rank)
                torch.save(outcome, target + ".part")
                os.replace(target + ".part", target)
                try:  # realign the ranks before the next case, whatever this one did
                    dist.barrier()
                except Exception:  # noqa: BLE001 - the next case's outcome will say what broke
                    pass
        finally:
            dist.destroy_process_group()


def _crashed(message: str) -> dict[str, Any]:
    error = {"type": "WorkerCrash", "mro": ["WorkerCrash"], "message": message, "traceback": message}
    return {"ok": False, "error": error, "unchanged": None}


def run_jobs(jobs: list[tuple[str, str]], timeout_s: float = 240.0) -> dict[tuple[str, str], dict[str, list[dict[str, Any]]]]:
    """Outcomes ``{(path, dtype): {case: [rank 0's, rank 1's]}}`` of every 2-rank case of every job."""
    cases = [case.name for case in _cases()]
    results: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {job: {} for job in jobs}
    pending = [(i, path, dtype, 0) for i, (path, dtype) in enumerate(jobs)]
    attempt = barren = 0
    with tempfile.TemporaryDirectory(prefix="contract-") as tmp:
        while pending:
            attempt += 1
            context = mp.start_processes(_worker, args=(pending, tmp, attempt), nprocs=WORLD, join=False, start_method="spawn")
            deadline = time.monotonic() + timeout_s
            failure = None
            try:
                while not context.join(timeout=0.5):
                    if time.monotonic() > deadline:
                        failure = f"the 2-rank workers did not finish within {timeout_s:.0f} s (a hang or deadlock)"
                        break
            except Exception as error:  # noqa: BLE001 - a worker died or raised outside a case
                failure = f"a worker process failed: {type(error).__name__}: {error}".strip()
            finally:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                        process.join()
            again = []
            progress = False
            for i, path, dtype, _ in pending:
                job = (path, dtype)
                for k, case in enumerate(cases):
                    files = [_outcome_file(tmp, i, case, r) for r in range(WORLD)]
                    if case in results[job]:
                        continue
                    if all(os.path.exists(f) for f in files):
                        results[job][case] = [torch.load(f, weights_only=False) for f in files]
                        progress = True
                        continue
                    # the first case without an outcome is the one the workers died in: blame it and
                    # resume after it with fresh workers (a finished run leaving gaps is reported too)
                    results[job][case] = [_crashed(failure or "the workers exited without reporting this case")] * WORLD
                    if failure is not None and k + 1 < len(cases):
                        again.append((i, path, dtype, k + 1))
                    break
                else:
                    continue
                # every later job of this attempt never started: run it again from its first case
                again.extend((j, p, d, 0) for j, p, d, _ in pending if j > i and not results[(p, d)])
                break
            barren = 0 if progress else barren + 1
            if barren >= 3:  # the workers die before finishing any case (e.g. at the rendezvous): stop retrying
                for _, path, dtype, _ in again:
                    for case in cases:
                        results[(path, dtype)].setdefault(case, [_crashed(f"not run: {failure}")] * WORLD)
                again = []
            pending = again
    return results
