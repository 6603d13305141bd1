"""The linear branch's feature maps phi in torch, and their gradients: the reference's
arithmetic, and the functions the module exposes as `feature_map_q` and `feature_map_k`.

`FEATURE_MAPS` is the table of them by name, the names every layer accepts
(`spec.FEATURE_MAPS`). The kernels' TileLang versions are the same table in
`sla_tl.schedules.feature_maps`; tests/test_reference.py holds the two tables' names
together. Adding a feature map is an entry in each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the head dimension."""
    return torch.softmax(x, dim=-1)


def softmax_vjp(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of `softmax` at x, given its output's gradient."""
    s = torch.softmax(x, dim=-1)
    return s * (grad - (grad * s).sum(dim=-1, keepdim=True))


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1."""
    return F.elu(x) + 1.0


def elu_plus_one_vjp(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of `elu_plus_one` at x, given its output's gradient."""
    return grad * torch.where(x > 0, torch.ones_like(x), torch.exp(x))


def relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x)."""
    return torch.relu(x)


def relu_vjp(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of `relu` at x, given its output's gradient."""
    return grad * (x > 0)


class FeatureMap(NamedTuple):
    """One feature map: phi and its vector-Jacobian product (x, grad of phi(x)) -> grad of x."""

    phi: Callable[[torch.Tensor], torch.Tensor]
    vjp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


FEATURE_MAPS: dict[str, FeatureMap] = {
    "softmax": FeatureMap(softmax, softmax_vjp),
    "elu": FeatureMap(elu_plus_one, elu_plus_one_vjp),
    "relu": FeatureMap(relu, relu_vjp),
}
"""Every feature map, by the name the operators take."""
