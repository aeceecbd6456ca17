"""SVI training of any model/guide pair: mini-batches, one torch optimizer, checkpoints, resume.

One step is ``loss = loss_fn(model, guide, *batch) / B`` under
:func:`~pyro_vae.infer.scale.latent_scale` (beta and KL warm-up), then
``loss.backward()`` and ``optimizer.step()`` with one fused ``torch.optim.Adam``
over all of the program's parameters (``pyro.optim`` wraps one optimizer per
parameter and is markedly slower per step).  ``loss_fn`` is the estimator's
``differentiable_loss`` or a faster estimator checked against it
(:func:`~pyro_vae.infer.fast.make_loss_fn`): this is SVI with the same
estimator; only the optimizer plumbing differs.

The program is the library's model built from the config, a user's program
named by import path in the config, or a model/guide pair handed to
:class:`Trainer` directly (:mod:`pyro_vae.train.program`).  Everything a run
needs to continue bit-for-bit is in ``checkpoint.pt``: parameters by name,
optimizer, the global and data RNG states, the position inside the epoch and
the early-stopping state.  Ctrl-C stops after the current step and saves.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pyro_vae.data import Dataset, load_dataset
from pyro_vae.infer.fast import make_loss_fn, make_optimizer
from pyro_vae.infer.objectives import analytic_kl_sites, make_elbo, warn_about_monte_carlo_kl
from pyro_vae.infer.scale import latent_scale
from pyro_vae.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pyro_vae.models.config import ModelConfig
from pyro_vae.train.config import TrainConfig
from pyro_vae.train.program import (Program, as_program, build_program, check_program_data, program_parameters,
                                    program_state, restore_program_state)
from pyro_vae.train.schedules import kl_scale_at

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
LOG_EVERY = 10  # steps between progress-bar updates and divergence checks


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; an explicit ``cuda`` without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def default_run_dir(config: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = Path(config.data).stem if config.data.endswith((".npy", ".npz")) else config.data
    return Path("runs") / f"{data}-{config.objective}-{stamp}"


@dataclass
class TrainResult:
    run_dir: Path
    program: Program
    dataset: Dataset
    history: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    stopped_early: bool = False

    @property
    def module(self):
        """The ``nn.Module`` owning the trained model/guide (the built-in models), else ``None``."""
        return self.program.module


def _rng_state(data_gen: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], data_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    data_gen.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _StopFlag:
    """First Ctrl-C asks the loop to stop after the current step; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_StopFlag":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not in the main thread: no handler, Ctrl-C behaves as usual
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("interrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def batch_args(x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The program's arguments for a batch: ``(x,)``, or ``(x, y)`` with labels."""
    return (x,) if y is None else (x, y)


@torch.no_grad()
def evaluate_loss(elbo, program: Program, x: torch.Tensor, y: torch.Tensor | None,
                  batch_size: int = 1000) -> float:
    """Mean per-point value of ``-elbo`` over ``x`` (nats), of the true model (no latent scale)."""
    total = 0.0
    for start in range(0, x.shape[0], batch_size):
        yb = None if y is None else y[start:start + batch_size]
        total += float(elbo.differentiable_loss(program.model, program.guide,
                                                *batch_args(x[start:start + batch_size], yb)))
    return total / x.shape[0]


def _make_loss_fn(elbo, program, args):  # TEMPORARY until infer.fast takes (elbo, model, guide, args)
    import inspect

    from pyro_vae.models.vae import VAE
    if "vae" in inspect.signature(make_loss_fn).parameters:
        if isinstance(program.module, VAE):
            return make_loss_fn(elbo, program.module, *args)
        return elbo.differentiable_loss
    return make_loss_fn(elbo, program.model, program.guide, args)


class Trainer:
    """Train a program on ``config.data`` into ``config.run_dir``; ``resume=True`` continues there.

    ``program`` is anything :func:`~pyro_vae.train.program.as_program` accepts (a
    ``(model, guide)`` pair, an object with ``model``/``guide``); without it the
    program is built from ``config`` (``config.program`` or ``config.model``).
    """

    def __init__(self, config: TrainConfig, program: Any = None, dataset: Dataset | None = None,
                 resume: bool = False) -> None:
        config.validate()
        self.config = config
        self.resume = resume
        self.run_dir = Path(config.run_dir) if config.run_dir else default_run_dir(config)
        if resume and not (self.run_dir / CHECKPOINT).is_file():
            raise CheckpointError(f"cannot resume: no {CHECKPOINT} in {self.run_dir}")
        if not resume and (self.run_dir / CHECKPOINT).exists():
            raise ValueError(f"{self.run_dir} already holds a run; pass --resume to continue it "
                             "or choose another --run-dir")
        self.device = resolve_device(config.device)
        self.dataset = dataset if dataset is not None else load_dataset(config.data, config.data_dir)
        torch.manual_seed(config.seed)
        self.built_in = program is None  # else: a pair given as Python objects, passed again to reopen the run
        self.program = (build_program(config, self.dataset.num_features, self.dataset.num_classes,
                                      self.dataset.image_shape) if program is None else as_program(program))
        self.program.to(self.device)
        self.x_train = self.dataset.train.to(self.device)
        self.x_valid = self.dataset.valid.to(self.device)
        for what, x in (("training data", self.x_train), ("validation data", self.x_valid)):
            check_program_data(self.program, x, f"{self.dataset.name} {what}")
        labels = config.model.conditional
        if labels and self.dataset.train_labels is None:
            raise ValueError(f"--conditional needs a labelled data set; {self.dataset.name!r} has no labels")
        self.y_train = self.dataset.train_labels.to(self.device) if labels else None
        self.y_valid = self.dataset.valid_labels.to(self.device) if labels else None
        probe = batch_args(self.x_train[:2], None if self.y_train is None else self.y_train[:2])
        self.params = program_parameters(self.program, *probe)
        self.elbo = make_elbo(config.objective, config.particles, config.alpha)
        self.valid_elbo = make_elbo("trace")
        self.steps_per_epoch = math.ceil(self.x_train.shape[0] / config.batch_size)
        # The seam where a faster, equivalent estimator plugs in (see docs/performance.md).
        self.loss_fn = _make_loss_fn(self.elbo, self.program, batch_args(self.x_train, self.y_train))
        self.optimizer = make_optimizer(list(self.params.values()), lr=config.lr)
        self.data_gen = torch.Generator(device=self.device)
        self.data_gen.manual_seed(config.seed)
        self.analytic_kl: dict[str, bool] = {}
        if config.objective == "meanfield":
            self.analytic_kl = analytic_kl_sites(self.program.model, self.program.guide, *probe)
            warn_about_monte_carlo_kl(self.analytic_kl)

    # -- state ---------------------------------------------------------------------------
    def _state(self, epoch: int, batch: int, step: int, epoch_start_rng, best: float,
               bad_epochs: int, epoch_loss: float) -> dict[str, Any]:
        return {
            "program": program_state(self.program, self.params),
            "source": self.program.source,
            "built_in": self.built_in,
            "optimizer": self.optimizer.state_dict(),
            "config": self.config.to_dict(),
            "input_dim": self.dataset.num_features,
            "num_classes": self.dataset.num_classes or 0,
            "image_shape": list(self.dataset.image_shape or []),
            "dataset": self.dataset.name,
            "epoch": epoch, "batch": batch, "step": step,
            "epoch_start_data_rng": epoch_start_rng,
            "rng": _rng_state(self.data_gen),
            "best": best, "bad_epochs": bad_epochs, "epoch_loss": epoch_loss,
            "analytic_kl": self.analytic_kl,
        }

    def _epoch_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This epoch's permutation and (dynamically binarized) inputs, drawn from the data RNG."""
        n = self.x_train.shape[0]
        perm = torch.randperm(n, generator=self.data_gen, device=self.device)
        x = self.x_train
        if self.dataset.dynamic_binarization:
            x = torch.bernoulli(x, generator=self.data_gen)
        return perm, x

    def _write_metrics(self, row: dict[str, Any]) -> None:
        with (self.run_dir / METRICS).open("a") as f:
            f.write(json.dumps(row) + "\n")

    # -- loop ----------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        start_epoch, start_batch, step = 0, 0, 0
        best, bad_epochs, resumed_loss = math.inf, 0, 0.0
        epoch_start_rng = None
        if self.resume:
            state = load_checkpoint(self.run_dir / CHECKPOINT, map_location=self.device)
            self._check_compatible(state)
            restore_program_state(self.program, self.params, state["program"])
            self.optimizer.load_state_dict(state["optimizer"])
            start_epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
            best, bad_epochs, resumed_loss = state["best"], state["bad_epochs"], state["epoch_loss"]
            epoch_start_rng = state["epoch_start_data_rng"]
            _set_rng_state(state["rng"], self.data_gen)
        result = TrainResult(self.run_dir, self.program, self.dataset)
        n, bsz = self.x_train.shape[0], cfg.batch_size
        batches = math.ceil(n / bsz)
        steps_per_epoch = self.steps_per_epoch
        with _StopFlag() as stop:
            for epoch in range(start_epoch, cfg.epochs):
                if start_batch and epoch_start_rng is not None:  # resuming inside an epoch
                    rng_now = self.data_gen.get_state()
                    self.data_gen.set_state(epoch_start_rng)
                    perm, x_epoch = self._epoch_data()
                    self.data_gen.set_state(rng_now)
                else:
                    epoch_start_rng = self.data_gen.get_state()
                    perm, x_epoch = self._epoch_data()
                    resumed_loss = 0.0
                losses: list[torch.Tensor] = []
                epoch_loss = resumed_loss
                t0 = time.perf_counter()
                bar = tqdm(range(start_batch, batches), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           disable=not cfg.progress, leave=False, dynamic_ncols=True)
                self.program.train()
                for b in bar:
                    idx = perm[b * bsz:(b + 1) * bsz]
                    xb = x_epoch[idx]
                    args = batch_args(xb, None if self.y_train is None else self.y_train[idx])
                    kl_scale = kl_scale_at(step, cfg.beta, cfg.warmup_epochs * steps_per_epoch)
                    self.program.set_progress(step, steps_per_epoch)
                    try:
                        with latent_scale(scale=kl_scale):
                            loss = self.loss_fn(self.program.model, self.program.guide, *args) / xb.shape[0]
                    except (ValueError, RuntimeError) as e:
                        # NaN parameters from an earlier, not yet checked step make distributions
                        # refuse their arguments: report the step that diverged, not this one.
                        if losses:
                            self._check_finite(torch.stack(losses), step - len(losses), epoch,
                                               b - len(losses), cause=e)
                        raise
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    step += 1
                    losses.append(loss.detach() * xb.shape[0])
                    last = b == batches - 1
                    if len(losses) >= LOG_EVERY or last or stop.requested:
                        chunk = torch.stack(losses)
                        self._check_finite(chunk, step - len(losses), epoch, b - len(losses) + 1)
                        epoch_loss += float(chunk.sum())
                        losses.clear()
                        done = min((b + 1) * bsz, n)
                        bar.set_postfix(loss=f"{epoch_loss / done:.3f}")
                    if stop.requested and not last:
                        save_checkpoint(self._state(epoch, b + 1, step, epoch_start_rng, best, bad_epochs,
                                                    epoch_loss), self.run_dir / CHECKPOINT)
                        bar.close()
                        tqdm.write(f"saved {self.run_dir / CHECKPOINT} at epoch {epoch + 1}, "
                                   f"batch {b + 1}/{batches}")
                        result.interrupted = True
                        return result
                bar.close()
                start_batch = 0
                row = self._end_of_epoch(epoch, step, epoch_loss / n, time.perf_counter() - t0)
                result.history.append(row)
                score = -row["valid_bound"]
                if score < best:
                    best, bad_epochs = score, 0
                    save_checkpoint(self._state(epoch + 1, 0, step, None, best, bad_epochs, 0.0),
                                    self.run_dir / BEST)
                else:
                    bad_epochs += 1
                save_checkpoint(self._state(epoch + 1, 0, step, None, best, bad_epochs, 0.0),
                                self.run_dir / CHECKPOINT)
                if stop.requested:
                    result.interrupted = True
                    return result
                if cfg.patience and bad_epochs >= cfg.patience:
                    tqdm.write(f"early stopping: no improvement of the validation bound for {cfg.patience} epochs")
                    result.stopped_early = True
                    break
        return result

    def _end_of_epoch(self, epoch: int, step: int, train_loss: float, seconds: float) -> dict[str, Any]:
        self.program.train(False)
        valid_elbo = -evaluate_loss(self.valid_elbo, self.program, self.x_valid, self.y_valid)
        if self.config.objective == "trace" and self.config.particles in (None, 1):
            valid_bound = valid_elbo
        else:
            valid_bound = -evaluate_loss(self.elbo, self.program, self.x_valid, self.y_valid)
        row = {
            "epoch": epoch + 1, "step": step, "train_loss": train_loss,
            "valid_elbo": valid_elbo, "valid_bound": valid_bound,
            "kl_scale": kl_scale_at(step, self.config.beta, self.config.warmup_epochs * self.steps_per_epoch),
            "seconds": seconds,
            "samples_per_s": self.x_train.shape[0] / seconds if seconds > 0 else None,
        }
        self._write_metrics(row)
        if self.config.progress:
            tqdm.write(f"epoch {epoch + 1}: train loss {train_loss:.3f}, valid ELBO {valid_elbo:.3f}"
                       + ("" if valid_bound == valid_elbo else f", valid {self.config.objective} {valid_bound:.3f}")
                       + f" nats ({seconds:.1f} s)")
        return row

    def _check_finite(self, chunk: torch.Tensor, first_step: int, epoch: int, first_batch: int,
                      cause: BaseException | None = None) -> None:
        finite = torch.isfinite(chunk)
        if bool(finite.all()):
            return
        bad = int((~finite).nonzero()[0])
        raise TrainingDiverged(
            f"loss became {float(chunk[bad])} at step {first_step + bad + 1} "
            f"(epoch {epoch + 1}, batch {first_batch + bad + 1}); training stopped. The last good "
            f"checkpoint is kept in {self.run_dir / CHECKPOINT}; try a smaller --lr"
        ) from cause

    def _check_compatible(self, state: dict[str, Any]) -> None:
        if state["input_dim"] != self.dataset.num_features:
            raise CheckpointError(
                f"checkpoint expects {state['input_dim']} features but {self.dataset.name} has "
                f"{self.dataset.num_features}"
            )
        # Everything that changes the program, the objective or the sequence of batches.
        shaping = sorted(ModelConfig.field_names() | {"program", "objective", "particles", "alpha", "data", "seed",
                                                      "batch_size"})
        saved, now = TrainConfig.from_dict(state["config"]).to_flat(), self.config.to_flat()
        changed = [k for k in shaping if saved.get(k) != now.get(k)]
        if changed:
            raise CheckpointError(
                "cannot resume with a different " + ", ".join(
                    f"{k} (checkpoint {saved.get(k)!r}, now {now.get(k)!r})" for k in changed)
            )


def train(config: TrainConfig | None = None, program: Any = None, dataset: Dataset | None = None,
          resume: bool = False) -> TrainResult:
    """Train ``program`` (default: the model ``config`` describes) as ``config`` says; see :class:`Trainer`.

    >>> result = train(TrainConfig(epochs=1, progress=False), program=(model, guide))  # doctest: +SKIP
    """
    return Trainer(config or TrainConfig(), program=program, dataset=dataset, resume=resume).fit()
