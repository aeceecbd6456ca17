"""Networks shared by encoders and decoders: multi-layer perceptrons and small convolutional nets.

Every network maps flat features ``(..., in)`` to flat features ``(..., out)``,
whatever its inside, so a part swaps an MLP for a convolutional net without
changing anything else and still broadcasts a leading particle dimension.
The convolutional nets reshape the flat pixels to images inside (``reshape``,
never ``view(batch, -1)``, so any leading dimensions survive) and flatten back.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
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

#: Values of ``ModelConfig.network``: fully connected, or convolutional for image data.
NETWORKS = ("mlp", "conv")

#: Channels of the two strided convolutions (the transposed convolutions mirror them).
CONV_CHANNELS = (32, 64)


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


def _channels_and_sides(image_shape: Sequence[int]) -> tuple[int, int, int]:
    """``(C, H, W)`` from an image shape ``(H, W)`` or ``(C, H, W)``."""
    shape = tuple(int(s) for s in image_shape)
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    raise ValueError(f"image_shape must be (height, width) or (channels, height, width), got {image_shape!r}")


class ConvEncoderNet(nn.Module):
    """Flat images to features: two strided 4x4 convolutions (``CONV_CHANNELS``, each
    halving the sides), flattened, then one linear layer to ``out_features``.

    The input is ``(..., C*H*W + extra)``: the first ``C*H*W`` features are the
    pixels, the remaining ``extra`` (a conditioning label) join after the
    convolutions.
    """

    def __init__(self, image_shape: Sequence[int], extra_features: int, out_features: int,
                 activation: str = "relu") -> None:
        super().__init__()
        self.channels, self.height, self.width = _channels_and_sides(image_shape)
        if min(self.height, self.width) < 4:
            raise ValueError(f"the convolutional network needs images of at least 4x4 pixels, got {image_shape!r}")
        self.pixels = self.channels * self.height * self.width
        act = activation_class(activation)
        c1, c2 = CONV_CHANNELS
        self.conv = nn.Sequential(nn.Conv2d(self.channels, c1, 4, stride=2, padding=1), act(),
                                  nn.Conv2d(c1, c2, 4, stride=2, padding=1), act())
        # a 4x4 convolution with stride 2 and padding 1 maps a side n to floor(n / 2)
        flat = c2 * (self.height // 4) * (self.width // 4)
        self.output_layer = nn.Linear(flat + extra_features, out_features)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        lead = inputs.shape[:-1]
        images = inputs[..., :self.pixels].reshape(-1, self.channels, self.height, self.width)
        features = self.conv(images).reshape(*lead, -1)
        return self.output_layer(torch.cat([features, inputs[..., self.pixels:]], dim=-1))


class ConvDecoderNet(nn.Module):
    """Features to flat images, mirroring :class:`ConvEncoderNet`: one linear layer to a
    ``64 x ceil(H/4) x ceil(W/4)`` map, two transposed 4x4 convolutions with stride 2
    (each doubling the sides), cropped to ``H x W``; ``outputs_per_pixel`` maps per
    image channel, flattened channel-major to ``(..., outputs_per_pixel*C*H*W)``."""

    def __init__(self, in_features: int, image_shape: Sequence[int], outputs_per_pixel: int = 1,
                 activation: str = "relu") -> None:
        super().__init__()
        self.channels, self.height, self.width = _channels_and_sides(image_shape)
        self.out_channels = outputs_per_pixel * self.channels
        c1, c2 = CONV_CHANNELS
        self.map_shape = (c2, math.ceil(self.height / 4), math.ceil(self.width / 4))
        act = activation_class(activation)
        self.head = nn.Sequential(nn.Linear(in_features, math.prod(self.map_shape)), act())
        self.deconv = nn.Sequential(nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), act(),
                                    nn.ConvTranspose2d(c1, self.out_channels, 4, stride=2, padding=1))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        lead = inputs.shape[:-1]
        maps = self.head(inputs).reshape(-1, *self.map_shape)
        images = self.deconv(maps)[..., :self.height, :self.width]
        return images.reshape(*lead, -1)


def output_layer(net: nn.Module) -> nn.Linear:
    """The final linear layer of an encoder network (an :func:`mlp` or a :class:`ConvEncoderNet`)."""
    return net.output_layer if isinstance(net, ConvEncoderNet) else net[-1]


def _check_image_shape(network: str, image_shape: Sequence[int] | None, features: int, what: str) -> None:
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}; expected one of {', '.join(NETWORKS)}")
    if network == "conv":
        if image_shape is None:
            raise ValueError("--network conv needs image data: this data set has no image shape "
                             "(use --network mlp)")
        if math.prod(_channels_and_sides(image_shape)) != features:
            raise ValueError(f"--network conv: image shape {tuple(image_shape)} does not match the "
                             f"{features} {what}")


def encoder_network(input_dim: int, condition_dim: int, hidden: Sequence[int], out_features: int,
                    activation: str = "relu", network: str = "mlp",
                    image_shape: Sequence[int] | None = None) -> nn.Module:
    """The network of a guide: ``(..., input_dim + condition_dim) -> (..., out_features)``,
    an :func:`mlp` with ``hidden`` layers or (``network="conv"``) a :class:`ConvEncoderNet`
    on ``image_shape`` (which has no ``hidden`` layers)."""
    _check_image_shape(network, image_shape, input_dim, "input features")
    if network == "conv":
        return ConvEncoderNet(image_shape, condition_dim, out_features, activation)
    return mlp(input_dim + condition_dim, hidden, out_features, activation)


def decoder_network(in_features: int, hidden: Sequence[int], output_dim: int, activation: str = "relu",
                    network: str = "mlp", image_shape: Sequence[int] | None = None,
                    outputs_per_pixel: int = 1) -> nn.Module:
    """The network of a decoder: ``(..., in_features) -> (..., outputs_per_pixel * output_dim)``,
    an :func:`mlp` with ``hidden`` layers or (``network="conv"``) a :class:`ConvDecoderNet`
    to ``image_shape`` (which has no ``hidden`` layers)."""
    _check_image_shape(network, image_shape, output_dim, "output features")
    if network == "conv":
        return ConvDecoderNet(in_features, image_shape, outputs_per_pixel, activation)
    return mlp(in_features, hidden, outputs_per_pixel * output_dim, activation)
