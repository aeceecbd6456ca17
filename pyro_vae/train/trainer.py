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
the early-stopping state.

Robustness of a run directory (:mod:`pyro_vae.train.rundir`): a default run
directory gets a unique name; the directory is locked while a trainer writes
it; Ctrl-C, SIGTERM, SIGHUP, SIGUSR1/2 and SIGXCPU stop after the current step and save;
checkpoints are also written inside an epoch every ``checkpoint_every``
seconds or ``checkpoint_every_steps`` steps, so a kill loses at most that
much; ``max_steps`` pauses a run after that many optimizer steps in all, with
the same checkpoint a stop signal writes, so a run can be trained in pieces of
any length (a schedule of learning rates in steps, say); resuming truncates
``metrics.jsonl`` to the checkpoint and removes the temporary files a killed
save left.  A resumed run may change only
:data:`~pyro_vae.train.config.RESUMABLE` options, and its data must be the data
it was trained on (:func:`~pyro_vae.train.integrity.data_fingerprint`).

Launched as several processes (``torchrun``), the run is data-parallel
(:mod:`pyro_vae.train.distributed`, docs/distributed.md): every rank scores its
slice of each global batch, the gradients are summed over ranks before each
step, and rank 0 alone writes the run directory.  One process runs no
collective at all.
"""

from __future__ import annotations

import json
import math
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from pyro_vae.data import Dataset, load_dataset
from pyro_vae.infer.fast import make_loss_fn, make_optimizer
from pyro_vae.infer.objectives import (analytic_kl_sites, draws_per_point, make_elbo,
                                       warn_about_monte_carlo_kl)
from pyro_vae.infer.scale import latent_scale
from pyro_vae.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pyro_vae.train.config import RESUMABLE, TrainConfig, check_device_name
from pyro_vae.train.distributed import WorldSizeChangedWarning, join, rank_seed, shard_bounds
from pyro_vae.train.integrity import check_data_fingerprint, data_fingerprint
from pyro_vae.train.memory import check_fits, check_num_classes, model_parts, step_floats_per_pair
from pyro_vae.train.program import (Program, ProgramError, as_program, build_program, check_program_data,
                                    fresh_program_parameters, program_state, restore_program_state)
from pyro_vae.train.rundir import (RunDirError, RunLock, check_run_dir_usable, create_unique_run_dir, read_metrics,
                                   remove_stale_temporaries, share_file, write_atomic, write_status)
from pyro_vae.train.schedules import kl_scale_at

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
LOG_EVERY = 10  # steps between progress-bar updates and divergence checks
#: Signals that stop training after the current step, with a checkpoint (SIGKILL cannot be caught).
#: SIGUSR1/SIGUSR2 and SIGXCPU are what batch schedulers send ahead of a time or CPU limit.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGXCPU")
                     if hasattr(signal, name))
#: Data magnitudes beyond this are named as the likely cause when a model cannot score the data.
DATA_PEAK = 1e4
#: Validation never scores more than this many (point, particle) pairs at once.
VALID_PAIRS = 1000


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint (if any) is kept."""


class Stopped(KeyboardInterrupt):
    """A stop signal that aborts at once (a second one during training, or one outside the training
    loop under the command line): unwinds like Ctrl-C, so temporary files are removed and locks
    released on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


#: Stop signals whose :class:`Stopped` may have been lost.  An exception raised by a signal handler
#: surfaces wherever Python happens to be, and C code there can clear it (an extension module that
#: is being imported, for one, swallows errors of its optional set-up steps); so
#: :func:`stop_at_once` also records the signal, and the training loop looks before it starts.
_pending_stops: list[int] = []


def stop_at_once(signum: int, frame: Any = None) -> None:
    """Signal handler outside the training loop: raise :class:`Stopped`, and remember the signal
    in case the exception is lost on its way out."""
    _pending_stops.append(signum)
    raise Stopped(signum)


def forget_pending_stops() -> None:
    """The stops recorded so far have been handled (their :class:`Stopped` reached its handler)."""
    _pending_stops.clear()


def raise_pending_stop() -> None:
    """Raise :class:`Stopped` for a stop signal whose exception was lost before it unwound."""
    if _pending_stops:
        signum = _pending_stops[-1]
        _pending_stops.clear()
        raise Stopped(signum)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; an explicit device that is not there is an error."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but there are only {torch.cuda.device_count()} CUDA "
                             f"device(s): cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r} requested but MPS is not available; use --device cpu")
    return device


def run_stem(config: TrainConfig) -> str:
    """``DATA-OBJECTIVE``: the start of a default run directory's name."""
    data = Path(config.data).stem if config.data.endswith((".npy", ".npz")) else config.data
    return f"{data}-{config.objective}"


