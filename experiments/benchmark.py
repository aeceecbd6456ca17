"""Benchmark: ``pyro_vae.train`` -- what ``pyro-vae train`` runs -- against a hand-written PyTorch script.

The pyro-vae side is the public entry point, timed end to end:
``pyro_vae.train(config, program=..., dataset=dataset)`` builds the program and
its optimizer, checks the faster estimator against Pyro's on the first batch,
trains ``--epochs`` epochs, computes the validation bounds after each epoch,
and writes ``metrics.jsonl``, ``checkpoint.pt`` and ``best.pt``.  Two programs:

* ``builtin``: the library's VAE built from the config (784-400-50 MLP, Bernoulli
  decoder, diagonal Gaussian guide);
* ``plain``: the same networks written as a user writes them, two plain
  functions ``model(x)`` / ``guide(x)`` using ``pyro.module``, handed over as
  ``program=(model, guide)``.

The reference is the strongest hand-written script doing the same work
(:func:`handwritten.train_script`): the same estimator in tensor ops, the same
optimizer class and settings (``Adam(fused=True)``, read off the trainer), the
same shuffled index-slice batches of one device tensor, the validation ELBO
(and the objective's own bound) after each epoch, and a ``torch.save`` of the
networks and optimizer.  ``hand-written, steps only`` is the same script
without validation and checkpoint, the floor of any training loop.
``--baselines`` adds Pyro's own ``SVI`` with ``pyro.optim.Adam`` doing the same
work (``svi.step`` per batch, ``svi.evaluate_loss`` for validation).

Every side trains fresh networks on the same ``Dataset`` tensors (loaded once,
so parsing files is not timed).  Timing: one untimed warm-up run per side, then
``--repeats`` rounds; in a round every side runs once, in alternating order
(forward, then backward), and a side's ratio in that round is the hand-written
script's time over the side's time in the *same* round (1.0 = as fast).  The
table gives the median over rounds, the range and the interquartile range, and
the same ratio of process CPU time, which waiting for a core on a shared
machine does not inflate (with one torch thread, CPU time is the work done).

    PYRO_VAE_DATA=path/to/data python experiments/benchmark.py --threads 1 --baselines --json benchmark.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
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
import pyro.distributions as dist  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pyro_vae import Trainer, TrainConfig  # noqa: E402
from pyro_vae.data import Dataset, load_dataset  # noqa: E402
from pyro_vae.infer.fast import make_optimizer  # noqa: E402
from pyro_vae.infer.objectives import make_elbo  # noqa: E402

DEFAULT_CASES = ("trace-128", "trace-128-plain", "meanfield-128", "meanfield-128-plain", "iwae50-128",
                 "iwae50-128-plain")
#: (objective, program) -> the target ratio to the hand-written script.
TARGETS = {("trace", "builtin"): 0.95, ("meanfield", "builtin"): 0.95, ("iwae", "builtin"): 0.95,
           ("trace", "plain"): 0.8, ("meanfield", "plain"): 0.8, ("iwae", "plain"): 0.8}
#: Training points per case, so that one run takes seconds: all of them for one particle; a
#: tenth with K = 50, whose steps cost about fifty times more.
TRAIN_POINTS = {1: 50_000, 50: 5_000}
VALID_POINTS = {1: 10_000, 50: 1_000}
HIDDEN, LATENT = 400, 50  # the 784-400-50 MLP
PYRO_VAE = "pyro_vae.train"
HANDWRITTEN = "hand-written script"
BARE = "hand-written, steps only"
PYRO_SVI = "Pyro SVI + pyro.optim.Adam"


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
             (("train", 50_000), ("valid", 10_000), ("test", 1000))}
    dataset = Dataset(name="random-binary", train=split["train"], valid=split["valid"], test=split["test"],
                      train_labels=None, valid_labels=None, test_labels=None, image_shape=(28, 28), binary=True,
                      dynamic_binarization=False, num_classes=None)
    return dataset, f"random binary 784-d data ({reason})"


def subset(dataset: Dataset, train_points: int, valid_points: int) -> Dataset:
    """The first points of each split (labels dropped: the cases are unconditional)."""
    return Dataset(name=dataset.name, train=dataset.train[:train_points], valid=dataset.valid[:valid_points],
                   test=dataset.test[:1000], train_labels=None, valid_labels=None, test_labels=None,
                   image_shape=dataset.image_shape, binary=dataset.binary,
                   dynamic_binarization=dataset.dynamic_binarization, num_classes=None)


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def networks(d: int, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """A fresh encoder (``[mu, log sigma^2]``) and decoder (Bernoulli logits) of the 784-400-50 MLP."""
    return mlp([d, HIDDEN, 2 * LATENT]).to(device), mlp([LATENT, HIDDEN, d]).to(device)


def plain_program(encoder: nn.Module, decoder: nn.Module, latent: int):
    """The VAE as two plain functions over ``encoder`` and ``decoder``, registered with ``pyro.module``."""

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(latent), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_var = encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, (0.5 * log_var).exp()).to_event(1))

    return model, guide


# -- sides: each runs a whole training from fresh networks ---------------------------------------

def config_for(case: Case, dataset: Dataset, device: torch.device, epochs: int, run_dir: str) -> TrainConfig:
    return TrainConfig.from_flat(dict(data=dataset.name, latent_dim=LATENT, hidden=[HIDDEN],
                                      objective=case.objective, particles=case.particles, batch_size=case.batch,
                                      epochs=epochs, patience=0, device=str(device), progress=False,
                                      run_dir=run_dir, seed=0))


def pyro_vae_side(case: Case, dataset: Dataset, device: torch.device, epochs: int, scratch: Path,
                  record: dict) -> Callable[[], None]:
    """``pyro_vae.train`` (``Trainer(...).fit()``) into a new run directory; ``record`` gets the loss it chose."""
    runs = iter(range(10**9))

    def run() -> None:
        run_dir = scratch / f"run-{next(runs)}"
        config = config_for(case, dataset, device, epochs, str(run_dir))
        program = None
        if case.program == "plain":
            pyro.clear_param_store()
            program = plain_program(*networks(dataset.num_features, device), LATENT)
        trainer = Trainer(config, program=program, dataset=dataset)  # what train() builds and fits
        result = trainer.fit()
        if len(result.history) != epochs:
            raise RuntimeError(f"pyro_vae.train ran {len(result.history)} of {epochs} epochs")
        record.setdefault("loss_fn", describe(trainer.loss_fn))
    return run


def optimizer_factory(device: torch.device) -> Callable:
    """The trainer's optimizer: :func:`pyro_vae.infer.fast.make_optimizer` (fused Adam), lr 1e-3."""
    return lambda params: make_optimizer(params, lr=TrainConfig().lr)


