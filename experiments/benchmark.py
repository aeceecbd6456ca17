"""Benchmark: a training step through pyro-vae's trainer against hand-written PyTorch.

The pyro-vae side is :class:`pyro_vae.train.trainer.Trainer` -- the code path of
``pyro-vae train`` -- built for the case and stepped through its own loss
function and optimizer (``Trainer.train_step``).  Two programs are timed:

* ``builtin``: the library's VAE built from the config (784-400-50 MLP, Bernoulli
  decoder, diagonal Gaussian guide); the trainer picks the direct loss
  (:mod:`pyro_vae.infer.direct`);
* ``plain``: the same networks written as a user writes them, two plain
  functions ``model(x)`` / ``guide(x)`` using ``pyro.module``, handed to
  ``Trainer(config, program=(model, guide))``; the trainer picks the lean
  estimator (:mod:`pyro_vae.infer.fast`).

The hand-written side trains copies of the same networks (same weights) with
the same estimator written out in tensor ops (:mod:`handwritten`) and the same
optimizer class and settings (read off the trainer's optimizer: fused Adam),
on the same index-slice batches.  ``--baselines`` adds Pyro's own
``<ELBO>.differentiable_loss`` on a copy of the same program with the same
optimizer.

Timing: after a warm-up, each side runs ``--repeats`` rounds against the
hand-written side, one block of ``--steps`` steps each, in alternating order
(A B, B A, ...), so a ratio always compares two adjacent blocks.  On CPU each
step is timed and a block counts as its median step (a burst of load from
other processes spoils a few steps, not the block); on CUDA a block is timed
as a whole with one sync at its end.  The table gives the median ratio over
rounds (side samples/s over hand-written samples/s), its range and its
interquartile range.

    python experiments/benchmark.py --threads 1 --baselines --json benchmark.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import handwritten  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
from torch import nn  # noqa: E402

from pyro_vae.data import Dataset, load_dataset  # noqa: E402
from pyro_vae.infer.objectives import make_elbo  # noqa: E402
from pyro_vae.infer.scale import latent_scale  # noqa: E402
from pyro_vae.train.config import TrainConfig  # noqa: E402
from pyro_vae.train.schedules import kl_scale_at  # noqa: E402
from pyro_vae.train.trainer import Trainer  # noqa: E402

DEFAULT_CASES = ("trace-128", "trace-128-plain", "meanfield-128", "meanfield-128-plain", "iwae50-128",
                 "iwae50-128-plain")
#: (objective, program) -> the target ratio to the hand-written loop.
TARGETS = {("trace", "builtin"): 0.95, ("meanfield", "builtin"): 0.95, ("iwae", "builtin"): 0.9,
           ("trace", "plain"): 0.8, ("meanfield", "plain"): 0.8, ("iwae", "plain"): 0.8}
#: Steps per timed block on CPU (others: 3), a fraction of a second to a few seconds per block.
CPU_STEPS = {("trace", 128): 30, ("meanfield", 128): 30, ("trace", 1024): 8, ("meanfield", 1024): 8,
             ("iwae", 128): 6}
CUDA_STEPS = 100
HIDDEN, LATENT = 400, 50  # the 784-400-50 MLP
PYRO_VAE = "pyro-vae Trainer"
HANDWRITTEN = "hand-written"


@dataclass(frozen=True)
class Case:
    """A training case: objective, particles, batch size, and which program."""

    name: str
    objective: str
    particles: int
    batch: int
    program: str  # builtin | plain


def parse_case(name: str) -> Case:
    match = re.fullmatch(r"(trace|meanfield|iwae(\d+))-(\d+)(-plain)?", name)
    if not match:
        raise ValueError(f"bad case {name!r}; expected e.g. trace-128, meanfield-1024-plain or iwae50-128")
    objective = "iwae" if match[2] else match[1]
    return Case(name, objective, int(match[2] or 1), int(match[3]), "plain" if match[4] else "builtin")


@dataclass
class Side:
    """One way of doing a training step: ``step()`` runs one on ``samples`` points, unsynced."""

    name: str
    step: Callable[[], object]
    samples: int


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- data and programs ---------------------------------------------------------------------------

def load_data(data_dir: str | None) -> tuple[Dataset, str]:
    """Static binarized MNIST when it is in ``data_dir``, random binary data otherwise."""
    if data_dir:
        try:
            return load_dataset("binarized-mnist", data_dir, download=False), "binarized-mnist"
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


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def plain_program(encoder: nn.Module, decoder: nn.Module, latent: int, prefix: str = ""):
    """The VAE as two plain functions over ``encoder`` (outputs ``[mu, log sigma^2]``) and
    ``decoder`` (Bernoulli logits), parameters registered with ``pyro.module``."""

    def model(x):
        pyro.module(prefix + "decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(latent), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module(prefix + "encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_var = encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, (0.5 * log_var).exp()).to_event(1))

    return model, guide


class BatchStream:
    """The trainer's batching: a permutation per epoch, batches as index slices of one device tensor."""

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


# -- sides -----------------------------------------------------------------------------------------

