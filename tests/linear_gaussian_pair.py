"""A linear-Gaussian model and Gaussian guide whose parameters learn, with the ELBO in closed form.

Model ``z ~ N(0, I_r)``, ``x | z ~ N(W z + b, sigma^2 I)`` with ``theta = (W, b)``;
guide ``q(z | x) = N(A x + c, L L^T)`` with ``phi = (A, c, L)``, ``L`` lower triangular with
a positive diagonal.  With ``m = A x + c`` and ``S = L L^T`` the ELBO is exact:

    E_q log p(x | z) = -D/2 log(2 pi sigma^2) - (|x - W m - b|^2 + tr(W S W^T)) / (2 sigma^2)
    E_q log p(z)     = -r/2 log(2 pi) - (|m|^2 + tr S) / 2
    H[q]             = r/2 (1 + log(2 pi)) + sum_i log L_ii

so its gradient with respect to every parameter is autograd of :meth:`LinearGaussianPair.exact_elbo`.
At ``A, c, L`` of the exact posterior (:class:`linear_gaussian.LinearGaussianProblem`) every
log-weight is ``log p(x)``.  The gradient tests draw estimators' gradients on a batch of a few
points repeated many times: the summed loss then holds that many independent draws per call.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from linear_gaussian import LinearGaussianProblem
from torch import nn

from pyro_vae.infer.scale import latent_scale


class LinearGaussianPair(nn.Module):
    """``model(x)``/``guide(x)`` with the decoder ``(W, b)`` and the encoder ``(A, c, L)`` registered
    by ``pyro.module``; ``shift`` moves the guide's mean, ``narrow`` scales its covariance factor
    away from the exact posterior."""

    def __init__(self, problem: LinearGaussianProblem, shift: float = 0.0, narrow: float = 1.0) -> None:
        super().__init__()
        W, b, sigma = problem.W, problem.b, problem.sigma
        r = W.shape[1]
        precision = torch.eye(r, dtype=W.dtype) + W.T @ W / sigma**2
        cov = torch.linalg.inv(precision)
        gain = cov @ W.T / sigma**2
        tril = torch.linalg.cholesky(cov) * narrow
        self.sigma = sigma
        self.decoder = nn.ParameterDict({"W": nn.Parameter(W.clone()), "b": nn.Parameter(b.clone())})
        rows, cols = torch.tril_indices(r, r, offset=-1)
        self.register_buffer("rows", rows)
        self.register_buffer("cols", cols)
        self.encoder = nn.ParameterDict({
            "A": nn.Parameter(gain.clone()),
            "c": nn.Parameter(-gain @ b + shift),
            "log_diag": nn.Parameter(tril.diagonal().log()),
            "off": nn.Parameter(tril[rows, cols].clone()),
        })

    @property
    def theta(self) -> list[torch.Tensor]:
        return list(self.decoder.values())

    @property
    def phi(self) -> list[torch.Tensor]:
        return list(self.encoder.values())

    def scale_tril(self) -> torch.Tensor:
        e = self.encoder
        tril = torch.diag_embed(e["log_diag"].exp())
        return tril.index_put((self.rows, self.cols), e["off"])

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        W, b = self.decoder["W"], self.decoder["b"]
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(W.shape[1]), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + b, self.sigma).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder)
        e = self.encoder
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(x @ e["A"].T + e["c"], scale_tril=self.scale_tril()))

    def exact_elbo(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """The ELBO summed over ``x``, in closed form; ``scale`` weights ``log p(z)`` and the entropy,
        as :func:`~pyro_vae.infer.scale.latent_scale` weights them."""
        W, b, s2 = self.decoder["W"], self.decoder["b"], self.sigma**2
        e = self.encoder
        d, r = W.shape
        m = x @ e["A"].T + e["c"]
        L = self.scale_tril()
        S = L @ L.T
        recon = (-d / 2 * math.log(2 * math.pi * s2) - ((x - m @ W.T - b) ** 2).sum(-1) / (2 * s2)
                 - torch.trace(W @ S @ W.T) / (2 * s2))
        prior = -r / 2 * math.log(2 * math.pi) - ((m**2).sum(-1) + torch.trace(S)) / 2
        entropy = r / 2 * (1 + math.log(2 * math.pi)) + e["log_diag"].sum()
        return (recon + scale * (prior + entropy)).sum()

    def exact_elbo_gradient(self, x: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d ELBO / d theta, d ELBO / d phi)``, each flattened."""
        grads = torch.autograd.grad(self.exact_elbo(x, scale), self.theta + self.phi)
        return _flat(grads[:len(self.theta)]), _flat(grads[len(self.theta):])


