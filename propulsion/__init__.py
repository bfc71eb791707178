"""Propulsion fine-tuning (Kowsher et al., arXiv 2409.10927) with a peft-style API.

Each wrapped layer computes ``h = (W x + b) * z**k`` with frozen ``W, b`` and a trainable
vector ``z`` (initialised to 1) per layer.

    >>> import torch
    >>> from torch import nn
    >>> from propulsion import (PropulsionConfig, get_propulsion_model, merge_and_unload,
    ...                         propulsion_layers)
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    >>> x = torch.randn(3, 4, dtype=torch.float64)
    >>> net = get_propulsion_model(net, PropulsionConfig(degree=5))
    >>> with torch.no_grad():
    ...     for layer in propulsion_layers(net).values():
    ...         _ = layer.propulsion_z.uniform_(0.98, 1.02)
    >>> y = net(x)
    >>> plain = merge_and_unload(net)
    >>> bool(torch.allclose(plain(x), y, rtol=1e-12, atol=1e-12))
    True
"""

from propulsion.config import PropulsionConfig
from propulsion.counting import ARCHITECTURES, ParameterCount, build_on_meta, count_propulsion
from propulsion.errors import (
    AdapterFileError,
    AdapterMismatchError,
    PropulsionConfigError,
    PropulsionError,
    TargetError,
)
from propulsion.layer import (
    ADAPTER_PARAMETER,
    PropulsionEmbedding,
    PropulsionLayer,
    PropulsionLayerNorm,
    PropulsionLinear,
)
from propulsion.model import (
    adapter_state,
    get_propulsion_model,
    is_propulsion_model,
    merge_adapter,
    merge_and_unload,
    print_trainable_parameters,
    propulsion_config,
    propulsion_layers,
    trainable_parameters,
    unload,
    unmerge_adapter,
)
from propulsion.serialization import load_adapter, save_adapter

__all__ = [
    # configuration
    "PropulsionConfig",
    # layers
    "ADAPTER_PARAMETER",
    "PropulsionEmbedding",
    "PropulsionLayer",
    "PropulsionLayerNorm",
    "PropulsionLinear",
    # wrapping, merging, unloading
    "adapter_state",
    "get_propulsion_model",
    "is_propulsion_model",
    "merge_adapter",
    "merge_and_unload",
    "propulsion_config",
    "propulsion_layers",
    "unload",
    "unmerge_adapter",
    # counting
    "ARCHITECTURES",
    "ParameterCount",
    "build_on_meta",
    "count_propulsion",
    "print_trainable_parameters",
    "trainable_parameters",
    # files
    "load_adapter",
    "save_adapter",
    # errors
    "AdapterFileError",
    "AdapterMismatchError",
    "PropulsionConfigError",
    "PropulsionError",
    "TargetError",
]