def default_run_dir(config: TrainConfig, parent: str | Path = "runs") -> Path:
    """Create a new, uniquely named run directory ``runs/DATA-OBJECTIVE-TIME-XXXXXX``."""
    return create_unique_run_dir(parent, run_stem(config))


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns: the run directory, the trained program and its data, one
    metrics row per epoch trained now, and how training ended (finished, interrupted by a signal,
    paused at ``max_steps``, stopped early, or nothing left to do on resume)."""

    run_dir: Path
    program: Program
    dataset: Dataset
    history: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    reached_max_steps: bool = False  # paused at config.max_steps: resume with a larger one to train on
    stopped_early: bool = False
    signal: int | None = None  # the signal that interrupted training
    position: tuple[int, int, int] | None = None  # (epoch, batch, step) of the last checkpoint written
    nothing_to_do: str | None = None  # why a resumed run had nothing left to train

    @property
    def module(self):
        """The ``nn.Module`` owning the trained model/guide (the built-in models), else ``None``."""
        return self.program.module


def _rng_state(data_gen: torch.Generator, device: torch.device | None = None) -> dict[str, Any]:
    """The generators' states: every CUDA device's, or with ``device`` (a rank of a distributed run)
    only that device's, by device index (a rank touches no other GPU)."""
    state = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
    if device is None:
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
    elif device.type == "cuda":
        state["cuda"] = {device.index: torch.cuda.get_rng_state(device)}
    return state


def _set_rng_state(state: dict[str, Any], data_gen: torch.Generator | None,
                   device: torch.device | None = None) -> None:
    """Put back a :func:`_rng_state` (without ``data_gen``: the data generator as it is); with
    ``device``, of the CUDA generators only that device's, when the state has it."""
    torch.set_rng_state(state["torch"])
    if data_gen is not None:
        data_gen.set_state(state["data"])
    if "cuda" not in state or not torch.cuda.is_available():
        return
    cuda = state["cuda"]
    if device is None:
        if isinstance(cuda, dict):
            for index, value in cuda.items():
                if index < torch.cuda.device_count():
                    torch.cuda.set_rng_state(value, index)
        else:
            torch.cuda.set_rng_state_all(cuda)
    elif device.type == "cuda":
        own = cuda if torch.is_tensor(cuda) else (cuda.get(device.index) if isinstance(cuda, dict) else
                                                   cuda[device.index] if device.index < len(cuda) else None)
        if own is not None:
            torch.cuda.set_rng_state(own, device)


