"""Decoder means of any model/guide pair, for pictures: samples, reconstructions, traversals.

The model is run with its observed sites *un*-observed (``poutine.uncondition``),
and the picture shows the mean ``E[x | z]`` of each observed site's
distribution rather than a noisy draw.  The latent sites come from the prior
(samples), from the guide at a data point (reconstructions), or are set to
chosen values (``poutine.condition``: latent traversals).  Nothing here knows a
network or a site name, so it works for the library's models and for a user's
program alike.
"""

from __future__ import annotations

from typing import Any

import torch
from pyro import poutine

from pyro_vae.train.program import Program, as_program
from pyro_vae.train.trainer import batch_args


def observed_sites(program: Program, *args: Any) -> list[str]:
    """Names of the model's observed sites on ``args``."""
    guide_trace = poutine.trace(program.guide).get_trace(*args)
    model_trace = poutine.trace(poutine.replay(program.model, trace=guide_trace)).get_trace(*args)
    return [name for name, site in model_trace.nodes.items() if site["type"] == "sample" and site["is_observed"]]


def _mean(fn) -> torch.Tensor:
    try:
        mean = fn.mean
        if torch.isfinite(mean).all():
            return mean
    except NotImplementedError:
        pass
    return fn.sample()


def _decode(program: Program, args: tuple, guide_trace=None, values: dict[str, torch.Tensor] | None = None
            ) -> torch.Tensor:
    names = observed_sites(program, *args)
    if len(names) != 1:
        raise ValueError(f"pictures need a model with one observed site; this one has {names or 'none'}")
    model = poutine.uncondition(program.model)
    if values:
        model = poutine.condition(model, data=values)
    if guide_trace is not None:
        model = poutine.replay(model, trace=guide_trace)
    trace = poutine.trace(model).get_trace(*args)
    return _mean(trace.nodes[names[0]]["fn"])


@torch.no_grad()
def sample_means(program: Any, num: int, input_dim: int, y: torch.Tensor | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """``(num, d)`` decoder means at ``num`` draws from the prior (one per label in ``y`` if given)."""
    program = as_program(program)
    placeholder = torch.zeros(num, input_dim, device=device)
    return _decode(program, batch_args(placeholder, y))


@torch.no_grad()
def reconstruction_means(program: Any, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Decoder means at one guide draw per input: the reconstructions of ``x``."""
    program = as_program(program)
    args = batch_args(x, y)
    guide_trace = poutine.trace(program.guide).get_trace(*args)
    return _decode(program, args, guide_trace=guide_trace)


@torch.no_grad()
def means_at(program: Any, site: str, values: torch.Tensor, input_dim: int,
             y: torch.Tensor | None = None) -> torch.Tensor:
    """Decoder means with latent site ``site`` set to each row of ``values`` (other latent
    sites drawn from the prior): the images of a latent traversal."""
    program = as_program(program)
    placeholder = values.new_zeros(values.shape[0], input_dim)
    return _decode(program, batch_args(placeholder, y), values={site: values})
