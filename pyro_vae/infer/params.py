"""The parameters of a model/guide pair, found the way ``SVI`` finds them."""

from __future__ import annotations

from typing import Callable

import torch
from pyro import poutine

from pyro_vae.infer.rng import preserved_rng


def program_parameters(model: Callable, guide: Callable, *args, **kwargs) -> dict[str, torch.Tensor]:
    """``name -> tensor`` for every parameter the guide and the model read, in first-use order.

    Like ``SVI.step``: the ``param`` sites of one run (``poutine.trace(param_only=True)``)
    of the guide and the model replayed on its draws, each as its *unconstrained*
    tensor -- the leaf an optimizer must step (``pyro.module`` networks' own
    ``nn.Parameter``\\ s, ``pyro.param``'s unconstrained values).  Runs without
    gradients and puts the random state back, so it changes no later draw.
    """
    with torch.no_grad(), preserved_rng(), poutine.trace(param_only=True) as capture:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        poutine.replay(model, trace=guide_trace)(*args, **kwargs)
    params: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, site in capture.trace.nodes.items():
        if site["type"] != "param":
            continue
        value = site["value"]
        unconstrained = getattr(value, "unconstrained", None)
        tensor = unconstrained() if callable(unconstrained) else value
        if id(tensor) not in seen:
            seen.add(id(tensor))
            params[name] = tensor
    return params