def _sampling_rng_state(step: int, device: torch.device) -> dict[str, Any]:
    """This rank's own generators (not the shared data generator), tagged with the step."""
    state: dict[str, Any] = {"step": step, "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


class _StopFlag:
    """The first stop signal (:data:`STOP_SIGNALS`: Ctrl-C, SIGTERM, ...) asks the loop to stop after
    the current step and save; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        raise_pending_stop()
        for signum in STOP_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except (ValueError, OSError):  # not in the main thread: signals behave as usual
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise Stopped(signum)
        self.requested, self.signum = True, signum
        tqdm.write(f"{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                   "(send it again to abort without saving)")

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


def batch_args(x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The program's arguments for a batch: ``(x,)``, or ``(x, y)`` with labels."""
    return (x,) if y is None else (x, y)


@torch.no_grad()
def evaluate_loss(loss_fn: Callable[..., torch.Tensor], program: Program, x: torch.Tensor,
                  y: torch.Tensor | None, batch_size: int = 1000) -> float:
    """Mean per-point loss over ``x`` (nats) in batches: ``loss_fn(model, guide, *batch)`` is a
    sum over the batch, as an estimator's ``differentiable_loss`` or the trainer's ``loss_fn``;
    of the true model (no latent scale).  The batches' sums stay on the device; one read at the end."""
    total = None
    for start in range(0, x.shape[0], batch_size):
        yb = None if y is None else y[start:start + batch_size]
        loss = loss_fn(program.model, program.guide, *batch_args(x[start:start + batch_size], yb)).detach()
        total = loss if total is None else total + loss
    return float(total) / x.shape[0]


class Trainer:
    """Train a program on ``config.data`` into ``config.run_dir``; ``resume=True`` continues there.

    ``program`` is anything :func:`~pyro_vae.train.program.as_program` accepts (a
    ``(model, guide)`` pair, an object with ``model``/``guide``); without it the
    program is built from ``config`` (``config.program`` or ``config.model``).
    The run directory is locked from construction until :meth:`fit` returns (or
    until :meth:`close`, with ``keep_lock=True``).  In a distributed run (a
    ``torchrun`` launch, or a process group initialized by the caller) every
    process builds a Trainer; rank 0 makes and locks the run directory.
    """

    def __init__(self, config: TrainConfig, program: Any = None, dataset: Dataset | None = None,
                 resume: bool = False, keep_lock: bool = False) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__} {config!r:.60}")
        if dataset is not None and not isinstance(dataset, Dataset):
            raise TypeError(f"dataset must be a pyro_vae.data.Dataset (or None, to load config.data), got "
                            f"{type(dataset).__name__} {dataset!r:.60}")
        config.validate()
        self.config = config
        self.resume = resume
        self.keep_lock = keep_lock
        self.lock: RunLock | None = None
        self._closed = False
        self.world = join(resolve_device(config.device), config.device)
        self.device = self.world.device
        self.run_dir, created = self.world.share(self._claim_run_dir)
        created = created and self.world.is_main
        try:
            self._setup(program, dataset)
        except BaseException:
            self.close()
            if created:  # leave no empty directory behind a run that never started
                for leftover in (self.run_dir / ".lock",):
                    leftover.unlink(missing_ok=True)
                try:
                    self.run_dir.rmdir()
                except OSError:
                    pass
            raise

    def _claim_run_dir(self) -> tuple[Path, bool]:
        """The run directory, made (a default one gets a unique name) and locked; and whether it
        was made here.  Rank 0's work in a distributed run."""
        config, resume = self.config, self.resume
        created = False
        if config.run_dir:
            self.run_dir = Path(config.run_dir)
            if resume and not self.run_dir.is_dir():
                raise CheckpointError(f"cannot resume: run directory {self.run_dir} does not exist")
            if not resume:
                check_run_dir_usable(self.run_dir)
            created = not self.run_dir.exists()
        elif resume:
            raise CheckpointError("cannot resume without a run directory: set run_dir to the run to continue")
        else:
            try:
                self.run_dir, created = default_run_dir(config), True
            except OSError as e:
                raise RunDirError(f"cannot create a run directory under runs/: {e.strerror or e}; choose one with "
                                  "--run-dir") from None
        try:
            self.lock = RunLock(self.run_dir).acquire()
        except OSError as e:
            raise RunDirError(f"cannot create or lock run directory {self.run_dir}: {e.strerror or e}; choose "
                              "another --run-dir") from None
        return self.run_dir, created

    def _setup(self, program: Any, dataset: Dataset | None) -> None:
        config = self.config
        self.state: dict[str, Any] | None = self.world.share(self._read_checkpoint)
        if self.state is not None:
            self._check_resumable(self.state, program)
        self.dataset = dataset if dataset is not None else load_dataset(config.data, config.data_dir)
        self.data_fingerprint = data_fingerprint(self.dataset)
        if self.state is not None:
            if self.state["input_dim"] != self.dataset.num_features:
                raise CheckpointError(f"checkpoint expects {self.state['input_dim']} features but "
                                      f"{self.dataset.name} has {self.dataset.num_features}")
            check_data_fingerprint(self.state.get("data_fingerprint"), self.dataset, f"the run in {self.run_dir}",
                                   flag="")
        labels = config.model.conditional
        if labels and self.dataset.train_labels is None:
            raise ValueError(f"--conditional needs a labelled data set; {self.dataset.name!r} has no labels")
        if labels:
            check_num_classes(self.dataset.num_classes, f"data set {self.dataset.name!r}")
        self._check_memory(program is None)
        torch.manual_seed(config.seed)
        self.built_in = program is None  # else: a pair given as Python objects, passed again to reopen the run
        self.program = (build_program(config, self.dataset.num_features, self.dataset.num_classes,
                                      self.dataset.image_shape) if program is None else as_program(program))
        self.program.to(self.device)
        self.x_train = self.dataset.train.to(self.device)
        self.x_valid = self.dataset.valid.to(self.device)
        for what, x in (("training data", self.x_train), ("validation data", self.x_valid)):
            check_program_data(self.program, x, f"{self.dataset.name} {what}")
        self.y_train = self.dataset.train_labels.to(self.device) if labels else None
        self.y_valid = self.dataset.valid_labels.to(self.device) if labels else None
        self.num_valid = self.x_valid.shape[0]
        if self.world.distributed:
            self._check_shardable()
            lo, hi = shard_bounds(self.num_valid, self.world.rank, self.world.size)
            self.x_valid = self.x_valid[lo:hi]  # each rank validates its shard; the bounds are reduced
            self.y_valid = None if self.y_valid is None else self.y_valid[lo:hi]
        probe = batch_args(self.x_train[:2], None if self.y_train is None else self.y_train[:2])
        self.elbo = make_elbo(config.objective, config.particles, config.alpha, groups=config.groups,
                              ciwae_beta=config.ciwae_beta)
        self.steps_per_epoch = math.ceil(self.x_train.shape[0] / config.batch_size)
        try:
            self.params = fresh_program_parameters(self.program, *probe,
                                                   warn_replaced=not self.built_in and not self.resume)
            # The seam where a faster, equivalent estimator plugs in (see docs/performance.md).
            self.loss_fn = make_loss_fn(self.elbo, self.program.model, self.program.guide,
                                        batch_args(self.x_train, self.y_train))
            # The validation ELBO (single-sample Trace_ELBO) through its faster, checked form too.
            self.valid_elbo_fn = self.loss_fn if self._trains_on_the_elbo else make_loss_fn(
                make_elbo("trace"), self.program.model, self.program.guide, batch_args(self.x_valid, self.y_valid))
        except Exception as e:
            self._explain_first_run(e)
            raise
        self.optimizer = make_optimizer(list(self.params.values()), lr=config.lr)
        self.data_gen = torch.Generator(device=self.device)
        self.data_gen.manual_seed(config.seed)
        self.analytic_kl: dict[str, bool] = {}
        if config.objective == "meanfield":
            self.analytic_kl = analytic_kl_sites(self.program.model, self.program.guide, *probe)
            warn_about_monte_carlo_kl(self.analytic_kl)
        self._saved: tuple[int, int] | None = None  # (epoch, batch) of the newest checkpoint on disk
        if self.state is not None:
            self._saved = (self.state["epoch"], self.state["batch"])
        if self.world.rank > 0:  # rank 0 keeps the config's seed, so one process draws what it always drew
            torch.manual_seed(rank_seed(config.seed, self.world.rank))

    def _read_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint to resume from (``None`` for a new run), refusing to overwrite a run."""
        if self.resume:
            if not (self.run_dir / CHECKPOINT).is_file():
                raise CheckpointError(f"cannot resume: no {CHECKPOINT} in {self.run_dir}")
            return load_checkpoint(self.run_dir / CHECKPOINT, map_location="cpu")
        if (self.run_dir / CHECKPOINT).exists():
            raise ValueError(f"{self.run_dir} already holds a run; pass --resume to continue it "
                             "or choose another --run-dir")
        return None

    def _check_shardable(self) -> None:
        """Every rank needs a share of each global batch and of the validation set."""
        world = self.world.size
        if self.config.batch_size < world:
            raise ValueError(f"--batch-size {self.config.batch_size} is smaller than the {world} processes of this "
                             "run; --batch-size is the global batch, split across them: use at least "
                             f"--batch-size {world}, or fewer processes")
        for split, n in (("training", self.x_train.shape[0]), ("validation", self.num_valid)):
            if n < world:
                raise ValueError(f"the {split} set of {self.dataset.name} has {n} points, fewer than the {world} "
                                 "processes of this run; use fewer processes")

    def _explain_first_run(self, error: BaseException) -> None:
        """When the program cannot even run on the data and the data explain why, say so; when a
        user's program raises on its first run, name the program."""
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        peak = float(self.x_train.abs().max())
        if peak > DATA_PEAK:
            raise ValueError(f"the model cannot be run on {self.dataset.name}: its training data reach |x| = "
                             f"{peak:g}, and values this large overflow float32 inside the networks ({first}); "
                             "standardize or rescale the data") from None
        if (not self.built_in or self.config.program) and not isinstance(error, ValueError):
            raise ProgramError(f"program {self.program.name} failed on its first run, on 2 points of "
                               f"{self.dataset.name}: {type(error).__name__}: {first}") from error

    @property
    def _trains_on_the_elbo(self) -> bool:
        """The training objective is the single-sample ELBO, so the validation bound is the validation ELBO."""
        return self.config.objective == "trace" and self.config.particles in (None, 1)

    @property
    def particles(self) -> int:
        """Draws per data point of one step (``groups`` x ``particles`` for miwae/piwae)."""
        return draws_per_point(self.config.objective, self.config.particles, self.config.groups)

    def _check_memory(self, built_in: bool) -> None:
        """Refuse a model or a step that cannot fit, before allocating it."""
        cfg, d = self.config, self.dataset.num_features
        k, b = self.particles, min(cfg.batch_size, self.dataset.train.shape[0])
        m = cfg.model
        if built_in and not cfg.program:
            classes = (self.dataset.num_classes or 0) if m.conditional else 0
            parts = model_parts(m, d, classes, self.dataset.image_shape)
            largest = max(parts, key=parts.get)
            # weights, gradients and Adam's two moments: 4 float32 copies
            check_fits(16.0 * sum(parts.values()), f"the model, mostly its {largest},",
                       "choose smaller sizes", self.device)
            per_pair = step_floats_per_pair(m, d, self.dataset.image_shape)
        else:
            per_pair = 3 * d
        check_fits(4.0 * k * b * per_pair,
                   f"one training step of particles {k} x batch_size {b} x {d} features",
                   "lower --particles or --batch-size", self.device)

    def close(self) -> None:
        """Release the run directory's lock (idempotent)."""
        self._closed = True
        if self.lock is not None:
            self.lock.release()

    def __del__(self) -> None:
        lock = getattr(self, "lock", None)
        if lock is not None:
            lock.release()

    # -- state ---------------------------------------------------------------------------
    def _state(self, epoch: int, batch: int, step: int, epoch_start_rng, best: float,
               bad_epochs: int, epoch_loss: float, stopped_early: bool = False) -> dict[str, Any]:
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
            "data_fingerprint": self.data_fingerprint,
            "device": self.device.type,
            "epoch": epoch, "batch": batch, "step": step,
            "epoch_start_data_rng": epoch_start_rng,
            "rng": _rng_state(self.data_gen, self.device if self.world.distributed else None),
            "world_size": self.world.size,
            "best": best, "bad_epochs": bad_epochs, "epoch_loss": epoch_loss,
            "stopped_early": stopped_early,
            "analytic_kl": self.analytic_kl,
        }

    def _save(self, path: Path, epoch: int, batch: int, step: int, *args: Any, **kwargs: Any) -> None:
        if self.world.distributed:
            # Every rank's own generators, gathered at this step, go into rank 0's checkpoint; a rank
            # that died makes the gather fail, and nothing is written.
            ranks = self.world.gather_objects(_sampling_rng_state(step, self.device))
            self.world.share(lambda: self._write_checkpoint(path, ranks, epoch, batch, step, *args, **kwargs))
        else:
            save_checkpoint(self._state(epoch, batch, step, *args, **kwargs), path)
        if path.name == CHECKPOINT:
            self._saved = (epoch, batch)

    def _write_checkpoint(self, path: Path, ranks: list[dict[str, Any]] | None, *args: Any, **kwargs: Any) -> None:
        """Rank 0: write the checkpoint with every rank's generators, all of the same step."""
        state = self._state(*args, **kwargs)
        steps = sorted({r["step"] for r in ranks})
        if steps != [state["step"]]:
            raise RuntimeError(f"the ranks are at steps {steps}, not all at step {state['step']}; no checkpoint "
                               "was written")
        state["rank_rng"] = [{k: v for k, v in r.items() if k != "step"} for r in ranks]
        save_checkpoint(state, path)

    def _epoch_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This epoch's permutation and (dynamically binarized) inputs, drawn from the data RNG."""
        n = self.x_train.shape[0]
        perm = torch.randperm(n, generator=self.data_gen, device=self.device)
        x = self.x_train
        if self.dataset.dynamic_binarization:
            x = torch.bernoulli(x, generator=self.data_gen)
        return perm, x

    def _write_metrics(self, row: dict[str, Any]) -> None:
        if not self.world.is_main:
            return
        with (self.run_dir / METRICS).open("a") as f:
            f.write(json.dumps(row) + "\n")

    def _truncate_metrics(self, epochs_done: int) -> None:
        """Keep the rows of the epochs a checkpoint covers, each once, and drop a torn last line
        or any other line that is not a row of metrics (:func:`~pyro_vae.train.rundir.read_metrics`)."""
        rows, _ = read_metrics(self.run_dir / METRICS)
        write_atomic(self.run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in rows if r["epoch"] <= epochs_done))

    def _status(self, state: str, epoch: int, **extra: Any) -> None:
        if not self.world.is_main:
            return
        write_status(self.run_dir, state, epoch=epoch, epochs=self.config.epochs, **extra)

    # -- loop ----------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to ``config.epochs`` (or until ``config.max_steps``, early stopping, a stop signal or
        divergence)."""
        if self._closed or (self.world.is_main and (self.lock is None or not self.lock.held)):
            raise RuntimeError("this Trainer was closed; build a new one to train again")
        try:
            result = self._fit()
            self.world.finished()
            return result
        except TrainingDiverged:
            self._status("diverged", self._saved[0] if self._saved else 0)
            raise
        except BaseException as e:  # a crash or a second stop signal: say so where compare looks
            if self.run_dir.is_dir():
                try:
                    self._status("aborted" if isinstance(e, KeyboardInterrupt) else "failed",
                                 self._saved[0] if self._saved else 0, error=f"{type(e).__name__}: {e}"[:500])
                except OSError:
                    pass
            raise
        finally:
            if not self.keep_lock:
                self.close()

    def _fit(self) -> TrainResult:
        cfg, world = self.config, self.world
        world.share(self._open_run_dir)
        result = TrainResult(self.run_dir, self.program, self.dataset)
        start_epoch, start_batch, step = 0, 0, 0
        best, bad_epochs, resumed_loss = math.inf, 0, 0.0
        epoch_start_rng = None
        if self.state is not None:
            state = self.state
            done = self._nothing_to_do(state)
            if done:
                result.nothing_to_do = done
                return result
            restore_program_state(self.program, self.params, state["program"])
            self.optimizer.load_state_dict(state["optimizer"])
            for group in self.optimizer.param_groups:  # the learning rate is the config's, not the checkpoint's
                group["lr"] = cfg.lr
            start_epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
            best, bad_epochs, resumed_loss = state["best"], state["bad_epochs"], state["epoch_loss"]
            epoch_start_rng = state["epoch_start_data_rng"]
            _set_rng_state({k: v.to("cpu") if isinstance(v, torch.Tensor) else v for k, v in state["rng"].items()},
                           self.data_gen, self.device if world.distributed else None)
            if world.distributed or state.get("world_size", 1) != 1:
                self._restore_rank_rng(state)
            world.share(lambda: self._truncate_metrics(start_epoch))
            self.state = None  # free it
        else:
            world.share(lambda: write_atomic(self.run_dir / METRICS, ""))
        world.share(lambda: write_atomic(self.run_dir / CONFIG, json.dumps(cfg.to_dict(), indent=2) + "\n"))
        if world.distributed:  # one set of parameters: rank 0's
            world.broadcast_tensors(list(self.params.values()) + self._module_buffers())
        self._status("training", start_epoch)
        n, bsz = self.x_train.shape[0], cfg.batch_size
        batches = math.ceil(n / bsz)
        steps_per_epoch = self.steps_per_epoch
        params = list(self.params.values())
        last_save = time.monotonic()
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
                           disable=not (cfg.progress and world.is_main), leave=False, dynamic_ncols=True)
                self.program.train()
                for b in bar:
                    idx = perm[b * bsz:(b + 1) * bsz]
                    size = idx.shape[0]  # the global batch: every rank's loss is normalised by it
                    if world.distributed:
                        lo, hi = shard_bounds(size, world.rank, world.size)
                        idx = idx[lo:hi]
                    xb = x_epoch[idx]
                    args = batch_args(xb, None if self.y_train is None else self.y_train[idx])
                    kl_scale = kl_scale_at(step, cfg.beta, cfg.warmup_epochs * steps_per_epoch)
                    self.program.set_progress(step, steps_per_epoch)
                    if xb.shape[0]:
                        try:
                            with latent_scale(scale=kl_scale):
                                loss = self.loss_fn(self.program.model, self.program.guide, *args) / size
                        except (ValueError, RuntimeError) as e:
                            # NaN parameters from an earlier, not yet checked step make distributions
                            # refuse their arguments: report the step that diverged, not this one.
                            if losses:
                                self._check_finite(torch.stack(losses), step - len(losses), epoch,
                                                   b - len(losses), cause=e)
                            if step and not self._parameters_finite():
                                raise self._diverged("the parameters became NaN or infinite", step, epoch, b,
                                                     first_step=False) from e
                            raise
                    else:  # this rank's share of a short last batch is empty
                        loss = torch.zeros((), device=self.device)
                    self.optimizer.zero_grad(set_to_none=True)
                    if xb.shape[0]:
                        loss.backward()
                    if world.distributed:
                        world.all_reduce_gradients(params)
                    self.optimizer.step()
                    step += 1
                    losses.append(loss.detach() * size)
                    last = b == batches - 1
                    at_limit = bool(cfg.max_steps) and step >= cfg.max_steps  # every rank knows it
                    if not world.distributed:
                        due = not last and self._checkpoint_due(step, last_save)
                        stopping, signum = stop.requested, stop.signum
                        sync = len(losses) >= LOG_EVERY or last or stopping or due or at_limit
                    else:  # the ranks agree at steps they all know: stop signals wait for the next one
                        due = stopping = False
                        steps_due = bool(cfg.checkpoint_every_steps) and step % cfg.checkpoint_every_steps == 0
                        sync = len(losses) >= LOG_EVERY or last or (steps_due and not last) or at_limit
                    if sync:
                        chunk = torch.stack(losses)
                        if world.distributed:
                            chunk, agreed, due = world.agree(chunk, stop.signum if stop.requested else 0,
                                                             self._checkpoint_due(step, last_save))
                            due = due and not last
                            stopping, signum = agreed != 0, agreed or None
                        self._check_finite(chunk, step - len(losses), epoch, b - len(losses) + 1)
                        epoch_loss += float(chunk.sum())
                        losses.clear()
                        done = min((b + 1) * bsz, n)
                        bar.set_postfix(loss=f"{epoch_loss / done:.3f}")
                    if (stopping or due or at_limit) and not last:
                        if not self._parameters_finite():
                            raise self._diverged("the parameters became NaN or infinite", step, epoch, b,
                                                 first_step=False)
                        self._save(self.run_dir / CHECKPOINT, epoch, b + 1, step, epoch_start_rng, best, bad_epochs,
                                   epoch_loss)
                        last_save = time.monotonic()
                        self._status("training", epoch, batch=b + 1, step=step)
                        if stopping:
                            bar.close()
                            return self._interrupted(result, signum, epoch, b + 1, step, batches)
                        if at_limit:
                            bar.close()
                            return self._paused(result, epoch, b + 1, step, batches)
                bar.close()
                start_batch = 0
                row = self._end_of_epoch(epoch, step, epoch_loss / n, time.perf_counter() - t0)
                result.history.append(row)
                score = -row["valid_bound"]
                improved = score < best
                if improved:
                    best, bad_epochs = score, 0
                else:
                    bad_epochs += 1
                stopping = bool(cfg.patience and bad_epochs >= cfg.patience)
                self._save(self.run_dir / CHECKPOINT, epoch + 1, 0, step, None, best, bad_epochs, 0.0,
                           stopped_early=stopping)
                if improved:  # the end-of-epoch checkpoint is the best one: best.pt is the same file
                    world.share(lambda: share_file(self.run_dir / CHECKPOINT, self.run_dir / BEST))
                last_save = time.monotonic()
                signum = world.any_signal(stop.signum if stop.requested else None)
                if (stop.requested or signum) and epoch + 1 < cfg.epochs:
                    return self._interrupted(result, signum, epoch + 1, 0, step, batches)
                if stopping:
                    if world.is_main:
                        tqdm.write(f"early stopping: no improvement of the validation bound for {cfg.patience} "
                                   "epochs")
                    result.stopped_early = True
                    self._status("stopped_early", epoch + 1)
                    result.position = (epoch + 1, 0, step)
                    return result
                if at_limit and epoch + 1 < cfg.epochs:
                    return self._paused(result, epoch + 1, 0, step, batches)
                self._status("training", epoch + 1)
        self._status("finished", cfg.epochs)
        result.position = (cfg.epochs, 0, step)
        return result

    def _open_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.run_dir)

    def _module_buffers(self) -> list[torch.Tensor]:
        module = self.program.module
        return [] if module is None else [b for b in module.buffers() if b.is_floating_point()]

    def _restore_rank_rng(self, state: dict[str, Any]) -> None:
        """Each rank's own generators from a checkpoint of the same world size; with another world
        size, rank 0 continues with the checkpoint's rank 0 and the others from fresh seeds (and
        rank 0 warns once that the continuation is not bit-for-bit)."""
        saved, world = state.get("world_size", 1), self.world
        if saved == world.size:
            if world.rank > 0:
                own = state["rank_rng"][world.rank]
                _set_rng_state({k: v.to("cpu") if isinstance(v, torch.Tensor) else v for k, v in own.items()}, None,
                               self.device)
            return
        if world.rank > 0:
            torch.manual_seed(rank_seed(self.config.seed, world.rank, state["step"]))
        if world.is_main:
            warnings.warn(f"the checkpoint in {self.run_dir} was written by a run of {saved} process(es) and "
                          f"continues in {world.size}: parameters, optimizer and the order of the batches carry "
                          "over, the sampling noise of the other processes cannot, so the continuation is not "
                          "bit-for-bit the run it would have been", WorldSizeChangedWarning, stacklevel=3)

    def _checkpoint_due(self, step: int, last_save: float) -> bool:
        cfg = self.config
        if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0:
            return True
        return bool(cfg.checkpoint_every) and time.monotonic() - last_save >= cfg.checkpoint_every

    def _interrupted(self, result: TrainResult, signum: int | None, epoch: int, batch: int, step: int,
                     batches: int) -> TrainResult:
        result.interrupted, result.signal, result.position = True, signum, (epoch, batch, step)
        where = f"epoch {epoch + 1}, batch {batch}/{batches}" if batch else f"the end of epoch {epoch}"
        if self.world.is_main:
            tqdm.write(f"saved {self.run_dir / CHECKPOINT} at {where}")
        self._status("interrupted", epoch, batch=batch, step=step,
                     signal=signal.Signals(signum).name if signum else None)
        return result

    def _paused(self, result: TrainResult, epoch: int, batch: int, step: int, batches: int) -> TrainResult:
        """Training reached ``max_steps``: the checkpoint at ``step`` is saved; say where, and how to go on."""
        result.reached_max_steps, result.position = True, (epoch, batch, step)
        where = f"epoch {epoch + 1}, batch {batch}/{batches}" if batch else f"the end of epoch {epoch}"
        if self.config.progress and self.world.is_main:
            tqdm.write(f"reached --max-steps {self.config.max_steps}: saved {self.run_dir / CHECKPOINT} at {where}")
        self._status("paused", epoch, batch=batch, step=step, max_steps=self.config.max_steps)
        return result

    def _nothing_to_do(self, state: dict[str, Any]) -> str | None:
        """Why a resumed run has nothing left to train (it reached ``epochs`` or ``max_steps``, or stopped
        early), else None."""
        cfg, epoch, batch, step = self.config, state["epoch"], state.get("batch", 0), state["step"]
        if epoch >= cfg.epochs:
            done = f"{epoch} epoch(s)" + (f" and {batch} batches of the next" if batch else "")
            return (f"the run in {self.run_dir} has already trained {done}, --epochs is {cfg.epochs}; "
                    f"pass --epochs with more than {epoch} to train longer")
        if cfg.max_steps and step >= cfg.max_steps:
            return (f"the run in {self.run_dir} has already taken {step} steps, --max-steps is {cfg.max_steps}; "
                    f"pass --max-steps with more than {step}, or --max-steps 0 for no limit, to train longer")
        if state.get("stopped_early") and cfg.patience and state.get("bad_epochs", 0) >= cfg.patience:
            return (f"the run in {self.run_dir} stopped early after epoch {epoch}: the validation bound did not "
                    f"improve for {state['bad_epochs']} epochs (patience {cfg.patience}); pass a larger --patience, "
                    "or --patience 0, to train on")
        return None

    def _parameters_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.params.values())

    def _end_of_epoch(self, epoch: int, step: int, train_loss: float, seconds: float) -> dict[str, Any]:
        self.program.train(False)
        chunk = max(1, min(1000, max(self.config.batch_size, VALID_PAIRS // self.particles)))
        valid_elbo = -evaluate_loss(self.valid_elbo_fn, self.program, self.x_valid, self.y_valid)
        if self._trains_on_the_elbo:
            valid_bound = valid_elbo
        else:
            valid_bound = -evaluate_loss(self.loss_fn, self.program, self.x_valid, self.y_valid, batch_size=chunk)
        if self.world.distributed:  # each rank scored its shard: the means over the whole validation set
            n = self.x_valid.shape[0]
            valid_elbo, valid_bound = (total / self.num_valid for total in self.world.sums([valid_elbo * n,
                                                                                             valid_bound * n]))
        for name, value in (("validation ELBO", valid_elbo), (f"validation {self.config.objective} bound",
                                                               valid_bound)):
            if not math.isfinite(value):
                raise self._diverged(f"the {name} became {value} at the end of epoch {epoch + 1}", step, epoch,
                                     None, first_step=False)
        row = {
            "epoch": epoch + 1, "step": step, "train_loss": train_loss,
            "valid_elbo": valid_elbo, "valid_bound": valid_bound,
            "kl_scale": kl_scale_at(step, self.config.beta, self.config.warmup_epochs * self.steps_per_epoch),
            "seconds": seconds,
            "samples_per_s": self.x_train.shape[0] / seconds if seconds > 0 else None,
        }
        self._write_metrics(row)
        if self.config.progress and self.world.is_main:
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
        at = first_step + bad + 1
        raise self._diverged(f"loss became {float(chunk[bad])} at step {at} (epoch {epoch + 1}, batch "
                             f"{first_batch + bad + 1})", at, epoch, first_batch + bad, first_step=at == 1) from cause

    def _diverged(self, what: str, step: int, epoch: int, batch: int | None, first_step: bool) -> TrainingDiverged:
        """A :class:`TrainingDiverged` naming what went wrong, its likely causes, and the checkpoint kept."""
        causes = self._likely_causes(first_step)
        if self._saved is not None and (not self.world.is_main or (self.run_dir / CHECKPOINT).is_file()):
            e, b = self._saved
            where = f"epoch {e + 1}, batch {b}" if b else f"the end of epoch {e}"
            kept = f"The last good checkpoint ({where}) is kept in {self.run_dir / CHECKPOINT}."
        else:
            kept = "No checkpoint was written before this happened."
        return TrainingDiverged(f"{what}; training stopped. {causes} {kept}")

    def _likely_causes(self, first_step: bool) -> str:
        """The knowable causes of a non-finite loss: data far from the decoder's range, options at
        extreme values, or (after updates) a learning rate too large."""
        cfg, m = self.config, self.config.model
        found = []
        if not bool(torch.isfinite(self.x_train).all()):
            found.append("the training data hold NaN or infinite values")
        else:
            peak = float(self.x_train.abs().max())
            if peak > DATA_PEAK:
                found.append(f"the training data reach |x| = {peak:g}: values this large overflow float32 in the "
                             "likelihood; standardize or rescale the data")
        if self.built_in and m.decoder == "gaussian" and m.sigma_x < 1e-3:
            found.append(f"sigma_x = {m.sigma_x:g} makes the Gaussian decoder's squared errors huge; "
                         "use a larger --sigma-x")
        if cfg.beta > 1e3:
            found.append(f"beta = {cfg.beta:g} is extreme")
        if cfg.objective == "renyi" and cfg.alpha is not None and abs(cfg.alpha) > 1e3:
            found.append(f"alpha = {cfg.alpha:g} is extreme: the Renyi bound weighs log-weights by (1 - alpha), "
                         "which overflows")
        if self.built_in and "categorical" in (m.prior, m.guide) and m.temperature > 1e3:
            found.append(f"temperature = {m.temperature:g} is extreme for the Gumbel-Softmax relaxation")
        if first_step:
            lead = ("It happened at the first step, before any parameter update, so the learning rate is not the "
                    "cause: the model gives a non-finite loss on this data at its initial parameters.")
        else:
            lead = f"The parameters were updated with lr = {cfg.lr:g}" + (
                ", which is large for Adam (usual values are 1e-4 to 1e-2); try a smaller --lr."
                if cfg.lr > 1e-2 else "; a smaller --lr may help.")
        return " ".join([lead] + ([f"Likely cause: {'; '.join(found)}."] if found else []))

    def _check_resumable(self, state: dict[str, Any], program: Any) -> None:
        """Refuse to resume with options that change the program, objective or batches (by name), with a
        program that is not the checkpoint's, or on another kind of device."""
        if program is None and not state.get("built_in", True):
            raise CheckpointError(f"{self.run_dir} was trained from a model/guide pair given as Python objects; "
                                  "resume it from Python with the same pair: "
                                  "train(config, program=(model, guide), resume=True)")
        try:
            saved = TrainConfig.from_dict(state["config"])
        except ValueError as e:
            raise CheckpointError(f"{self.run_dir / CHECKPOINT} holds a config this pyro-vae cannot read: {e}") from None
        refused = self.config.refused_on_resume(saved)
        if refused:
            raise CheckpointError(
                "cannot resume with a different " + ", ".join(refused) + "; on resume only "
                + ", ".join(RESUMABLE) + " may change (start a new run to change the others)")
        trained_on = state.get("device")
        if trained_on and trained_on != self.device.type:
            raise CheckpointError(f"cannot resume on {self.device.type}: the run was trained on {trained_on}, and its "
                                  f"random number states are {trained_on}'s; resume with --device {trained_on}")


def train(config: TrainConfig | None = None, program: Any = None, dataset: Dataset | None = None,
          resume: bool = False) -> TrainResult:
    """Train ``program`` (default: the model ``config`` describes) as ``config`` says; see :class:`Trainer`.

    >>> result = train(TrainConfig(epochs=1, progress=False), program=(model, guide))  # doctest: +SKIP
    """
    return Trainer(config or TrainConfig(), program=program, dataset=dataset, resume=resume).fit()
