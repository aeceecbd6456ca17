"""Every gradient estimator through ``pyro-vae train --objective NAME``: the built-in VAE, a user's
plain model/guide functions and the two-stochastic-layer VAE; bad options refused by name."""

import json

import pytest
import torch

import pyro_vae.evaluation.pictures as pictures
from pyro_vae.cli.main import main
from pyro_vae.train.config import TrainConfig
from pyro_vae.train.memory import TooLarge
from pyro_vae.train.trainer import Trainer

ESTIMATORS = ("iwae-dreg", "stl", "miwae", "ciwae", "piwae")
TINY = ["--epochs", "1", "--latent-dim", "2", "--hidden", "8", "--batch-size", "512", "--no-progress"]
PROGRAMS = {
    "built-in VAE": [],
    "plain functions": ["--program", "user_programs"],
    "two stochastic layers": ["--stochastic-layers", "2", "--top-latent-dim", "2", "--top-hidden", "8"],
}
OPTIONS = {"miwae": ["--particles", "2", "--groups", "3"], "piwae": ["--particles", "2", "--groups", "2"],
           "ciwae": ["--ciwae-beta", "0.3"], "iwae-dreg": ["--particles", "3"], "stl": []}


@pytest.fixture(autouse=True)
def no_pictures(monkeypatch):
    """The pictures at the end of training are tested elsewhere; here they only cost time."""
    monkeypatch.setattr(pictures, "write_run_pictures", lambda run_dir: [])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("program", list(PROGRAMS))
@pytest.mark.parametrize("objective", ESTIMATORS)
def test_every_estimator_trains_every_kind_of_program_from_the_cli(objective, program, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--objective", objective, *OPTIONS[objective], *PROGRAMS[program], *TINY,
                 "--run-dir", str(run)]) == 0
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["valid_bound"] < 0 and row["valid_elbo"] < 0  # nats per point of a log-density bound
    if objective in ("miwae", "ciwae", "piwae", "iwae-dreg"):
        assert row["valid_bound"] != row["valid_elbo"]
    saved = json.loads((run / "config.json").read_text())
    assert saved["objective"] == objective
    if objective in ("miwae", "piwae"):
        assert saved["groups"] == int(OPTIONS[objective][3])
    assert "warning" not in capsys.readouterr().err  # e.g. no fallback to a slower estimator


@pytest.mark.parametrize("argv,message", [
    (["--objective", "trace", "--groups", "4"], "groups applies to objectives miwae and piwae only; got groups=4 "
                                                 "with objective 'trace'"),
    (["--objective", "iwae", "--ciwae-beta", "0.3"], "ciwae_beta applies to objective 'ciwae' only; got "
                                                      "ciwae_beta=0.3 with objective 'iwae' (the beta-VAE weight "
                                                      "is beta)"),
    (["--objective", "ciwae", "--ciwae-beta", "1.5"], "ciwae_beta must be a number in [0, 1], got 1.5"),
    (["--objective", "stl", "--alpha", "0.5"], "alpha applies to objective 'renyi' only; got alpha=0.5 with "
                                               "objective 'stl'"),
    (["--objective", "iwae-dreg", "--alpha", "0.5"], "iwae-dreg is the IWAE bound, alpha=0; got alpha=0.5 "
                                                     "(use --objective renyi)"),
])
def test_bad_options_are_refused_in_one_line_naming_the_value(argv, message, tmp_path, capsys):
    assert main(["train", *argv, *TINY, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"pyro-vae train: error: {message}"
    assert not (tmp_path / "run").exists()


def test_a_bad_group_count_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--objective", "miwae", "--groups", "0"])
    assert exc.value.code == 2
    assert "--groups: expected a positive integer, got 0" in capsys.readouterr().err


def test_the_trainer_counts_every_draw_of_miwae_and_piwae(tmp_path, digits):
    config = TrainConfig.from_flat(dict(objective="piwae", particles=4, groups=3, latent_dim=2, hidden=[8],
                                        progress=False, run_dir=str(tmp_path / "run")))
    trainer = Trainer(config, dataset=digits)
    try:
        assert trainer.particles == 12
        assert (trainer.elbo.num_particles, trainer.elbo.groups) == (12, 3)
    finally:
        trainer.close()
    with pytest.raises(TooLarge, match="particles 300000000 x batch_size"):
        Trainer(config.replace(objective="miwae", particles=100_000_000, run_dir=str(tmp_path / "big")),
                dataset=digits)


def test_a_program_the_estimator_cannot_read_is_refused_before_training(tmp_path, digits):
    import pyro
    import pyro.distributions as dist

    def model(x):
        with pyro.plate("data", x.shape[0]):
            flip = pyro.sample("flip", dist.Bernoulli(x.new_full((x.shape[0],), 0.5)))
            pyro.sample("x", dist.Normal(flip.unsqueeze(-1).expand(*flip.shape, x.shape[-1]), 1.0).to_event(1), obs=x)

    def guide(x):
        p = pyro.param("p", torch.tensor(0.5), constraint=dist.constraints.unit_interval)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("flip", dist.Bernoulli(p.expand(x.shape[0])))

    pyro.clear_param_store()
    config = TrainConfig.from_flat(dict(objective="iwae-dreg", progress=False, run_dir=str(tmp_path / "run")))
    with pytest.raises(ValueError, match="^DReG_IWAE_ELBO cannot train this program: guide site 'flip' is not "
                                         "reparameterized$"):
        Trainer(config, program=(model, guide), dataset=digits)
    assert not (tmp_path / "run").exists()
