"""Convolutional guide and decoder networks (``network="conv"``) for 8x8 digits and 28x28 MNIST:
shapes with a leading particle dimension, every guide and decoder, the VampPrior on pseudo-images,
the two-layer model, the errors without an image shape, and a few training steps on digits."""

import pyro
import pytest
import torch
from conftest import fresh
from pyro.infer import Trace_ELBO
from torch import nn

from pyro_vae.infer.objectives import make_elbo
from pyro_vae.models.config import ModelConfig
from pyro_vae.models.networks import ConvDecoderNet, ConvEncoderNet
from pyro_vae.models.registry import DECODERS, GUIDES, build_model

B, P, R = 5, 3, 4
SHAPES = [(8, 8), (28, 28), (7, 9)]  # digits, MNIST, and odd sides (cropped)


@pytest.fixture(autouse=True)
def seeded():
    fresh(0)


def pixels(shape) -> int:
    return shape[0] * shape[1]


def conv_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(network="conv", latent_dim=R, hidden=[16], flow_hidden=8, pseudo_inputs=4,
                                 num_categories=3), **overrides})


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_conv_networks_keep_leading_dimensions(shape):
    d = pixels(shape)
    encoder = ConvEncoderNet(shape, extra_features=2, out_features=7)
    decoder = ConvDecoderNet(R, shape, outputs_per_pixel=2)
    x = torch.rand(P, B, d + 2)
    out = encoder(x)
    assert out.shape == (P, B, 7)
    assert torch.allclose(out[1], encoder(x[1]), atol=1e-6)  # each particle on its own gives the same
    z = torch.randn(P, B, R)
    images = decoder(z)
    assert images.shape == (P, B, 2 * d)
    assert torch.allclose(images[2], decoder(z[2]), atol=1e-6)
    assert any(isinstance(m, nn.Conv2d) for m in encoder.modules())
    assert any(isinstance(m, nn.ConvTranspose2d) for m in decoder.modules())


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("guide", sorted(GUIDES))
def test_every_guide_takes_a_conv_network(shape, guide):
    d = pixels(shape)
    categorical = guide == "categorical"
    config = conv_config(guide=guide, prior="categorical" if categorical else "normal")
    model = build_model(config, d, image_shape=shape)
    assert any(isinstance(m, nn.Conv2d) for m in model.encoder.modules())
    x = torch.rand(B, d).round()
    q = model.encoder(x)
    assert q.batch_shape == (B,) and q.event_shape == ((R, 3) if categorical else (R,))
    loss = make_elbo("iwae", num_particles=P).differentiable_loss(model.model, model.guide, x)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_every_decoder_takes_a_conv_network(shape, decoder):
    d = pixels(shape)
    model = build_model(conv_config(decoder=decoder), d, image_shape=shape)
    assert any(isinstance(m, nn.ConvTranspose2d) for m in model.decoder.modules())
    p = model.decoder(torch.randn(P, B, R))
    assert p.batch_shape == (P, B) and p.event_shape == (d,)
    assert torch.isfinite(p.log_prob(torch.rand(B, d))).all()
    assert model.decoder.mean(torch.randn(P, B, R)).shape == (P, B, d)


def test_conditional_conv_networks_read_the_label():
    shape = (8, 8)
    model = build_model(conv_config(conditional=True), 64, num_classes=3, image_shape=shape)
    x = torch.rand(B, 64)
    c0, c1 = model.condition(torch.zeros(B, dtype=torch.long)), model.condition(torch.ones(B, dtype=torch.long))
    assert not torch.allclose(model.encoder(x, c0).mean, model.encoder(x, c1).mean)
    assert not torch.allclose(model.decoder.mean(torch.zeros(B, R), c0), model.decoder.mean(torch.zeros(B, R), c1))


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_vamp_prior_runs_the_conv_guide_on_its_pseudo_images(shape):
    d = pixels(shape)
    model = build_model(conv_config(prior="vamp"), d, image_shape=shape)
    assert model.prior.pseudo_inputs.shape == (4, d)
    z = torch.randn(P, B, R)
    assert model.prior(B).log_prob(z).shape == (P, B)
    loss = make_elbo("iwae", num_particles=P).differentiable_loss(model.model, model.guide, torch.rand(B, d).round())
    loss.backward()
    assert torch.isfinite(loss) and model.prior.pseudo_inputs.grad.abs().sum() > 0


def test_two_layers_with_conv_networks_between_x_and_z1():
    model = build_model(conv_config(stochastic_layers=2, top_latent_dim=2, top_hidden=[8]), 64, image_shape=(8, 8))
    assert any(isinstance(m, nn.Conv2d) for m in model.encoder_z1.modules())
    assert any(isinstance(m, nn.ConvTranspose2d) for m in model.decoder.modules())
    with pyro.plate("particles", P, dim=-2):
        z1 = model.guide(torch.rand(B, 64))
    assert z1.shape == (P, B, R)
    loss = make_elbo("iwae", num_particles=P).differentiable_loss(model.model, model.guide, torch.rand(B, 64))
    assert torch.isfinite(loss)


def test_conv_needs_an_image_shape_that_fits_the_data():
    with pytest.raises(ValueError, match="--network conv needs image data: this data set has no image shape"):
        build_model(conv_config(), 64)
    with pytest.raises(ValueError, match=r"image shape \(8, 8\) does not match the 60 input features"):
        build_model(conv_config(), 60, image_shape=(8, 8))
    with pytest.raises(ValueError, match="at least 4x4 pixels, got \\(3, 3\\)"):
        build_model(conv_config(), 9, image_shape=(3, 3))
    with pytest.raises(ValueError, match="network must be one of mlp, conv, got 'cnn'"):
        ModelConfig(network="cnn").validate()


def test_a_few_adam_steps_on_digits_raise_the_elbo(digits, cpu_threads):
    torch.set_num_threads(1)  # small convolutions: threads only contend
    torch.manual_seed(0)
    model = build_model(ModelConfig(network="conv", latent_dim=8), digits.num_features,
                        image_shape=digits.image_shape)
    x_test = digits.test[:200]
    elbo = Trace_ELBO(max_plate_nesting=1)

    def held_out() -> float:
        with torch.no_grad():
            return -Trace_ELBO(num_particles=10, vectorize_particles=True, max_plate_nesting=1).loss(
                model.model, model.guide, x_test) / len(x_test)

    before = held_out()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(50):
        batch = digits.train[torch.randint(len(digits.train), (32,))]
        optimizer.zero_grad()
        (elbo.differentiable_loss(model.model, model.guide, batch) / 32).backward()
        optimizer.step()
    assert held_out() > before + 8, before
