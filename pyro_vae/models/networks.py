"""Multi-layer perceptrons shared by encoders and decoders."""

from __future__ import annotations

from typing import Sequence

from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
}


def activation_class(name: str) -> type[nn.Module]:
    """Look up an activation by name, with an error that lists the valid names."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; expected one of {', '.join(sorted(ACTIVATIONS))}"
        ) from None


def mlp(in_features: int, hidden: Sequence[int], out_features: int, activation: str = "relu") -> nn.Sequential:
    """``in -> hidden[0] -> ... -> hidden[-1] -> out`` with ``activation`` between layers.

    Linear layers act on the last dimension, so the network broadcasts over any
    leading particle and plate dimensions.
    """
    act = activation_class(activation)
    sizes = [in_features, *hidden]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), act()]
    layers.append(nn.Linear(sizes[-1], out_features))
    return nn.Sequential(*layers)
