"""The 2-rank outcomes, computed once per session for every ``(path, dtype)`` the selected tests need.

One pair of spawned workers runs every selected ``(path, dtype)`` job, each in its own process group
(see ``spawn.py``); ``CONTRACT_SPAWN_PER_JOB=1`` spawns a fresh pair per job instead (more isolation,
about 4 CPU-seconds of interpreter start-up per worker and job).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from .paths import GradientPath, dtype_name
from .spawn import WORLD, run_jobs

_JOBS = pytest.StashKey[list]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    jobs: list[tuple[str, str]] = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        path = params.get("path")
        if isinstance(path, GradientPath) and params.get("world") == WORLD and path.missing(WORLD) is None:
            job = (path.name, dtype_name(params["dtype"]))
            if job not in jobs:
                jobs.append(job)
    config.stash[_JOBS] = jobs


@pytest.fixture(scope="session")
def two_rank_outcomes(request: pytest.FixtureRequest) -> Callable[[GradientPath, Any], dict[str, list[dict[str, Any]]]]:
    """``get(path, dtype)``: ``{case: [rank 0's outcome, rank 1's]}``; the first call runs every selected job."""
    cache: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}

    def get(path: GradientPath, dtype: Any) -> dict[str, list[dict[str, Any]]]:
        key = (path.name, dtype_name(dtype))
        if key not in cache:
            selected = [] if os.environ.get("CONTRACT_SPAWN_PER_JOB") else request.config.stash.get(_JOBS, [])
            jobs = [job for job in selected if job not in cache]
            cache.update(run_jobs(jobs if key in jobs else [*jobs, key]))
        return cache[key]

    return get
