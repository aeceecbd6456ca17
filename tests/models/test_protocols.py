"""Parts as protocols: a plain ``nn.Module`` is a part, the optional hooks fall back sensibly, and a
user's part named by import path (``package.module:Name``) is built with the keyword arguments its
signature accepts, probed, and refused with its own clear error for every way it can be wrong."""

import sys

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vae.infer.objectives import make_elbo
from pyro_vae.models.config import ModelConfig
from pyro_vae.models.decoders import BernoulliDecoder
from pyro_vae.models.guides import DiagonalGaussianEncoder
from pyro_vae.models.priors import StandardNormalPrior
from pyro_vae.models.protocols import (
    DataDomainError,
    DecoderPart,
    EncoderPart,
    PriorPart,
    check_part_data,
    decoder_mean,
    part_mean,
)
from pyro_vae.models.registry import (
    PART_KWARGS,
    PROBE_BATCH,
    PartError,
    build_model,
    build_vae,
)
from pyro_vae.models.two_layer import TwoLayerVAE
from pyro_vae.models.vae import VAE

D, R = 6, 3

USER_PARTS = '''
import pyro.distributions as dist
import torch
from torch import nn

CALLS = []


class PlainDecoder(nn.Module):
    """A decoder with none of the optional hooks (no latent_dim, check_data or mean)."""

    def __init__(self, latent_dim, input_dim, hidden):
        super().__init__()
        CALLS.append(("decoder", dict(latent_dim=latent_dim, input_dim=input_dim, hidden=hidden)))
        self.net = nn.Linear(latent_dim, input_dim)

    def forward(self, z, y=None):
        return dist.Bernoulli(logits=self.net(z)).to_event(1)


class PlainGuide(nn.Module):
    def __init__(self, input_dim, latent_dim, condition_dim=0, image_shape=None, config=None, unused=7):
        super().__init__()
        CALLS.append(("guide", dict(input_dim=input_dim, latent_dim=latent_dim, condition_dim=condition_dim,
                                    image_shape=image_shape, config=config, unused=unused)))
        self.net = nn.Linear(input_dim + condition_dim, 2 * latent_dim)

    def forward(self, x, y=None):
        inputs = x if y is None else torch.cat([x, y], -1)
        loc, log_scale = self.net(inputs).chunk(2, -1)
        return dist.Normal(loc, log_scale.exp()).to_event(1)


class StudentTPrior(nn.Module):
    def __init__(self, latent_dim, encoder):
        super().__init__()
        CALLS.append(("prior", dict(latent_dim=latent_dim, encoder=type(encoder).__name__)))
        self.register_buffer("loc", torch.zeros(latent_dim))

    def forward(self, batch_size, y=None):
        return dist.StudentT(4.0, self.loc, torch.ones_like(self.loc)).expand([batch_size, self.loc.shape[0]]
                                                                           ).to_event(1)


class FixedSizePrior(nn.Module):
    """Ignores latent_dim: N(0, I_5) whatever the guide draws."""

    def forward(self, batch_size, y=None):
        return dist.Normal(torch.zeros(batch_size, 5), 1.0).to_event(1)


def make_guide(**kwargs):
    CALLS.append(("make_guide", sorted(kwargs)))
    return PlainGuide(kwargs["input_dim"], kwargs["latent_dim"], kwargs["condition_dim"])


CONSTANT = 3


def not_a_module(latent_dim):
    return {"latent_dim": latent_dim}


class Broken(nn.Module):
    def __init__(self, latent_dim):
        raise RuntimeError("no weights here")


class NeedsDepth(nn.Module):
    def __init__(self, latent_dim, depth):
        super().__init__()


class Unbatched(nn.Module):
    def __init__(self, latent_dim, input_dim):
        super().__init__()
        self.latent_dim = latent_dim

    def forward(self, x, y=None):
        return dist.Normal(torch.zeros(self.latent_dim), 1.0).to_event(1)


class ReturnsTensor(nn.Module):
    def __init__(self, latent_dim):
        super().__init__()

    def forward(self, z, y=None):
        return z


class Crashes(nn.Module):
    def __init__(self, latent_dim):
        super().__init__()

    def forward(self, z, y=None):
        raise IndexError("wrong axis")


class EventPerPixelRow(nn.Module):
    """Event shape (2, 3) instead of one flat data point of 6 features."""

    def __init__(self, latent_dim):
        super().__init__()
        self.net = nn.Linear(latent_dim, 6)

    def forward(self, z, y=None):
        logits = self.net(z)
        return dist.Bernoulli(logits=logits.reshape(*logits.shape[:-1], 2, 3)).to_event(2)
'''


@pytest.fixture(autouse=True)
def seeded():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()