def make_trainer(case: Case, dataset: Dataset, device: torch.device, run_dir: str):
    """The trainer for the case, and the (encoder, decoder) networks its program uses."""
    config = TrainConfig.from_flat(dict(data=dataset.name, latent_dim=LATENT, hidden=[HIDDEN],
                                        objective=case.objective, particles=case.particles,
                                        batch_size=case.batch, device=str(device), progress=False,
                                        run_dir=run_dir, seed=0))
    pyro.clear_param_store()
    if case.program == "plain":
        torch.manual_seed(0)
        d = dataset.num_features
        encoder, decoder = mlp([d, HIDDEN, 2 * LATENT]).to(device), mlp([LATENT, HIDDEN, d]).to(device)
        trainer = Trainer(config, program=plain_program(encoder, decoder, LATENT), dataset=dataset)
        return trainer, (encoder, decoder)
    trainer = Trainer(config, dataset=dataset)
    vae = trainer.program.module
    return trainer, (vae.encoder.net, vae.decoder.net)


def trainer_step(trainer) -> Callable[[tuple, int], torch.Tensor]:
    """``Trainer.train_step(args, step)``: one step of ``fit``'s loop, through the trainer's loss
    function and optimizer.  A trainer without it gets the same sequence of calls, as in ``fit``."""
    hook = getattr(trainer, "train_step", None)
    if hook is not None:
        return hook
    warnings.warn("Trainer has no train_step: stepping trainer.loss_fn and trainer.optimizer as fit does",
                  stacklevel=2)
    cfg, program = trainer.config, trainer.program

    def step(args: tuple, number: int) -> torch.Tensor:
        batch = args[0].shape[0]
        program.set_progress(number, trainer.steps_per_epoch)
        with latent_scale(scale=kl_scale_at(number, cfg.beta, cfg.warmup_epochs * trainer.steps_per_epoch)):
            loss = trainer.loss_fn(program.model, program.guide, *args) / batch
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
        return loss.detach() * batch

    return step


def pyro_vae_side(trainer, case: Case) -> Side:
    stream, step, counter = BatchStream(trainer.x_train, case.batch), trainer_step(trainer), itertools.count()
    return Side(PYRO_VAE, lambda: step((stream.next(),), next(counter)), case.batch)


def same_optimizer(reference: torch.optim.Optimizer) -> Callable:
    """A factory for the reference optimizer's class with its settings."""
    return lambda params: type(reference)(params, **reference.defaults)


def handwritten_side(trainer, nets, case: Case) -> Side:
    enc, dec = (copy.deepcopy(net) for net in nets)
    hand = handwritten.HandwrittenTrainer(enc, dec, case.objective, case.particles, same_optimizer(trainer.optimizer))
    stream = BatchStream(trainer.x_train, case.batch)
    return Side(HANDWRITTEN, lambda: hand.step(stream.next()), case.batch)


