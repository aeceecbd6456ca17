"""Benchmark: pyro-vae's training step and importance-sampled evaluation vs hand-written PyTorch (issue 5).

Both sides train the *same* networks (the hand-written side gets copies of the
pyro-vae VAE's ``encoder.net`` and ``decoder.net``, same weights) with the same
estimator (:mod:`handwritten`) and the same optimizer class and settings (read
off the trainer's optimizer), on the same data with the same index-slice
batching.  The pyro-vae side is one iteration of ``Trainer.fit``'s loop body:
``kl_scale``/``set_progress`` updates, ``trainer.loss_fn(vae.model, vae.guide,
x, y) / B``, ``zero_grad``, ``backward``, ``optimizer.step``.

Timing: a warm-up, then for each side ``--repeats`` rounds against the
hand-written side: in a round each of the two runs ``--steps`` steps (one
block), in alternating order (A B, B A, ...), so a ratio always compares two
adjacent blocks.  On CPU each step is timed on its own and a block counts as
its median step (a burst of load from other processes on a shared machine
spoils a few steps, not the block); on CUDA a block is timed as a whole with
one sync at its end.  A round's ratio is the side's samples/s over the
hand-written samples/s of the *same* round; the table reports the median ratio
over rounds and its spread (min-max and interquartile range).

Cases: ``{trace,meanfield,iwae<K>}-<batch>`` training steps and
``is<K>``: the importance-sampled test log-likelihood with K particles over
``--is-points`` test points (``pyro_vae.evaluation.importance.importance_log_likelihood``
vs :func:`handwritten.importance_log_likelihood` with the same chunk sizes; a
step evaluates two chunks' worth of points, a block all of them once; with
``--baselines`` also through :func:`pyro_vae.infer.fast.direct_log_weights`, the
change proposed for ``importance.py``).
Peak memory of one evaluation is measured per side: on CPU as the growth of the
peak resident set size of a fresh subprocess over its resident size just before
the call (``VmHWM`` reset via ``/proc/self/clear_refs``; ``tracemalloc`` does not
see torch's allocations), with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc
returns every freed tensor block at once and heap fragmentation does not set the
peak; on CUDA as ``torch.cuda.max_memory_allocated``.

    PYTHONPATH=. python experiments/benchmark.py --json /tmp/benchmark.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import inspect
import json
import math
import multiprocessing
import os
import platform
import pstats
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import handwritten  # noqa: E402
import pyro  # noqa: E402
from pyro.infer import SVI, JitTrace_ELBO, JitTraceMeanField_ELBO  # noqa: E402

from pyro_vae.data import Dataset, load_dataset  # noqa: E402
from pyro_vae.evaluation import importance  # noqa: E402
from pyro_vae.infer.fast import direct_log_weights  # noqa: E402
from pyro_vae.infer.objectives import make_elbo  # noqa: E402
from pyro_vae.infer.scale import latent_scale  # noqa: E402
from pyro_vae.models.registry import build_vae  # noqa: E402
from pyro_vae.train.config import TrainConfig  # noqa: E402
from pyro_vae.train.schedules import kl_scale_at  # noqa: E402
from pyro_vae.train.trainer import Trainer  # noqa: E402

DEFAULT_CASES = ("trace-128", "meanfield-128", "iwae50-128", "trace-1024", "meanfield-1024", "iwae50-1024",
                 "is5000")
#: Issue 5's targets: pyro-vae samples/s over hand-written samples/s.
TARGETS = {"trace": 0.95, "meanfield": 0.95, "iwae": 0.9, "is": 0.9}
#: Steps per timed block on CPU (others: 3), a fraction of a second to a few seconds per block on two cores.
CPU_STEPS = {("trace", 128): 30, ("meanfield", 128): 30, ("trace", 1024): 8, ("meanfield", 1024): 8,
             ("iwae", 128): 6}
CUDA_STEPS = 100
HIDDEN, LATENT = 400, 50  # the 784-400-50 MLP of the issue
PYRO_VAE = "pyro-vae"
HANDWRITTEN = "hand-written"
IS_DIRECT = "pyro-vae with fast_step.direct_log_weights (proposed)"
MMAP_THRESHOLD_VAR = "MALLOC_MMAP_THRESHOLD_"


@dataclass(frozen=True)
class Case:
    """A training case (objective, particles, batch) or an evaluation case (``is``, K)."""

    name: str
    objective: str
    particles: int
    batch: int = 0

    @property
    def is_evaluation(self) -> bool:
        return self.objective == "is"


def parse_case(name: str) -> Case:
    match = re.fullmatch(r"(trace|meanfield)-(\d+)|(iwae)(\d+)-(\d+)|is(\d+)", name)
    if not match:
        raise ValueError(f"bad case {name!r}; expected e.g. trace-128, meanfield-1024, iwae50-128 or is5000")
    if match[1]:
        return Case(name, match[1], 1, int(match[2]))
    if match[3]:
        return Case(name, match[3], int(match[4]), int(match[5]))
    return Case(name, "is", int(match[6]))


@dataclass
class Side:
    """One way of doing the work: ``step()`` does one unit (a training step, or one whole
    evaluation) on ``samples`` data points and returns its loss or result, unsynced."""

    name: str
    step: Callable[[], object]
    samples: int


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- data -------------------------------------------------------------------------------------

def load_data(data_dir: str | None) -> tuple[Dataset, str]:
    """Static binarized MNIST when it is in ``data_dir``, random binary data otherwise."""
    if data_dir:
        try:
            return load_dataset("binarized-mnist", data_dir, download=False), f"binarized-mnist from {data_dir}"
        except Exception as error:  # noqa: BLE001 - any failure means: use random data, and say why
            reason = f"{type(error).__name__}: {error}"
    else:
        reason = "no --data-dir"
    gen = torch.Generator().manual_seed(0)
    split = {k: torch.bernoulli(torch.full((n, 784), 0.25), generator=gen) for k, n in
             (("train", 50_000), ("valid", 1000), ("test", 1000))}
    dataset = Dataset(name="random-binary", train=split["train"], valid=split["valid"], test=split["test"],
                      train_labels=None, valid_labels=None, test_labels=None, image_shape=(28, 28), binary=True,
                      dynamic_binarization=False, num_classes=None)
    return dataset, f"random binary 784-d data ({reason})"


# -- training sides ----------------------------------------------------------------------------

def make_trainer(case: Case, dataset: Dataset, device: torch.device, run_dir: str) -> Trainer:
    config = TrainConfig.from_flat(dict(data=dataset.name, latent_dim=LATENT, hidden=[HIDDEN], objective=case.objective,
                         particles=case.particles,
                         batch_size=case.batch, device=str(device), progress=False, run_dir=run_dir, seed=0))
    return Trainer(config, dataset=dataset)


class BatchStream:
    """Fit's batching: a permutation per epoch, batches as index slices of one device tensor."""

    def __init__(self, x: torch.Tensor, batch: int, seed: int = 0) -> None:
        self.x, self.batch = x, batch
        self.gen = torch.Generator(device=x.device).manual_seed(seed)
        self.batches = x.shape[0] // batch
        self.position = self.batches

    def next(self) -> torch.Tensor:
        if self.position == self.batches:
            self.perm = torch.randperm(self.x.shape[0], generator=self.gen, device=self.x.device)
            self.position = 0
        idx = self.perm[self.position * self.batch:(self.position + 1) * self.batch]
        self.position += 1
        return self.x[idx]