@pytest.fixture
def user_parts(tmp_path, monkeypatch):
    """A module ``user_parts`` of hand-written parts on ``sys.path``, freshly imported."""
    (tmp_path / "user_parts.py").write_text(USER_PARTS)
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('configuration missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("user_parts", "raises_on_import"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import user_parts
    return user_parts


def loss_is_finite_and_differentiable(model, x, y=None, objective="trace"):
    loss = make_elbo(objective).differentiable_loss(model.model, model.guide, x, y)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_a_plain_module_decoder_without_hooks_makes_a_working_vae(user_parts):
    decoder = user_parts.PlainDecoder(R, D, [])
    assert not any(hasattr(decoder, hook) for hook in ("latent_dim", "check_data", "mean"))
    vae = VAE(StandardNormalPrior(R), DiagonalGaussianEncoder(D, R, hidden=[8]), decoder)
    x = torch.rand(5, D).round()
    loss_is_finite_and_differentiable(vae, x)
    loss_is_finite_and_differentiable(vae, x, objective="iwae")
    assert vae.latent_dim == R
    assert vae.reconstruct(x).shape == (5, D) and vae.sample(4).shape == (4, D)
    assert torch.allclose(part_mean(decoder, torch.zeros(2, R)), torch.sigmoid(decoder.net.bias).expand(2, D))
    # the data check falls back to finiteness: any finite value passes, NaN does not
    check_part_data(decoder, torch.full((2, D), 5.0))
    with pytest.raises(DataDomainError, match="training data has 1 NaN or infinite values"):
        check_part_data(decoder, torch.tensor([[0.0, float("nan")]]), "training data")
    # a part's own check still applies
    with pytest.raises(DataDomainError, match="Bernoulli decoder needs values in \\[0, 1\\]"):
        check_part_data(BernoulliDecoder(R, D, [8]), torch.full((2, D), 5.0))
    assert isinstance(decoder, DecoderPart) and isinstance(vae.prior, PriorPart)
    assert isinstance(vae.encoder, EncoderPart)


def test_latent_sizes_are_checked_where_declared_and_probed_otherwise(user_parts):
    with pytest.raises(ValueError, match="latent sizes disagree: prior 3, encoder 4"):
        VAE(StandardNormalPrior(R), DiagonalGaussianEncoder(D, 4, hidden=[8]), user_parts.PlainDecoder(R, D, []))
    undeclared = VAE(user_parts.StudentTPrior(R, None), user_parts.PlainGuide(D, R),
                     user_parts.PlainDecoder(R, D, []))
    assert undeclared.latent_dim == R  # from the prior's event shape


def test_decoder_mean_uses_the_distribution_mean_and_averages_draws_without_one():
    logits = torch.randn(2, 4, D)
    assert torch.allclose(decoder_mean(dist.Bernoulli(logits=logits).to_event(1)), torch.sigmoid(logits))
    loc = torch.randn(4, D)
    assert torch.equal(decoder_mean(dist.Normal(loc, 1.0).to_event(1)), loc)
    grid = dist.Bernoulli(logits=torch.zeros(4, 2, 3)).to_event(2)  # an event of 2 x 3 pixels comes back flat
    assert decoder_mean(grid).shape == (4, D)
    shifted = dist.TransformedDistribution(dist.Normal(loc, 1e-4).to_event(1),
                                           [dist.transforms.AffineTransform(1.0, 1.0)])
    assert torch.allclose(decoder_mean(shifted), loc + 1.0, atol=1e-3)  # no closed form: Monte Carlo


def test_import_path_parts_are_built_with_the_keyword_arguments_they_accept(user_parts):
    config = ModelConfig(prior="user_parts:StudentTPrior", guide="user_parts:PlainGuide",
                         decoder="user_parts:PlainDecoder", latent_dim=R, hidden=[8, 4], conditional=True)
    vae = build_vae(config, D, num_classes=3, image_shape=(2, 3))
    calls = dict(user_parts.CALLS)
    assert calls["guide"] == dict(input_dim=D, latent_dim=R, condition_dim=3, image_shape=(2, 3), config=config,
                                  unused=7)
    assert calls["prior"] == dict(latent_dim=R, encoder="PlainGuide")  # priors get the encoder
    assert calls["decoder"] == dict(latent_dim=R, input_dim=D, hidden=[4, 8])  # decoder order: z -> x
    x, y = torch.rand(5, D).round(), torch.tensor([0, 1, 2, 0, 1])
    loss_is_finite_and_differentiable(vae, x, y)
    assert set(PART_KWARGS) == {"input_dim", "latent_dim", "hidden", "activation", "condition_dim", "image_shape"}


def test_an_import_path_builder_function_with_var_keyword_gets_every_offered_argument(user_parts):
    vae = build_vae(ModelConfig(guide="user_parts:make_guide", latent_dim=R, hidden=[8]), D)
    assert ("make_guide", sorted([*PART_KWARGS, "config"])) in user_parts.CALLS
    loss_is_finite_and_differentiable(vae, torch.rand(4, D).round())


def test_probing_a_user_part_leaves_the_random_state_alone(user_parts):
    config = ModelConfig(guide="user_parts:PlainGuide", decoder="user_parts:PlainDecoder", latent_dim=R, hidden=[8])
    torch.manual_seed(5)
    build_vae(config, D)
    after_user_parts = torch.rand(3)
    torch.manual_seed(5)
    user_parts.PlainGuide(D, R)
    StandardNormalPrior(R)
    user_parts.PlainDecoder(R, D, [8])
    assert torch.equal(torch.rand(3), after_user_parts)  # only the weights' initialisation drew numbers


BAD_PATHS = [
    ("guide", "user_parts.PlainGuide", r"unknown guide 'user_parts.PlainGuide'; expected one of diagonal, .* or an "
                                       r"import path package.module:Name \(did you mean user_parts:PlainGuide\?\)"),
    ("guide", "user_parts:", r"--guide 'user_parts:' is not an import path: expected 'package.module:Name'"),
    ("prior", "user parts:X", r"--prior 'user parts:X' is not an import path"),
    ("decoder", "no_such_package.parts:Decoder",
     r"--decoder 'no_such_package.parts:Decoder': cannot import module 'no_such_package.parts' "
     r"\(No module named 'no_such_package'\); expected a module that is installed or on the Python path"),
    ("decoder", "raises_on_import:Decoder",
     r"importing module 'raises_on_import' failed with RuntimeError: configuration missing"),
    ("decoder", "user_parts:Missing",
     r"module 'user_parts' has no attribute 'Missing' \(its nn.Module classes: Broken, .*PlainDecoder.*\); "
     r"expected the name of a class or function that builds a decoder"),
    ("guide", "user_parts:CONSTANT", r"'CONSTANT' is a int, not callable; expected a class or function"),
    ("decoder", "user_parts:Broken",
     r"--decoder 'user_parts:Broken': building it as Broken\(latent_dim\) failed with RuntimeError: "
     r"no weights here"),
    ("decoder", "user_parts:NeedsDepth", r"cannot build it: it requires depth, which pyro-vae does not supply"),
    ("decoder", "user_parts:not_a_module",
     r"not_a_module\(latent_dim\) returned a dict; expected a torch.nn.Module"),
    ("guide", "user_parts:Unbatched",
     rf"forward\(x, y\) returned a distribution with batch shape \(\); expected \({PROBE_BATCH},\), the batch"),
    ("decoder", "user_parts:ReturnsTensor",
     r"forward\(z, y\) returned a Tensor; expected a torch.distributions.Distribution"),
    ("decoder", "user_parts:Crashes",
     rf"probing forward\(z, y\) on a batch of {PROBE_BATCH} failed with IndexError: wrong axis"),
    ("decoder", "user_parts:EventPerPixelRow",
     r"returned a distribution with event shape \(2, 3\); expected \(6,\), one flat data point"),
]


@pytest.mark.parametrize("option, value, message", BAD_PATHS, ids=[v for _, v, _ in BAD_PATHS])
def test_each_bad_import_path_gets_its_own_clear_error(user_parts, option, value, message):
    config = ModelConfig(latent_dim=R, hidden=[8], **{option: value})
    with pytest.raises(ValueError, match=message) as error:
        build_model(config, D)
    assert isinstance(error.value, PartError) == (":" in value)


def test_a_user_prior_must_agree_with_the_guide_on_the_latent(user_parts):
    with pytest.raises(PartError, match=r"prior 'user_parts:FixedSizePrior' and guide 'diagonal' disagree on "
                                        r"the latent: event shapes \(5,\) and \(3,\)"):
        build_vae(ModelConfig(prior="user_parts:FixedSizePrior", latent_dim=R, hidden=[8]), D)
    with pytest.raises(ValueError, match="unknown guide 'diagnal'; expected one of diagonal, .* or an import path"):
        build_vae(ModelConfig(guide="diagnal"), D)


def test_import_path_parts_work_in_the_two_layer_model(user_parts):
    config = ModelConfig(stochastic_layers=2, guide="user_parts:PlainGuide", decoder="user_parts:PlainDecoder",
                         prior="user_parts:StudentTPrior", latent_dim=4, top_latent_dim=2, hidden=[8],
                         top_hidden=[8])
    with pytest.raises(PartError, match=r"--prior 'user_parts:StudentTPrior': cannot build it: it requires "
                                        r"encoder"):
        build_model(config, D)  # two layers offer no encoder to a prior over z2
    model = build_model(config.replace(prior="normal"), D)
    assert isinstance(model, TwoLayerVAE)
    loss_is_finite_and_differentiable(model, torch.rand(5, D).round(), objective="iwae")