def pyro_baseline_side(trainer, nets, case: Case) -> Side:
    """Pyro's ``<ELBO>.differentiable_loss`` on a copy of the program, with the same optimizer."""
    elbo = make_elbo(case.objective, case.particles)
    if case.program == "plain":
        enc, dec = (copy.deepcopy(net) for net in nets)
        model, guide = plain_program(enc, dec, LATENT, prefix="baseline_")
        params = [*enc.parameters(), *dec.parameters()]
    else:
        vae = copy.deepcopy(trainer.program.module)
        vae.name = "baseline_vae"  # its own param-store names
        model, guide, params = vae.model, vae.guide, list(vae.parameters())
    optimizer = same_optimizer(trainer.optimizer)(params)
    stream = BatchStream(trainer.x_train, case.batch)

    def step() -> torch.Tensor:
        x = stream.next()
        loss = elbo.differentiable_loss(model, guide, x) / x.shape[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return Side(f"Pyro {type(elbo).__name__}.differentiable_loss", step, case.batch)


# -- timing ----------------------------------------------------------------------------------------

def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def time_block(side: Side, steps: int, device: torch.device) -> float:
    """Run ``steps`` steps; samples/s of the median step (CPU) or of the whole block (CUDA)."""
    sync(device)
    if device.type == "cuda":
        start = time.perf_counter()
        for _ in range(steps):
            side.step()
        sync(device)
        return side.samples * steps / (time.perf_counter() - start)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        side.step()
        times.append(time.perf_counter() - t0)
    return side.samples / statistics.median(times)


def time_against(side: Side, hand: Side, repeats: int, steps: int, device: torch.device) -> list[tuple]:
    """``repeats`` rounds of (side, hand-written) blocks, alternating which goes first."""
    rounds = []
    for r in range(repeats):
        order = (side, hand) if r % 2 == 0 else (hand, side)
        speeds = {s.name: time_block(s, steps, device) for s in order}
        rounds.append((speeds[side.name], speeds[hand.name]))
    return rounds


def describe(loss_fn) -> str:
    owner = getattr(loss_fn, "__self__", None)
    return f"{type(owner).__name__}.{loss_fn.__name__}" if owner is not None else repr(loss_fn)


def run_case(case: Case, dataset: Dataset, device: torch.device, args) -> list[dict]:
    steps = args.steps or (CUDA_STEPS if device.type == "cuda" else CPU_STEPS.get((case.objective, case.batch), 3))
    with tempfile.TemporaryDirectory() as run_dir:
        trainer, nets = make_trainer(case, dataset, device, run_dir)
        try:
            hand = handwritten_side(trainer, nets, case)
            sides = [pyro_vae_side(trainer, case)]
            if args.baselines:
                sides.append(pyro_baseline_side(trainer, nets, case))
            for side in (hand, *sides):  # warm-up: first calls, allocator
                for _ in range(args.warmup * steps):
                    side.step()
            rows = []
            for side in sides:
                rounds = time_against(side, hand, args.repeats, steps, device)
                ratios = [s / h for s, h in rounds]
                q1, q3 = quartiles(ratios)
                target = TARGETS.get((case.objective, case.program)) if side.name == PYRO_VAE else None
                median = statistics.median(ratios)
                rows.append({
                    "case": case.name, "program": case.program, "device": str(device), "side": side.name,
                    "loss_fn": describe(trainer.loss_fn) if side.name == PYRO_VAE else None,
                    "samples_per_s": statistics.median(s for s, _ in rounds),
                    "handwritten_samples_per_s": statistics.median(h for _, h in rounds),
                    "ratio_median": median, "ratio_min": min(ratios), "ratio_max": max(ratios),
                    "ratio_q1": q1, "ratio_q3": q3, "ratios": ratios, "steps_per_block": steps,
                    "target": target, "meets_target": None if target is None else median >= target,
                    "optimizer": f"{type(trainer.optimizer).__name__}({trainer.optimizer.defaults.get('fused')=})",
                })
            return rows
        finally:
            close = getattr(trainer, "close", None)
            if close is not None:
                close()


# -- report ----------------------------------------------------------------------------------------

def machine_info(threads: int) -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor())
    info = {"cpu": cpu, "nproc": os.cpu_count(), "torch": torch.__version__, "pyro": pyro.__version__,
            "python": platform.python_version(), "threads": threads}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def markdown_table(rows: list[dict]) -> str:
    lines = ["| case | program | device | side (loss) | samples/s | hand-written samples/s | ratio (median) | "
             "ratio min-max | ratio IQR | target |", "|---|---|---|---|---:|---:|---:|---|---|---|"]
    for r in rows:
        target = "" if r["target"] is None else f"{r['target']:.2f} {'met' if r['meets_target'] else 'NOT met'}"
        side = r["side"] + (f" ({r['loss_fn']})" if r["loss_fn"] else "")
        lines.append(f"| {r['case']} | {r['program']} | {r['device']} | {side} | {r['samples_per_s']:.0f} | "
                     f"{r['handwritten_samples_per_s']:.0f} | {r['ratio_median']:.3f} | "
                     f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f} | {r['ratio_q1']:.3f}-{r['ratio_q3']:.3f} | "
                     f"{target} |")
    return "\n".join(lines)


def devices_for(name: str) -> tuple[list[torch.device], str | None]:
    cuda = torch.cuda.is_available()
    if name == "cpu":
        return [torch.device("cpu")], None
    if name == "cuda":
        if not cuda:
            return [], "CUDA requested but not available: nothing to run"
        return [torch.device("cuda")], None
    if cuda:
        return [torch.device("cpu"), torch.device("cuda")], None
    return [torch.device("cpu")], "CUDA not available: CUDA cases skipped (CPU only)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(DEFAULT_CASES),
                   help="comma-separated cases, e.g. trace-128,trace-128-plain,iwae50-1024 (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=9, help="timed rounds per side and case")
    p.add_argument("--steps", type=int, default=None, help="training steps per timed block (default: per case)")
    p.add_argument("--warmup", type=int, default=1, help="untimed blocks per side before timing")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CPU, and CUDA too when available")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--data-dir", default=os.environ.get("PYRO_VAE_DATA"),
                   help="folder with binarized-mnist/ (default: $PYRO_VAE_DATA); random binary data when absent")
    p.add_argument("--baselines", action="store_true",
                   help="also time Pyro's <ELBO>.differentiable_loss on the same program and optimizer")
    p.add_argument("--json", type=Path, default=None, help="write all results as JSON here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or (args.steps is not None and args.steps < 1):
        p.error("--repeats and --steps must be positive, --warmup non-negative")
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
    print(f"machine: {info}\ndata: {data_note}" + (f"\nnote: {note}" if note else ""), flush=True)
    rows: list[dict] = []
    for device in devices:
        for case in args.case_list:
            t0 = time.perf_counter()
            case_rows = run_case(case, dataset, device, args)
            rows += case_rows
            main_row = case_rows[0]
            print(f"{case.name} on {device} via {main_row['loss_fn']}: ratio {main_row['ratio_median']:.3f} "
                  f"[{main_row['ratio_min']:.3f}, {main_row['ratio_max']:.3f}] ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    print()
    print(markdown_table(rows))
    report = {"command": " ".join(["python", *sys.argv]), "machine": info, "data": data_note, "note": note,
              "results": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
