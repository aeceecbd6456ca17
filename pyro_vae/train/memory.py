"""Refuse requests that cannot fit in memory before allocating them.

Allocating far more than the machine has either raises deep inside torch or,
worse, gets the process killed by the operating system with nothing saved.
:func:`check_fits` compares an estimate with the memory available now (the
machine's, a container's limit, or the GPU's) and raises :class:`TooLarge`
naming the numbers that make the request large.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from pyro_vae.models.config import ModelConfig

#: Labels beyond this many classes are not one-hot encoded by a conditional model.
MAX_CLASSES = 10_000
#: Share of the available memory one request may plan to use.
USABLE_FRACTION = 0.8


class TooLarge(ValueError):
    """A request needs more memory than is available."""


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        return None if limit == "max" else max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory a new allocation can use on ``device`` now, in bytes; None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    candidates = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    if not candidates and hasattr(os, "sysconf"):
        try:
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return min(candidates) if candidates else None


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"  # pragma: no cover


def check_fits(needed: float, what: str, hint: str, device: torch.device | str = "cpu") -> None:
    """Raise :class:`TooLarge` when ``needed`` bytes exceed the usable memory of ``device``.

    ``what`` names the request and its sizes (``"particles 100000 x batch 128 x 784 features"``),
    ``hint`` says what to lower.
    """
    if not math.isfinite(needed):
        raise TooLarge(f"{what} is too large to compute; {hint}")
    available = available_bytes(device)
    if available is None:
        return
    if needed > USABLE_FRACTION * available:
        raise TooLarge(f"{what} needs about {fmt_bytes(needed)} of memory, more than the "
                       f"{fmt_bytes(available)} available on {torch.device(device).type}; {hint}")


def check_num_classes(num_classes: int | None, what: str) -> None:
    """Refuse labels too many to one-hot encode (a label of 10**9 means 10**9 classes)."""
    if num_classes is not None and num_classes > MAX_CLASSES:
        raise TooLarge(f"{what} has labels up to {num_classes - 1}, i.e. {num_classes} classes; a conditional "
                       f"model one-hot encodes labels and supports at most {MAX_CLASSES} classes: relabel the "
                       "classes 0..K-1, or train without --conditional")


# -- what the built-in models need ------------------------------------------------------------------

def _chain(*widths: int) -> int:
    """Weights of a stack of linear layers of these widths."""
    return sum(a * b for a, b in zip(widths, widths[1:]))


def _conv_widths(image_shape: Sequence[int] | None, input_dim: int) -> tuple[int, int, int, int]:
    """``(channels, flat encoder features, flat decoder map, pixels per channel)`` of the
    convolutional networks for images of ``image_shape`` (a square guess from ``input_dim`` without one)."""
    from pyro_vae.models.networks import CONV_CHANNELS

    shape = tuple(image_shape or ())
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3:
        side = max(4, math.isqrt(max(input_dim, 1)))
        shape = (1, side, side)
    channels, h, w = shape
    c2 = CONV_CHANNELS[1]
    return channels, c2 * (h // 4) * (w // 4), c2 * math.ceil(h / 4) * math.ceil(w / 4), h * w


def code_width(model: "ModelConfig") -> int:
    """Features of the latent code the decoder reads: ``latent_dim``, or ``latent_dim x
    num_categories`` one-hot features for categorical latents."""
    categorical = "categorical" in (model.prior, model.guide)
    return model.latent_dim * model.num_categories if categorical else model.latent_dim


def model_parts(model: "ModelConfig", input_dim: int, num_classes: int = 0,
                image_shape: Sequence[int] | None = None) -> dict[str, int]:
    """The built-in model's parameter count by part, from its sizes alone (nothing is allocated):
    the weights of its linear layers, which every size of :class:`~pyro_vae.models.config.ModelConfig` enters.  Within a
    factor of two of the real count wherever one size dominates (see the tests)."""
    m = model
    c = num_classes if m.conditional else 0
    code, z, zp = code_width(m), m.latent_dim, m.prior_latent_dim
    outputs = {"lowrank": z * (2 + m.guide_rank), "full": 2 * z + z * (z - 1) // 2,
               "iaf": 2 * z + m.flow_hidden, "categorical": code}.get(m.guide, 2 * z)
    if m.network == "conv":
        channels, enc_flat, dec_map, _ = _conv_widths(image_shape, input_dim)
        from pyro_vae.models.networks import CONV_CHANNELS

        c1, c2 = CONV_CHANNELS
        convs = 16 * (channels * c1 + c1 * c2) * 2
        encoder = (enc_flat + c) * outputs + convs // 2
        decoder = (code + c) * dec_map + convs // 2
        hidden: list[int] = []
    else:
        hidden = list(m.hidden)
        encoder = _chain(input_dim + c, *hidden, outputs)
        decoder = _chain(code + c, *reversed(hidden), input_dim)
    parts = {f"encoder ({input_dim} features -> hidden {hidden} -> {outputs} outputs for the {m.guide} guide)": encoder,
             f"decoder (code of {code} -> hidden {hidden[::-1]} -> {input_dim} features)": decoder}
    if m.prior == "vamp":
        parts[f"pseudo_inputs {m.pseudo_inputs} x {input_dim} features"] = m.pseudo_inputs * input_dim
    if m.prior == "mixture":
        parts[f"mixture_components {m.mixture_components} x latent dim {zp}"] = 2 * m.mixture_components * zp
    if m.prior == "flow":
        parts[f"prior flow_steps {m.flow_steps} x flow_hidden {m.flow_hidden} x latent dim {zp}"] = \
            m.flow_steps * 3 * m.flow_hidden * zp
    if m.guide == "iaf":
        parts[f"guide flow_steps {m.flow_steps} x flow_hidden {m.flow_hidden} x latent_dim {z}"] = \
            m.flow_steps * (3 * m.flow_hidden * z + m.flow_hidden * m.flow_hidden)
    if m.stochastic_layers == 2:
        parts[f"top layers (top_hidden {m.top_hidden}, top_latent_dim {m.top_latent_dim})"] = \
            _chain(z + c, *m.top_hidden, 2 * m.top_latent_dim) + _chain(m.top_latent_dim + c, *m.top_hidden[::-1],
                                                                        2 * z)
    return parts


def step_floats_per_pair(model: "ModelConfig", input_dim: int, image_shape: Sequence[int] | None = None) -> int:
    """float32 values one training step keeps per (data point, particle) pair of the built-in model:
    data-sized tensors, every layer's activations (kept for the backward pass), the code, and the
    per-component densities of a mixture or VampPrior."""
    m = model
    floats = 3 * input_dim + 4 * code_width(m)
    if m.network == "conv":
        _, enc_flat, dec_map, pixels = _conv_widths(image_shape, input_dim)
        floats += 2 * (32 * pixels // 4 + enc_flat) + 2 * (dec_map + 32 * pixels // 4)
    else:
        floats += 2 * sum(m.hidden)
    if m.prior == "mixture":
        floats += 2 * m.mixture_components * m.prior_latent_dim
    if m.prior == "vamp":
        floats += 2 * m.pseudo_inputs * m.latent_dim
    if m.prior == "flow" or m.guide == "iaf":
        floats += 2 * m.flow_steps * (m.flow_hidden + 2 * m.latent_dim)
    if m.stochastic_layers == 2:
        floats += 2 * sum(m.top_hidden) + 4 * m.top_latent_dim
    return floats