def pyro_vae_side(trainer: Trainer) -> Side:
    """``Trainer.fit``'s loop body, through the trainer's own ``loss_fn`` and optimizer."""
    vae, cfg, opt = trainer.vae, trainer.config, trainer.optimizer
    stream = BatchStream(trainer.x_train, cfg.batch_size)
    state = {"step": 0}

    def step() -> torch.Tensor:
        xb = stream.next()
        vae.set_progress(state["step"], stream.batches)
        with latent_scale(scale=kl_scale_at(state["step"], cfg.beta, 0)):
            loss = trainer.loss_fn(vae.model, vae.guide, xb, None) / xb.shape[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["step"] += 1
        return loss.detach() * xb.shape[0]

    return Side(PYRO_VAE, step, cfg.batch_size)


def same_optimizer(reference: torch.optim.Optimizer) -> Callable:
    """A factory for the reference optimizer's class with its settings (fairness)."""
    return lambda params: type(reference)(params, **reference.defaults)


def handwritten_side(trainer: Trainer, case: Case) -> Side:
    """The same networks (copies, same weights) and estimator, written out in plain PyTorch."""
    enc = copy.deepcopy(trainer.vae.encoder.net)
    dec = copy.deepcopy(trainer.vae.decoder.net)
    hand = handwritten.HandwrittenTrainer(enc, dec, case.objective, case.particles, same_optimizer(trainer.optimizer))
    stream = BatchStream(trainer.x_train, case.batch)
    return Side(HANDWRITTEN, lambda: hand.step(stream.next()), case.batch)


def pyro_baseline_sides(case: Case, trainer: Trainer) -> list[Side]:
    """The paths issue 5 measured, with the optimizer each used: the previous trainer
    (``<ELBO>.differentiable_loss`` + ``torch.optim.Adam`` with default settings), ``SVI``
    with ``pyro.optim.Adam``, and Pyro's JIT estimator where it has one (trace, meanfield)."""
    cfg = trainer.config

    def fresh_vae(name: str):
        vae = build_vae(cfg, trainer.dataset.num_features, 0).to(trainer.device)
        vae.load_state_dict(trainer.vae.state_dict())
        vae.name = name  # its own param-store names: pyro.module would otherwise share parameters
        return vae

    def loss_side(name: str, vae, loss_fn) -> Side:
        stream = BatchStream(trainer.x_train, case.batch)
        optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.lr)

        def step() -> torch.Tensor:
            xb = stream.next()
            loss = loss_fn(vae.model, vae.guide, xb) / xb.shape[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.detach()
        return Side(name, step, case.batch)

    elbo = make_elbo(cfg.objective, cfg.particles, cfg.alpha)
    sides = [loss_side(f"before: {type(elbo).__name__}.differentiable_loss + Adam", fresh_vae("vae_before"),
                       elbo.differentiable_loss)]
    vae_svi = fresh_vae("vae_svi")
    svi = SVI(vae_svi.model, vae_svi.guide, pyro.optim.Adam({"lr": cfg.lr}),
              loss=make_elbo(cfg.objective, cfg.particles, cfg.alpha))
    stream = BatchStream(trainer.x_train, case.batch)
    sides.append(Side("SVI + pyro.optim.Adam", lambda: svi.step(stream.next()), case.batch))
    jit_class = {"trace": JitTrace_ELBO, "meanfield": JitTraceMeanField_ELBO}.get(cfg.objective)
    if jit_class is not None and case.particles == 1:
        jit = jit_class(max_plate_nesting=1, ignore_jit_warnings=True)
        sides.append(loss_side(f"{jit_class.__name__}.differentiable_loss + Adam", fresh_vae("vae_jit"),
                               jit.differentiable_loss))
    return sides


# -- evaluation sides ---------------------------------------------------------------------------

def evaluation_setup(dataset: Dataset, device: torch.device, num_points: int, max_memory_mb: float, k: int):
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    config = TrainConfig.from_flat(dict(latent_dim=LATENT, hidden=[HIDDEN]))
    vae = build_vae(config, dataset.num_features, 0).to(device).eval()
    x = dataset.test[:num_points].to(device)
    return vae, x, library_plan(vae, x, k, max_memory_mb)


def library_plan(vae, x: torch.Tensor, k: int, max_memory_mb: float):
    """The chunks ``importance_log_likelihood`` itself uses for ``x`` (its planner may take the device)."""
    args = (vae, x.shape[0], k, x.shape[-1], max_memory_mb, x.dtype)
    if "device" in inspect.signature(importance.plan_chunks).parameters:
        return importance.plan_chunks(*args, device=x.device)
    return importance.plan_chunks(*args)


def evaluate_pyro_vae(vae, x, k: int, max_memory_mb: float) -> torch.Tensor:
    return importance.importance_log_likelihood(vae, x, None, k, max_memory_mb=max_memory_mb)


@contextlib.contextmanager
def direct_importance_weights():
    """``pyro_vae.evaluation.importance.log_weights`` through ``fast_step.direct_log_weights`` (the change
    proposed for importance.py in docs/performance.md), for the duration of the block."""
    traced = importance.log_weights

    def log_weights(vae, x, y=None, num_particles=1):
        with torch.no_grad():
            direct = direct_log_weights(vae, x, y, num_particles)
        return importance.LogWeights(*direct) if direct is not None else traced(vae, x, y, num_particles)

    importance.log_weights = log_weights
    try:
        yield
    finally:
        importance.log_weights = traced


def evaluate_pyro_vae_direct(vae, x, k: int, max_memory_mb: float) -> torch.Tensor:
    with direct_importance_weights():
        return evaluate_pyro_vae(vae, x, k, max_memory_mb)


def cycling(evaluate: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int) -> Callable[[], torch.Tensor]:
    """A step that evaluates the next ``size`` points of ``x`` (always ``size``: it wraps around)."""
    position = {"start": 0}

    def step() -> torch.Tensor:
        start = position["start"]
        position["start"] = (start + size) % x.shape[0]
        index = torch.arange(start, start + size, device=x.device) % x.shape[0]
        return evaluate(x[index])
    return step


def evaluate_handwritten(vae, x, k: int, plan) -> torch.Tensor:
    return handwritten.importance_log_likelihood(vae.encoder.net, vae.decoder.net, x, k,
                                                 chunk_size=plan.particles_per_trace,
                                                 batch_size=plan.points_per_trace)


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def _peak_memory_child(side: str, state: dict, x: torch.Tensor, k: int, max_memory_mb: float,
                       threads: int | None, queue) -> None:
    if threads:
        torch.set_num_threads(threads)
    dataset_like = Dataset(name="probe", train=x, valid=x, test=x, train_labels=None, valid_labels=None,
                           test_labels=None, image_shape=None, binary=False, dynamic_binarization=False,
                           num_classes=None)
    vae, xs, plan = evaluation_setup(dataset_like, torch.device("cpu"), x.shape[0], max_memory_mb, k)
    vae.load_state_dict(state)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    if side == PYRO_VAE:
        evaluate_pyro_vae(vae, xs, k, max_memory_mb)
    else:
        evaluate_handwritten(vae, xs, k, plan)
    queue.put((_status_kib("VmHWM") - before) / 1024)


def peak_memory_mb(side: str, vae, x: torch.Tensor, k: int, max_memory_mb: float, plan,
                   threads: int | None) -> float:
    """Peak memory of one evaluation (MiB): the CUDA allocator's peak, or on CPU the growth of a
    fresh process's peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``)
    with glibc's mmap threshold pinned at 64 KiB, so that it follows live tensor memory."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
        if side == PYRO_VAE:
            evaluate_pyro_vae(vae, x, k, max_memory_mb)
        else:
            evaluate_handwritten(vae, x, k, plan)
        torch.cuda.synchronize(x.device)
        return (torch.cuda.max_memory_allocated(x.device) - base) / 2**20
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_memory_child, args=(side, vae.state_dict(), x, k, max_memory_mb, threads, queue))
    # glibc would otherwise keep freed blocks of a few MB on its heap and let fragmentation,
    # not live tensors, set the peak; pinned, every block over 64 KiB is its own mapping.
    saved = os.environ.get(MMAP_THRESHOLD_VAR)
    os.environ[MMAP_THRESHOLD_VAR] = "65536"
    try:
        proc.start()
    finally:
        if saved is None:
            del os.environ[MMAP_THRESHOLD_VAR]
        else:
            os.environ[MMAP_THRESHOLD_VAR] = saved
    result = queue.get()
    proc.join()
    return result


# -- running --------------------------------------------------------------------------------------

def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def time_block(side: Side, steps: int, device: torch.device) -> tuple[float, float]:
    """Run ``steps`` steps; return (samples/s of the median step, samples/s of the whole block).

    On CPU every op has finished when ``step()`` returns, so each step is timed
    on its own and the block's median step time is kept: a burst of load from
    other processes spoils a few steps, not the block.  On CUDA a per-step sync
    would change the workload, so only the block is timed (one sync at its end).
    """
    results = []
    sync(device)
    start = time.perf_counter()
    if device.type == "cuda":
        for _ in range(steps):
            results.append(side.step())
        sync(device)
        block = time.perf_counter() - start
        step_time = block / steps
    else:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            results.append(side.step())
            times.append(time.perf_counter() - t0)
        block = time.perf_counter() - start
        step_time = statistics.median(times)
    return side.samples / step_time, steps * side.samples / block


def time_rounds(sides: list[Side], repeats: int, steps: int, device: torch.device) -> list[dict[str, tuple]]:
    """``repeats`` rounds of one block per side, the order rotating from round to round."""
    rounds = []
    for r in range(repeats):
        order = sides[r % len(sides):] + sides[:r % len(sides)]
        rounds.append({side.name: time_block(side, steps, device) for side in order})
    return rounds


def time_against_handwritten(sides: list[Side], hand: Side, repeats: int, steps: int,
                             device: torch.device) -> dict[str, list[dict[str, tuple]]]:
    """For each side, its own rounds against the hand-written side (A B, B A, ...), so that
    every ratio compares two adjacent blocks and no third side runs in between."""
    return {side.name: time_rounds([side, hand], repeats, steps, device) for side in sides}


def summarize(case: Case, device: torch.device, rounds_by_side: dict[str, list[dict[str, tuple]]],
              common: dict, per_side: dict[str, dict] | None = None) -> list[dict]:
    """One row per side: medians and the spread of its ratio to the hand-written side.

    A round's ratio compares the two sides' median-step throughputs of that round.
    """
    rows = []
    for name, rounds in rounds_by_side.items():
        ratios = [r[name][0] / r[HANDWRITTEN][0] for r in rounds]
        q1, q3 = quartiles(ratios)
        target = TARGETS.get(case.objective) if name == PYRO_VAE else None
        rows.append({
            "case": case.name, "device": str(device), "batch": case.batch or None, "particles": case.particles,
            "side": name,
            "samples_per_s": statistics.median(r[name][0] for r in rounds),
            "handwritten_samples_per_s": statistics.median(r[HANDWRITTEN][0] for r in rounds),
            "block_samples_per_s": statistics.median(r[name][1] for r in rounds),
            "handwritten_block_samples_per_s": statistics.median(r[HANDWRITTEN][1] for r in rounds),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ratio_q1": q1, "ratio_q3": q3, "ratios": ratios, "target": target,
            "meets_target": None if target is None else statistics.median(ratios) >= target,
            **common, **(per_side or {}).get(name, {}),
        })
    return rows


def describe(obj) -> str:
    owner = getattr(obj, "__self__", None)
    return f"{type(owner).__name__}.{obj.__name__}" if owner is not None else repr(obj)


def run_training_case(case: Case, dataset: Dataset, device: torch.device, args) -> list[dict]:
    steps = args.steps or (CUDA_STEPS if device.type == "cuda" else
                           CPU_STEPS.get((case.objective, case.batch), 3))
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = make_trainer(case, dataset, device, run_dir)
    hand = handwritten_side(trainer, case)
    sides = [pyro_vae_side(trainer)] + (pyro_baseline_sides(case, trainer) if args.baselines else [])
    for side in [hand, *sides]:  # warm-up: first calls, allocator, JIT compilation
        for _ in range(args.warmup):
            side.step()
    rounds = time_against_handwritten(sides, hand, args.repeats, steps, device)
    settings = ", ".join(f"{k}={v}" for k, v in trainer.optimizer.defaults.items() if k in ("lr", "fused", "foreach"))
    common = {"steps_per_block": steps, "loss_fn": describe(trainer.loss_fn),
              "optimizer": f"{type(trainer.optimizer).__name__}({settings})"}
    return summarize(case, device, rounds, common)


def run_evaluation_case(case: Case, dataset: Dataset, device: torch.device, args) -> list[dict]:
    k = case.particles
    vae, x, plan = evaluation_setup(dataset, device, args.is_points, args.is_memory_mb, k)
    # A step evaluates the next `size` points (two traces' worth); a block covers all points once.
    size = min(x.shape[0], 2 * plan.points_per_trace)
    steps = math.ceil(x.shape[0] / size)
    hand = Side(HANDWRITTEN, cycling(lambda xs: evaluate_handwritten(vae, xs, k, plan), x, size), size)
    sides = [Side(PYRO_VAE, cycling(lambda xs: evaluate_pyro_vae(vae, xs, k, args.is_memory_mb), x, size), size)]
    if args.baselines:
        sides.append(Side(IS_DIRECT, cycling(lambda xs: evaluate_pyro_vae_direct(vae, xs, k, args.is_memory_mb),
                                             x, size), size))
    warm = x[:plan.points_per_trace]
    evaluate_pyro_vae(vae, warm, k, args.is_memory_mb)
    evaluate_handwritten(vae, warm, k, plan)
    if args.baselines:
        evaluate_pyro_vae_direct(vae, warm, k, args.is_memory_mb)
    rounds = time_against_handwritten(sides, hand, args.is_repeats, steps, device)
    # Same seed, same chunks: both sides draw the same particles, so they must agree to rounding.
    check = x[:2 * plan.points_per_trace]
    pyro.set_rng_seed(1)
    pyro_estimate = evaluate_pyro_vae(vae, check, k, args.is_memory_mb)
    pyro.set_rng_seed(1)
    hand_estimate = evaluate_handwritten(vae, check, k, plan)
    common = {"points": x.shape[0], "points_per_step": size, "points_per_trace": plan.points_per_trace,
              "particles_per_trace": plan.particles_per_trace, "max_memory_mb": args.is_memory_mb,
              "checked_points": check.shape[0], "handwritten_mean_log_px": float(hand_estimate.mean()),
              "max_abs_log_px_difference": float((pyro_estimate - hand_estimate).abs().max())}
    per_side = {PYRO_VAE: {"mean_log_px": float(pyro_estimate.mean())}}
    if not args.no_memory:
        per_side[PYRO_VAE]["peak_mb"] = peak_memory_mb(PYRO_VAE, vae, x, k, args.is_memory_mb, plan, args.threads)
        common["handwritten_peak_mb"] = peak_memory_mb(HANDWRITTEN, vae, x, k, args.is_memory_mb, plan, args.threads)
    return summarize(case, device, rounds, common, per_side)


# -- where the time goes ---------------------------------------------------------------------------

@dataclass
class Phased:
    """A training step split into its three phases, for the per-step breakdown."""

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]  # batch -> loss / B
    optimizer: torch.optim.Optimizer


def phase_breakdown(case: Case, dataset: Dataset, device: torch.device, steps: int) -> list[dict]:
    """Median milliseconds per step of loss (forward), backward and optimizer step, before
    (the previous trainer: Pyro's ``differentiable_loss`` + default ``torch.optim.Adam``), after
    (the trainer now) and hand-written; the sides alternate step by step."""
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = make_trainer(case, dataset, device, run_dir)
    vae = trainer.vae
    before_vae = build_vae(trainer.config, dataset.num_features, 0).to(device)
    before_vae.load_state_dict(vae.state_dict())
    before_vae.name = "vae_before"
    hand_enc, hand_dec = copy.deepcopy(vae.encoder.net), copy.deepcopy(vae.decoder.net)
    elbo = make_elbo(case.objective, case.particles)
    sides = [
        Phased(f"before: {type(elbo).__name__}.differentiable_loss + Adam(default)",
               lambda xb: elbo.differentiable_loss(before_vae.model, before_vae.guide, xb) / xb.shape[0],
               torch.optim.Adam(before_vae.parameters(), lr=trainer.config.lr)),
        Phased(f"after: {describe(trainer.loss_fn)} + {type(trainer.optimizer).__name__}(fused)",
               lambda xb: trainer.loss_fn(vae.model, vae.guide, xb, None) / xb.shape[0], trainer.optimizer),
        Phased("hand-written + the same optimizer",
               lambda xb: handwritten.negative_elbo_sum(hand_enc, hand_dec, xb, case.objective,
                                                        case.particles) / xb.shape[0],
               same_optimizer(trainer.optimizer)([*hand_enc.parameters(), *hand_dec.parameters()])),
    ]
    stream = BatchStream(trainer.x_train, case.batch)
    times: dict[str, list[list[float]]] = {side.name: [] for side in sides}
    data_times = []
    for i in range(steps + 3):
        sync(device)
        t0 = time.perf_counter()
        xb = stream.next()
        sync(device)
        data_times.append(time.perf_counter() - t0)
        for side in sides:
            sync(device)
            t0 = time.perf_counter()
            loss = side.forward(xb)
            sync(device)
            t1 = time.perf_counter()
            side.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sync(device)
            t2 = time.perf_counter()
            side.optimizer.step()
            sync(device)
            t3 = time.perf_counter()
            if i >= 3:  # the first steps warm up
                times[side.name].append([t1 - t0, t2 - t1, t3 - t2, t3 - t0])
    rows = []
    for name, per_step in times.items():
        medians = [1e3 * statistics.median(column) for column in zip(*per_step)]
        rows.append({"case": case.name, "device": str(device), "side": name, "forward_ms": medians[0],
                     "backward_ms": medians[1], "optimizer_ms": medians[2], "step_ms": medians[3],
                     "data_ms": 1e3 * statistics.median(data_times[3:])})
    return rows


PROFILE_GROUPS = (("/pyro/", "pyro: tracing, messengers, site bookkeeping"),
                  ("/torch/distributions/", "torch.distributions: objects, checks, log_prob"),
                  ("/pyro_vae/", "pyro_vae: model, guide, parts"),
                  ("/torch/nn/", "torch.nn: module calls"))


def loss_profile(loss_fn: Callable[[], torch.Tensor], steps: int, top: int = 10) -> dict:
    """cProfile of ``steps`` loss evaluations: self time per step grouped by where the code
    lives (tensor kernels called from Python count as "tensor ops"), and the Python functions
    with the most self time."""
    for _ in range(3):
        loss_fn()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        loss_fn()
    profiler.disable()
    groups: dict[str, float] = {}
    functions = []
    for (filename, line, function), (_, calls, own, _, _) in pstats.Stats(profiler).stats.items():
        where = filename.replace("\\", "/")
        if where == "~":
            group = "tensor ops and other built-ins"
        else:
            group = next((label for part, label in PROFILE_GROUPS if part in where), "other Python")
            marker = next((part for part, _ in PROFILE_GROUPS if part in where), None)
            short = where[where.index(marker) + 1:] if marker else Path(where).name
            functions.append({"function": f"{short}:{line}({function})", "calls_per_step": calls / steps,
                              "self_ms_per_step": 1e3 * own / steps})
        groups[group] = groups.get(group, 0.0) + 1e3 * own / steps
    functions.sort(key=lambda r: -r["self_ms_per_step"])
    return {"groups_ms_per_step": dict(sorted(groups.items(), key=lambda kv: -kv[1])), "top": functions[:top]}


def loss_profiles(case: Case, dataset: Dataset, steps: int) -> dict:
    """Where one loss evaluation's time goes on CPU: Pyro's ``differentiable_loss`` (before)
    and the trainer's loss now (after), on the same VAE and batch."""
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = make_trainer(case, dataset, torch.device("cpu"), run_dir)
    vae, elbo = trainer.vae, make_elbo(case.objective, case.particles)
    x = trainer.x_train[:case.batch]
    return {"before": loss_profile(lambda: elbo.differentiable_loss(vae.model, vae.guide, x), steps),
            "after": loss_profile(lambda: trainer.loss_fn(vae.model, vae.guide, x, None), steps)}


def profile_tables(breakdown: list[dict], profiles: dict) -> str:
    lines = ["| case | device | side | loss (forward) ms | backward ms | optimizer ms | step ms |",
             "|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['device']} | {r['side']} | {r['forward_ms']:.2f} | {r['backward_ms']:.2f} | "
              f"{r['optimizer_ms']:.2f} | {r['step_ms']:.2f} |" for r in breakdown]
    lines += ["", "Data: one batch as an index slice of the device tensor takes " + ", ".join(
        sorted({f"{r['data_ms']:.3f} ms ({r['device']})" for r in breakdown})) + " (median)."]
    for when, profile in profiles.items():
        lines += ["", f"Loss forward under cProfile, {when} (self time, ms per step; cProfile inflates Python):", "",
                  "| where | ms/step |", "|---|---:|"]
        lines += [f"| {group} | {ms:.2f} |" for group, ms in profile["groups_ms_per_step"].items()]
        lines += ["", "| Python function | calls/step | self ms/step |", "|---|---:|---:|"]
        lines += [f"| `{r['function']}` | {r['calls_per_step']:.0f} | {r['self_ms_per_step']:.3f} |"
                  for r in profile["top"]]
    return "\n".join(lines)


def machine_info(threads: int) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    info = {"cpu": cpu, "nproc": os.cpu_count(), "torch": torch.__version__, "pyro": pyro.__version__,
            "python": platform.python_version(), "threads": threads}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def markdown_table(rows: list[dict]) -> str:
    head = ("| case | device | side | samples/s | hand-written samples/s | ratio (median) | ratio min-max | "
            "ratio IQR | target |\n|---|---|---|---:|---:|---:|---|---|---|")
    lines = [head]
    for r in rows:
        target = "" if r["target"] is None else f"{r['target']:.2f} {'met' if r['meets_target'] else 'NOT met'}"
        unit = " pts/s" if r["case"].startswith("is") else ""
        lines.append(f"| {r['case']} | {r['device']} | {r['side']} | {r['samples_per_s']:.0f}{unit} | "
                     f"{r['handwritten_samples_per_s']:.0f}{unit} | {r['ratio_median']:.3f} | "
                     f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f} | {r['ratio_q1']:.3f}-{r['ratio_q3']:.3f} | "
                     f"{target} |")
    return "\n".join(lines)


def devices_for(name: str) -> tuple[list[torch.device], str | None]:
    cuda = torch.cuda.is_available()
    if name == "cpu":
        return [torch.device("cpu")], None
    if name == "cuda":
        if not cuda:
            return [], "CUDA requested but not available: CUDA cases skipped, nothing to run"
        return [torch.device("cuda")], None
    if cuda:
        return [torch.device("cpu"), torch.device("cuda")], None
    return [torch.device("cpu")], "CUDA not available: CUDA cases skipped (CPU only)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(DEFAULT_CASES),
                   help="comma-separated cases, e.g. trace-128,iwae50-1024,is5000 (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=9, help="timed rounds per side and training case")
    p.add_argument("--steps", type=int, default=None, help="training steps per timed block (default: per case)")
    p.add_argument("--warmup", type=int, default=2, help="untimed blocks per side before timing")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CPU, and CUDA too when available")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--data-dir", default=os.environ.get("PYRO_VAE_DATA", "/work/shared/data"),
                   help="folder with binarized-mnist/; random binary data when absent")
    p.add_argument("--is-points", type=int, default=200, help="test points for the is<K> cases")
    p.add_argument("--is-repeats", type=int, default=3, help="timed rounds per side and is<K> case")
    p.add_argument("--is-memory-mb", type=float, default=importance.DEFAULT_MAX_MEMORY_MB,
                   help="memory budget of one importance-sampling chunk (both sides use the same chunks)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement of is<K>")
    p.add_argument("--baselines", action="store_true",
                   help="also time Pyro's own paths: <ELBO>.differentiable_loss, SVI + pyro.optim, JIT")
    p.add_argument("--profile", action="store_true",
                   help="also print where a step's time goes (phases before/after/hand-written, and a "
                        "cProfile of Pyro's loss) for the first training case")
    p.add_argument("--json", type=Path, default=None, help="write all results as JSON here")
    args = p.parse_args(argv)
    for name in ("repeats", "warmup", "is_points", "is_repeats"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be positive, got {args.steps}")
    try:
        args.case_list = [parse_case(c.strip()) for c in args.cases.split(",") if c.strip()]
    except ValueError as error:
        p.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info(torch.get_num_threads())
    devices, note = devices_for(args.device)
    dataset, data_note = load_data(args.data_dir)
    print(f"machine: {info}")
    print(f"data: {data_note}")
    if note:
        print(f"note: {note}")
    rows: list[dict] = []
    for device in devices:
        for case in args.case_list:
            t0 = time.perf_counter()
            runner = run_evaluation_case if case.is_evaluation else run_training_case
            case_rows = runner(case, dataset, device, args)
            rows += case_rows
            main_row = next(r for r in case_rows if r["side"] == PYRO_VAE)
            print(f"{case.name} on {device}: ratio {main_row['ratio_median']:.3f} "
                  f"[{main_row['ratio_min']:.3f}, {main_row['ratio_max']:.3f}] ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    table = markdown_table(rows)
    print()
    print(table)
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": info, "data": data_note,
              "note": note, "results": rows}
    training_cases = [c for c in args.case_list if not c.is_evaluation]
    if args.profile and training_cases:
        case = training_cases[0]
        breakdown = [row for device in devices
                     for row in phase_breakdown(case, dataset, device, args.steps or 30)]
        profiles = loss_profiles(case, dataset, args.steps or 30)
        report["profile"] = {"breakdown": breakdown, "loss": profiles}
        print()
        print(profile_tables(breakdown, profiles))
    print()
    print(json.dumps(report, indent=1, default=str))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