def gradient_draws(loss_fn, pair: LinearGaussianPair, x: torch.Tensor, calls: int, repeats: int, seed: int = 0,
                   scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(theta, phi)`` gradient draws of the bound ``-loss_fn(model, guide, x)``, each ``(calls, P)``:
    per call the gradient on ``x`` repeated ``repeats`` times, divided by ``repeats`` (the mean of
    ``repeats`` independent draws of the gradient on ``x``)."""
    batch = x.repeat(repeats, 1)
    params = pair.theta + pair.phi
    theta, phi = [], []
    pyro.set_rng_seed(seed)
    for _ in range(calls):
        with latent_scale(scale=scale):
            loss = loss_fn(pair.model, pair.guide, batch)
        grads = torch.autograd.grad(-loss / repeats, params)
        theta.append(_flat(grads[:len(pair.theta)]))
        phi.append(_flat(grads[len(pair.theta):]))
    return torch.stack(theta), torch.stack(phi)


def z_scores(draws: torch.Tensor, expected: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per element, ``(mean of draws - expected) / standard error``; ``expected`` may itself be draws
    ``(calls, P)`` of another estimator, whose standard error then adds in quadrature."""
    mean, var = draws.mean(0), draws.var(0) / draws.shape[0]
    if expected.dim() == 2:
        mean = mean - expected.mean(0)
        var = var + expected.var(0) / expected.shape[0]
    else:
        mean = mean - expected
    return mean / var.sqrt()


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


class TwoLayerLinearGaussian(nn.Module):
    """Two latent sites with free names: ``top ~ N(0, I)``, ``bottom | top ~ N(U top, I)``,
    ``x | bottom ~ N(W bottom + b, sigma^2 I)``; the guide ``q(bottom | x) q(top | bottom)``, each a
    diagonal Gaussian with an affine mean, so ``q(top | bottom)`` depends on the other latent."""

    def __init__(self, problem: LinearGaussianProblem, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d, r = problem.W.shape

        def p(*shape, s=0.3):
            return nn.Parameter(s * torch.randn(*shape, generator=g, dtype=torch.float64))

        self.sigma = problem.sigma
        self.decoder = nn.ParameterDict({"U": p(r, r), "W": nn.Parameter(problem.W.clone()),
                                         "b": nn.Parameter(problem.b.clone())})
        self.encoder = nn.ParameterDict({"A": p(r, d), "c": p(r), "log_s1": p(r), "G": p(r, r), "h": p(r),
                                         "log_s2": p(r)})

    @property
    def theta(self) -> list[torch.Tensor]:
        return list(self.decoder.values())

    @property
    def phi(self) -> list[torch.Tensor]:
        return list(self.encoder.values())

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        d = self.decoder
        with pyro.plate("data", x.shape[0]):
            top = pyro.sample("top", dist.Normal(x.new_zeros(d["U"].shape[1]), 1.0).to_event(1))
            bottom = pyro.sample("bottom", dist.Normal(top @ d["U"].T, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(bottom @ d["W"].T + d["b"], self.sigma).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder)
        e = self.encoder
        with pyro.plate("data", x.shape[0]):
            bottom = pyro.sample("bottom", dist.Normal(x @ e["A"].T + e["c"], e["log_s1"].exp()).to_event(1))
            pyro.sample("top", dist.Normal(bottom @ e["G"].T + e["h"], e["log_s2"].exp()).to_event(1))
