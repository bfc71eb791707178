"""Empirical neural tangent kernels over any parameter subset (torch.func), with metrics and
kernel predictors.

    >>> import torch
    >>> from torch import nn
    >>> from ntk import empirical_ntk
    >>> net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    >>> x = torch.randn(4, 3, dtype=torch.float64)
    >>> empirical_ntk(net, x, output="trace").shape
    torch.Size([4, 4])
"""

from ntk import metrics, predict, reference, tiles
from ntk._handlers import Handler, StructuredError, register_handler
from ntk._inputs import InputError
from ntk._memory import KernelTooLargeError, default_budget
from ntk._params import SELECTORS, ParameterSelectionError, select_parameters
from ntk._problem import OUTPUTS, KernelOutputError
from ntk.empirical import METHODS, UnsupportedModelError, empirical_ntk
from ntk.kernels import kernels, structured_ntk
from ntk.reference import reference_ntk
from ntk.tiles import TileError, assemble_kernel, compute_tiles, tiled_ntk

__all__ = [
    # kernels
    "METHODS",
    "OUTPUTS",
    "empirical_ntk",
    "kernels",
    "structured_ntk",
    # per-layer handlers of the structured engine
    "Handler",
    "register_handler",
    # the slow exact reference, for checking (module and function)
    "reference",
    "reference_ntk",
    # metrics and kernel predictors (modules)
    "metrics",
    "predict",
    # tiled kernels on disk, over torch.distributed ranks (module and entry points)
    "tiles",
    "compute_tiles",
    "assemble_kernel",
    "tiled_ntk",
    # parameter selection
    "SELECTORS",
    "select_parameters",
    # memory
    "default_budget",
    # errors
    "InputError",
    "KernelOutputError",
    "KernelTooLargeError",
    "ParameterSelectionError",
    "StructuredError",
    "TileError",
    "UnsupportedModelError",
]
