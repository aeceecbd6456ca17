"""Every documented part combination trains at a usable speed, or is refused with the reason.

For each prior x guide of :mod:`pyro_vae.models.registry`, with one and two
stochastic layers and ``mlp`` and ``conv`` networks, at the default sizes: a
training step on a batch of 128 digits (IWAE, K = 5, the trainer's loss and
optimizer) is timed against the step of the same model with the diagonal guide
(for the categorical pair, the normal prior with the diagonal guide),
interleaved step by step on one torch thread.  The median over rounds of the
per-round ratio must stay under :data:`MAX_RATIO`.  A combination the
configuration refuses must say why and what to use instead.

``python tests/models/test_combination_speed.py [rounds] [prior:guide ...]`` prints the table (of
the named pairs only, refused ones timed anyway, when pairs are given).
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import pyro
import pytest
import torch

from pyro_vae.data import load_dataset
from pyro_vae.models.config import ModelConfig
from pyro_vae.models.registry import GUIDES, PRIORS, build_model
from pyro_vae.train.config import TrainConfig

MAX_RATIO = 10.0
ROUNDS = 5
BATCH = 128
PARTICLES = 5


@dataclass(frozen=True)
class Combination:
    prior: str
    guide: str
    layers: int
    network: str

    def __str__(self) -> str:
        return f"{self.prior} x {self.guide}, {self.layers} layer{'s' * (self.layers > 1)}, {self.network}"

    def options(self) -> dict:
        return dict(prior=self.prior, guide=self.guide, stochastic_layers=self.layers, network=self.network)

    def reference(self) -> "Combination":
        """The same model with the diagonal guide (the normal prior's, for the categorical pair)."""
        prior = "normal" if self.prior == "categorical" else self.prior
        return Combination(prior, "diagonal", self.layers, self.network)


COMBINATIONS = [Combination(p, g, layers, network) for layers in (1, 2) for network in ("mlp", "conv")
                for p in PRIORS for g in GUIDES]


def refusal(combination: Combination, num_features: int, image_shape) -> str | None:
    """The message a refused combination raises when configured and built, else ``None``."""
    try:
        config = ModelConfig(**combination.options())
        config.validate()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_model(config, num_features, image_shape=image_shape)
    except ValueError as error:
        return str(error)
    return None


def stepper(combination: Combination, digits, run_dir) -> Callable[[], None]:
    """One training step of the trainer's loss and optimizer on a fixed batch."""
    from pyro_vae.train.trainer import Trainer

    pyro.clear_param_store()
    config = TrainConfig.from_flat(dict(data="digits", objective="iwae", particles=PARTICLES, batch_size=BATCH,
                                        run_dir=str(run_dir), progress=False, seed=0, **combination.options()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(config, dataset=digits)
    trainer.close()
    model, guide = trainer.program.model, trainer.program.guide
    x = digits.train[:BATCH]

    def step() -> None:
        loss = trainer.loss_fn(model, guide, x) / BATCH
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()

    step()  # warm-up
    return step


def step_ratio(combination: Combination, digits, tmp_path, rounds: int = ROUNDS) -> tuple[float, float, float]:
    """``(median ratio, ms per step, reference ms per step)``, the two stepping in alternation."""
    steps = {side: stepper(c, digits, tmp_path / side)
             for side, c in (("combination", combination), ("reference", combination.reference()))}
    times: dict[str, list[float]] = {side: [] for side in steps}
    for r in range(rounds):
        for side in (list(steps) if r % 2 else list(steps)[::-1]):
            start = time.perf_counter()
            steps[side]()
            times[side].append(time.perf_counter() - start)
    ratio = statistics.median(c / r for c, r in zip(times["combination"], times["reference"]))
    return ratio, 1e3 * statistics.median(times["combination"]), 1e3 * statistics.median(times["reference"])


@pytest.mark.slow
@pytest.mark.parametrize("combination", COMBINATIONS, ids=str)
def test_a_training_step_is_within_10x_of_the_diagonal_guide_or_refused(combination, digits, tmp_path,
                                                                          cpu_threads):
    torch.set_num_threads(1)
    message = refusal(combination, digits.num_features, digits.image_shape)
    if message is not None:
        assert "use --" in message or "need --" in message, f"{combination}: refused without an alternative: {message}"
        return
    if combination.reference() == combination:
        return
    ratio, ms, reference_ms = step_ratio(combination, digits, tmp_path)
    assert ratio <= MAX_RATIO, (f"{combination}: {ms:.1f} ms per step, {ratio:.1f}x the diagonal guide's "
                                f"{reference_ms:.1f} ms")


def test_vamp_with_the_iaf_guide_is_refused_with_the_reason_and_the_alternatives(digits):
    message = refusal(Combination("vamp", "iaf", 1, "mlp"), digits.num_features, digits.image_shape)
    assert message is not None
    for words in ("sequential", "--prior vamp --guide diagonal", "--prior flow --guide iaf"):
        assert words in message


if __name__ == "__main__":  # the table: python tests/models/test_combination_speed.py [rounds] [prior:guide ...]
    import tempfile
    from pathlib import Path

    from pyro_vae.models import config as model_config

    torch.set_num_threads(1)
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else ROUNDS
    named = {tuple(pair.split(":")) for pair in sys.argv[2:]}
    combinations = [c for c in COMBINATIONS if not named or (c.prior, c.guide) in named]
    for pair in named:  # time the named pairs even if the configuration refuses them
        model_config.REFUSED_PAIRS.pop(pair, None)
    data = load_dataset("digits")
    print(f"IWAE K={PARTICLES}, batch {BATCH} of the 8x8 digits, default sizes, 1 thread, {rounds} rounds\n")
    print("| prior x guide | layers | network | ms/step | diagonal guide ms/step | ratio (median of rounds) |")
    print("|---|---:|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as scratch:
        for i, c in enumerate(combinations):
            message = refusal(c, data.num_features, data.image_shape)
            if message is not None:
                print(f"| {c.prior} x {c.guide} | {c.layers} | {c.network} | refused | | {message} |", flush=True)
                continue
            ratio, ms, ref = step_ratio(c, data, Path(scratch) / str(i), rounds)
            print(f"| {c.prior} x {c.guide} | {c.layers} | {c.network} | {ms:.1f} | {ref:.1f} | {ratio:.2f} |",
                  flush=True)