def handwritten_side(case: Case, dataset: Dataset, device: torch.device, epochs: int, scratch: Path,
                     bare: bool = False) -> Callable[[], None]:
    x_train, x_valid = dataset.train.to(device), dataset.valid.to(device)

    def run() -> None:
        enc, dec = networks(dataset.num_features, device)
        handwritten.train_script(enc, dec, x_train, x_valid[:0] if bare else x_valid, case.objective,
                                 case.particles, case.batch, epochs, optimizer_factory(device),
                                 checkpoint=None if bare else str(scratch / "handwritten.pt"))
    return run


def pyro_svi_side(case: Case, dataset: Dataset, device: torch.device, epochs: int, scratch: Path
                  ) -> Callable[[], None]:
    """The loop a Pyro user writes: ``SVI`` with ``pyro.optim.Adam``, validation with
    ``evaluate_loss``, the parameter store saved after each epoch."""
    x_train, x_valid = dataset.train.to(device), dataset.valid.to(device)

    def run() -> None:
        pyro.clear_param_store()
        model, guide = plain_program(*networks(dataset.num_features, device), LATENT)
        elbo = make_elbo(case.objective, case.particles)
        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": TrainConfig().lr}), elbo)
        gen = torch.Generator(device=device).manual_seed(0)
        n = x_train.shape[0]
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen, device=device)
            for start in range(0, n, case.batch):
                svi.step(x_train[perm[start:start + case.batch]])
            for start in range(0, x_valid.shape[0], 1000):
                svi.evaluate_loss(x_valid[start:start + 1000])
            pyro.get_param_store().save(str(scratch / "pyro-svi.pt"))
    return run


