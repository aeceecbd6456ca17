"""Decoders p(x | z): log-densities against closed forms and numeric integration, shapes under
particle dimensions, and the data-domain checks."""

import math

import pyro
import pytest
import torch

from pyro_vae.models.decoders import (
    ContinuousBernoulliDecoder,
    DataDomainError,
    PixelScaleGaussianDecoder,
)
from pyro_vae.models.registry import DECODERS
from pyro_vae.train.config import TrainConfig

R, D = 3, 5


@pytest.fixture(autouse=True)
def seeded():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()


def continuous_bernoulli_log_normalizer(lam: torch.Tensor) -> torch.Tensor:
    """log C(lambda) = log(2 atanh(1 - 2 lambda) / (1 - 2 lambda)) (Loaiza-Ganem & Cunningham 2019)."""
    t = 1 - 2 * lam.double()
    return torch.log(2 * torch.atanh(t) / t)


def test_continuous_bernoulli_density_integrates_to_one_and_matches_its_normalizer():
    dec = ContinuousBernoulliDecoder(R, D, hidden=[8])
    with torch.no_grad():  # logits spanning the interesting range, including lambda close to 1/2
        dec.net[-1].weight.zero_()
        dec.net[-1].bias.copy_(torch.tensor([-6.0, -1.0, 1e-3, 0.7, 5.0]))
    p = dec(torch.zeros(1, R)).base_dist
    lam = torch.sigmoid(p.logits.double())
    xs = torch.linspace(0, 1, 20001, dtype=torch.float64)
    density = p.log_prob(xs.float().unsqueeze(-1).expand(-1, D)).double().exp()  # (grid, D)
    mass = torch.trapezoid(density, xs, dim=0)
    assert torch.allclose(mass, torch.ones(D, dtype=torch.float64), atol=1e-3)
    # at x = 1 the density is C(lambda) * lambda
    at_one = p.log_prob(torch.ones(1, D)).double()
    far = (lam - 0.5).abs() > 0.01  # the closed form is 0/0 at lambda = 1/2
    expected = continuous_bernoulli_log_normalizer(lam) + lam.log()
    assert torch.allclose(at_one[far], expected[far], atol=1e-4)
    # E[x | z] is the CB mean, not lambda
    numeric_mean = torch.trapezoid(xs.unsqueeze(-1) * density, xs, dim=0)
    assert torch.allclose(dec.mean(torch.zeros(1, R)).double(), numeric_mean, atol=1e-3)
    assert not torch.allclose(dec.mean(torch.zeros(1, R)).double(), lam, atol=1e-2)


def test_continuous_bernoulli_refuses_data_outside_the_unit_interval():
    dec = ContinuousBernoulliDecoder(R, D, hidden=[8])
    dec.check_data(torch.rand(4, D))
    with pytest.raises(DataDomainError, match=r"values in \[-0.5, 1\].*continuous Bernoulli.*\[0, 1\]"):
        dec.check_data(torch.tensor([[-0.5, 0.0, 1.0, 0.2, 0.3]]))


def test_pixel_scale_gaussian_has_one_learned_scale_per_pixel():
    dec = PixelScaleGaussianDecoder(R, D, hidden=[8], sigma=0.5)
    assert isinstance(dec.log_sigma, torch.nn.Parameter) and dec.log_sigma.shape == (D,)
    assert torch.allclose(dec.sigma, torch.full((D,), 0.5))
    with torch.no_grad():
        dec.log_sigma.copy_(torch.log(torch.tensor([0.1, 0.2, 0.5, 1.0, 2.0])))
    z, x = torch.randn(4, R), torch.randn(4, D)
    mu = dec.mean(z)
    s = torch.tensor([0.1, 0.2, 0.5, 1.0, 2.0])
    closed = (-0.5 * ((x - mu) / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)).sum(-1)
    assert torch.allclose(dec(z).log_prob(x), closed, atol=1e-4)
    # the scale gets a gradient of its own per pixel
    dec(z).log_prob(x).sum().backward()
    assert dec.log_sigma.grad.shape == (D,) and (dec.log_sigma.grad != 0).all()


@pytest.mark.parametrize("name", ["bernoulli", "continuous-bernoulli", "gaussian", "gaussian-learned",
                                  "gaussian-pixel"])
def test_decoder_shapes_with_a_particle_dimension(name):
    dec = DECODERS[name](TrainConfig.from_flat(dict(latent_dim=R, hidden=[8])).model, D, 0)
    z = torch.randn(7, 4, R)  # (particles, batch, r)
    p = dec(z)
    assert p.batch_shape == (7, 4) and p.event_shape == (D,)
    x = torch.rand(4, D)
    log_p = p.log_prob(x)
    assert log_p.shape == (7, 4) and torch.isfinite(log_p).all()
    assert dec.mean(z).shape == (7, 4, D)


def test_pixel_scale_rejects_non_positive_sigma():
    with pytest.raises(ValueError, match="sigma_x must be positive, got 0.0"):
        PixelScaleGaussianDecoder(R, D, sigma=0.0)
