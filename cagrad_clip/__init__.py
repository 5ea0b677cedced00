"""cagrad-clip: conflict-averse multi-objective optimisation for PyTorch.

RACO's clipped conflict-averse gradient (CAGrad-Clip, arXiv 2602.02495) as a drop-in wrapper
around any ``torch.optim`` optimizer, with a batched, sync-free dual solver.
"""

import torch as _torch

from ._torch_version import check_torch_version as _check_torch_version

_check_torch_version(str(_torch.__version__))  # before anything that needs the floor's features

from ._diagnostics import StepDiagnostics
from ._dual import (
    RESCALE_OPTIONS,
    SOLVER_OPTIONS,
    CAGradSolution,
    combination_coefficients,
    default_max_iter,
    solve_cagrad,
)
from ._low_memory import AutogramEngine
from ._nonfinite import NonfinitePolicy
from ._optimizer import NONFINITE_POLICIES, ConflictAverseOptimizer
from ._settings import CAGradSettings

__all__ = [
    "NONFINITE_POLICIES",
    "RESCALE_OPTIONS",
    "SOLVER_OPTIONS",
    "AutogramEngine",
    "CAGradSettings",
    "CAGradSolution",
    "NonfinitePolicy",
    "ConflictAverseOptimizer",
    "StepDiagnostics",
    "combination_coefficients",
    "default_max_iter",
    "solve_cagrad",
]

__version__ = "0.1.0"