def describe(loss_fn) -> str:
    """The name of the loss the trainer chose."""
    owner = getattr(loss_fn, "__self__", None)
    return f"{type(owner).__name__}.{loss_fn.__name__}" if owner is not None else repr(loss_fn)


# -- timing ----------------------------------------------------------------------------------------

def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def timed(run: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of ``run()`` (CPU time is what a busy, shared machine
    inflates least: waiting for a core is not counted)."""
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    run()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def run_case(case: Case, dataset: Dataset, device: torch.device, args) -> list[dict]:
    data = subset(dataset, TRAIN_POINTS.get(case.particles, 5_000), VALID_POINTS.get(case.particles, 1_000))
    record: dict = {}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        sides = {PYRO_VAE: pyro_vae_side(case, data, device, args.epochs, scratch, record),
                 HANDWRITTEN: handwritten_side(case, data, device, args.epochs, scratch),
                 BARE: handwritten_side(case, data, device, args.epochs, scratch, bare=True)}
        if args.baselines:
            sides[PYRO_SVI] = pyro_svi_side(case, data, device, args.epochs, scratch)
        names = list(sides)
        for name in names:  # warm-up: first calls, allocator, the CPU's clock
            sides[name]()
        times: dict[str, list[float]] = {name: [] for name in names}
        cpu: dict[str, list[float]] = {name: [] for name in names}
        for r in tqdm(range(args.repeats), desc=case.name, leave=False):
            for name in (names if r % 2 == 0 else names[::-1]):
                wall, used = timed(sides[name], device)
                times[name].append(wall)
                cpu[name].append(used)
    rows = []
    for name in names:
        ratios = [h / s for h, s in zip(times[HANDWRITTEN], times[name])]
        cpu_ratios = [h / s for h, s in zip(cpu[HANDWRITTEN], cpu[name])]
        q1, q3 = quartiles(ratios)
        target = TARGETS.get((case.objective, case.program)) if name == PYRO_VAE else None
        median = statistics.median(ratios)
        rows.append({
            "case": case.name, "program": case.program if name != BARE and name != HANDWRITTEN else "-",
            "device": str(device), "side": name, "loss_fn": record.get("loss_fn") if name == PYRO_VAE else None,
            "train_points": data.train.shape[0], "valid_points": data.valid.shape[0], "epochs": args.epochs,
            "seconds_median": statistics.median(times[name]), "seconds": times[name],
            "ratio_median": median, "ratio_min": min(ratios), "ratio_max": max(ratios), "ratio_q1": q1,
            "ratio_q3": q3, "ratios": ratios, "cpu_seconds": cpu[name],
            "cpu_ratio_median": statistics.median(cpu_ratios), "cpu_ratios": cpu_ratios, "target": target,
            "meets_target": None if target is None else median >= target,
        })
    return rows


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
    lines = ["| case | device | side (loss) | train / valid points x epochs | s per run (median) | "
             "speed ratio to the hand-written script (median) | min-max | IQR | CPU-time ratio (median) | target |",
             "|---|---|---|---|---:|---:|---|---|---:|---|"]
    for r in rows:
        target = "" if r["target"] is None else f"{r['target']:.2f} {'met' if r['meets_target'] else 'NOT met'}"
        side = r["side"] + (f" ({r['loss_fn']})" if r["loss_fn"] else "")
        lines.append(f"| {r['case']} | {r['device']} | {side} | {r['train_points']} / {r['valid_points']} x "
                     f"{r['epochs']} | {r['seconds_median']:.2f} | {r['ratio_median']:.3f} | "
                     f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f} | {r['ratio_q1']:.3f}-{r['ratio_q3']:.3f} | "
                     f"{r['cpu_ratio_median']:.3f} | {target} |")
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
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per case (default %(default)s)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per training run (default %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CPU, and CUDA too when available")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--data-dir", default=os.environ.get("PYRO_VAE_DATA"),
                   help="folder with binarized-mnist/ (default: $PYRO_VAE_DATA); random binary data when absent")
    p.add_argument("--baselines", action="store_true", help="also time Pyro's SVI with pyro.optim.Adam")
    p.add_argument("--json", type=Path, default=None, help="write all results as JSON here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.epochs < 1:
        p.error(f"--repeats and --epochs must be positive, got {args.repeats} and {args.epochs}")
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
