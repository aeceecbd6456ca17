"""What the experiment scripts share: options, cells trained and evaluated through the public API,
and results kept as raw JSON and a markdown table.

A *cell* is one training run and its evaluation: ``pyro_vae.train`` on a
:class:`~pyro_vae.TrainConfig` (optionally in stages of any number of passes,
each resumed with its own learning rate up to its optimizer step, as the
schedule of Burda et al. 2016 needs), then ``pyro_vae.evaluate`` on the test
set.  Results are written after every cell (atomically), and a script started
again with the same ``--out`` skips the cells it already has, so an interrupted
experiment loses at most one cell; a cell whose training was interrupted
resumes from its checkpoint.

Every script takes ``--seed``, ``--device``, ``--data-dir``, ``--out`` and
``--smoke`` (a seconds-long run on the embedded 8x8 digits, what the test
suite runs), and shows a progress bar over its cells.  ``--cells`` runs some
cells only; several processes with the same ``--out`` may each run their own,
since a cell is merged into ``results.json`` under a file lock.  ``--jobs N``
does that for you: N worker processes of one torch thread each, every one
running the script again on its share of the cells (shares balanced by an
estimated cost), while this process shows which cells are done, passes a
stop signal on to the workers, and writes the tables once they are all done.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyro  # noqa: E402

from pyro_vae import TrainConfig, evaluate, load_dataset, load_run, train  # noqa: E402
from pyro_vae.cli.arguments import positive_int  # noqa: E402
from pyro_vae.infer.objectives import draws_per_point  # noqa: E402
from pyro_vae.train.checkpoint import CheckpointError  # noqa: E402
from pyro_vae.train.rundir import is_locked  # noqa: E402

#: Evaluation of a smoke run: few draws on few points.
SMOKE_EVAL = {"particles": 20, "num_points": 60, "iwae_ks": (1, 5)}
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
#: Options that say how an experiment is run, not what it computes: left out of its settings.
#: (Where the data sets lie is one of them: each run checks the data's fingerprint itself.)
NOT_SETTINGS = ("progress", "cells", "jobs", "command_line", "data_dir")
#: What every stop of an experiment ends with: a script started again continues where it stopped.
TO_CONTINUE = "run the same command again to continue"
#: Seconds between two looks at the workers of ``--jobs``.
POLL_SECONDS = 1.0


class ExperimentParser(argparse.ArgumentParser):
    """An experiment's options; the parsed options also keep the script and its arguments as
    ``command_line``, which the workers of ``--jobs`` run again, each on its share of the cells."""

    script = ""

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:
        argv = list(sys.argv[1:] if args is None else args)
        parsed = super().parse_args(argv, namespace)
        parsed.command_line = (self.script, argv)
        return parsed


def experiment_parser(description: str, default_out: str, eval_points: int | None = None) -> ExperimentParser:
    """The options every experiment takes (``eval_points``: the default of ``--eval-points``); made by
    the script's ``main``, whose file the workers of ``--jobs`` run."""
    p = ExperimentParser(description=description)
    p.script = sys._getframe(1).f_code.co_filename
    p.add_argument("--seed", type=int, default=0, help="seed of training and evaluation (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--data-dir", default=os.environ.get("PYRO_VAE_DATA"),
                   help="folder with the data sets (default: $PYRO_VAE_DATA)")
    p.add_argument("--out", type=Path, default=Path("runs") / default_out,
                   help=f"folder for the runs, {RESULTS_JSON} and {RESULTS_MD} (default runs/{default_out}); "
                        "started again, the script skips the cells it already has")
    p.add_argument("--eval-particles", type=int, default=5000,
                   help="importance samples K per test point (default 5000, as in Burda et al. 2016)")
    p.add_argument("--eval-points", type=int, default=eval_points,
                   help=f"evaluate only the first N test points (default: {eval_points or 'all'}; the first MNIST "
                        "test images are easier than the rest, so a subset is not comparable with full-test-set "
                        "numbers)")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run on the 8x8 digits (for tests)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--cells", nargs="+", metavar="KEY", default=None,
                   help="run only these cells (keys as in results.json); scripts with the same --out and "
                        "different --cells may run at once, each adding its cells to the one results.json")
    p.add_argument("--jobs", type=positive_int, default=1, metavar="N",
                   help="run the cells in N worker processes of one torch thread each (default 1: all in this process)")
    return p


@dataclass
class Cell:
    """One training run and its evaluation.

    ``options`` are flat :class:`~pyro_vae.TrainConfig` options (``objective``,
    ``particles``, ``hidden``, ...).  ``stages`` are ``(passes, lr)`` pairs,
    the passes any positive number: each stage resumes the run with its learning
    rate and trains up to the optimizer step its passes so far come to
    (:func:`stage_ends`); empty means one stage of ``options["epochs"]``.
    """

    key: str
    options: dict[str, Any]
    stages: list[tuple[float, float]] = field(default_factory=list)
    labels: dict[str, Any] = field(default_factory=dict)  # columns of the table that describe the cell


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor())
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "pyro": pyro.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class Results:
    """The experiment's raw results: ``results.json`` under ``out``, rewritten after every cell."""

    def __init__(self, out: Path, name: str, args: argparse.Namespace) -> None:
        self.out = out
        self.path = out / RESULTS_JSON
        out.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {}
        if self.path.is_file():
            self.data = json.loads(self.path.read_text())
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    if k not in NOT_SETTINGS}
        recorded = {k: v for k, v in self.data.get("settings", {}).items() if k not in NOT_SETTINGS}
        if self.data and recorded != settings:
            raise SystemExit(f"{self.path} holds results of other settings ({self.data.get('settings')}); "
                             "use another --out, or delete it to start again")
        self.data.setdefault("experiment", name)
        self.data["command"] = command_without_cells(self.data.get("command")
                                                     or " ".join([Path(sys.executable).name, *sys.argv]))
        self.data["settings"] = settings
        self.data["machine"] = machine()
        self.data.setdefault("cells", {})

    @property
    def cells(self) -> dict[str, dict[str, Any]]:
        return self.data["cells"]

    def add(self, key: str, row: dict[str, Any], order: Sequence[str] = ()) -> None:
        """Record cell ``key``, merged with the cells other processes wrote meanwhile, in ``order``."""
        def change(data: dict[str, Any]) -> None:
            data["cells"][key] = row
            rank = {k: i for i, k in enumerate(order)}
            data["cells"] = dict(sorted(data["cells"].items(), key=lambda item: rank.get(item[0], len(rank))))
        self._update(change)

    def set(self, name: str, value: Any) -> None:
        """Record a result that belongs to no cell (a figure's numbers), merged like :meth:`add`."""
        self._update(lambda data: data.__setitem__(name, value))

    def refresh(self) -> None:
        """Take in the cells other processes have written since."""
        with self._locked():
            self._merge_from_disk()

    def _update(self, change: Callable[[dict[str, Any]], None]) -> None:
        with self._locked():
            self._merge_from_disk()
            change(self.data)
            self.data["updated"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            self.save()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.out / ".results.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _merge_from_disk(self) -> None:
        if self.path.is_file():
            on_disk = json.loads(self.path.read_text())
            self.data = {**on_disk, **{k: v for k, v in self.data.items() if k not in on_disk},
                         "cells": {**on_disk.get("cells", {}), **self.cells}}

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)

    def write_markdown(self, text: str) -> Path:
        path = self.out / RESULTS_MD
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path


def base_options(args: argparse.Namespace) -> dict[str, Any]:
    """Options every cell shares: seed, device, data folder, no inner progress bars, no early stop."""
    options: dict[str, Any] = {"seed": args.seed, "device": args.device, "progress": False, "patience": 0}
    if args.data_dir:
        options["data_dir"] = str(args.data_dir)
    return options


def evaluation_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.smoke:
        return dict(SMOKE_EVAL)
    return {"particles": args.eval_particles, "num_points": args.eval_points}


def stage_ends(passes: Sequence[float], steps_per_epoch: int) -> list[int]:
    """The optimizer step each stage trains up to: the passes so far in steps, rounded, and every stage
    at least one step; the last stage ends at the nearest end of an epoch (at least one epoch, and
    past the stage before), so the run's last metrics row, its ``best.pt`` and the evaluation all
    come after the whole of it."""
    ends: list[int] = []
    total = 0.0
    for p in passes:
        if not (isinstance(p, (int, float)) and math.isfinite(p) and p > 0):
            raise ValueError(f"a stage's passes must be a positive number, got {p!r}")
        total += p
        ends.append(max(round(total * steps_per_epoch), (ends[-1] if ends else 0) + 1))
    before = ends[-2] if len(ends) > 1 else 0
    ends[-1] = max(round(total), 1, math.ceil((before + 1) / steps_per_epoch)) * steps_per_epoch
    return ends


def _train_cell(cell: Cell, run_dir: Path, args: argparse.Namespace) -> tuple[float, int, float]:
    """Train (or finish training) ``cell`` into ``run_dir``, stage by stage (each one a resumed run
    with its learning rate and its ``max_steps``); the seconds spent now, and the optimizer steps and
    passes over the training set the run comes to."""
    config = TrainConfig.from_flat({**base_options(args), **cell.options, "run_dir": str(run_dir)})
    stages = cell.stages or [(config.epochs, config.lr)]
    dataset = load_dataset(config.data, config.data_dir)  # once for all the stages
    steps_per_epoch = math.ceil(dataset.train.shape[0] / config.batch_size)
    ends = stage_ends([passes for passes, _ in stages], steps_per_epoch)
    start = time.perf_counter()
    for i, (end, (_, lr)) in enumerate(zip(ends, stages)):
        last = i == len(stages) - 1  # it ends with an epoch: no step limit, the run is then finished
        stage = config.replace(epochs=math.ceil(end / steps_per_epoch), max_steps=0 if last else end, lr=lr)
        result = train(stage, dataset=dataset, resume=(run_dir / "checkpoint.pt").is_file())
        if result.interrupted:
            raise KeyboardInterrupt(f"training of {cell.key} was interrupted and saved")
    return time.perf_counter() - start, ends[-1], ends[-1] / steps_per_epoch


def run_cell(cell: Cell, args: argparse.Namespace) -> dict[str, Any]:
    """Train and evaluate ``cell`` under ``args.out/runs``; the row of raw results."""
    run_dir = args.out / "runs" / cell.key
    train_seconds, steps, passes = _train_cell(cell, run_dir, args)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    eval_options = evaluation_options(args)
    report = evaluate(run_dir, seed=args.seed, plots_=False, data_dir=args.data_dir, device=args.device,
                      out_dir=run_dir / "evaluation", **eval_options)
    results = report["results"]
    epoch_seconds = [row["seconds"] for row in metrics if row.get("seconds")]
    return {
        **cell.labels,
        "key": cell.key,
        "options": cell.options,
        "stages": cell.stages,
        "run_dir": str(run_dir),
        "epochs": metrics[-1]["epoch"] if metrics else 0,
        "steps": steps,
        "passes": passes,
        "train_seconds": train_seconds,
        "seconds_per_epoch": sum(epoch_seconds) / len(epoch_seconds) if epoch_seconds else None,
        "curve": [{"epoch": row["epoch"], "train_loss": row["train_loss"], "valid_elbo": row["valid_elbo"],
                   "valid_bound": row["valid_bound"]} for row in metrics],
        "test_points": results["num_points"],
        "eval_particles": results["num_particles"],
        "log_likelihood": results["log_likelihood"],
        "elbo": results["elbo"],
        "reconstruction": results["reconstruction"],
        "kl": results["kl"],
        "iwae": results["iwae"],
        "active_units": results["active_units_total"],
        "khat_above_0.7": results["psis"].get("fraction_above_0.7") if isinstance(results.get("psis"), dict) else None,
        "eval_seconds": report["seconds"],
    }


@contextlib.contextmanager
def stopped_cleanly(what: str) -> Iterator[None]:
    """Turn a Ctrl-C inside the block into one line on stderr and exit status 130, not a traceback:
    a stop is how a long experiment is paused, and the script started again continues it (training
    has saved its checkpoint; an evaluation cut short is done again)."""
    try:
        yield
    except KeyboardInterrupt as stop:
        print(f"{str(stop) or what}; {TO_CONTINUE}", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None


def accept_stops(what: str) -> None:
    """Let a Ctrl-C in: a worker of ``--jobs`` starts with it held back (:func:`start_worker`), so a stop
    sent while it is still importing arrives here and ends the worker cleanly, saying ``what`` stopped,
    and not as a traceback from inside an import.  Elsewhere it changes nothing."""
    with stopped_cleanly(what):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def start_worker(command: Sequence[str], env: dict[str, str]) -> subprocess.Popen:
    """Start ``command`` in a session of its own with Ctrl-C held back (blocked, so kept pending, not
    lost) until it calls :func:`accept_stops`.  The mask is set in this process around the fork, which
    the child inherits, rather than in a ``preexec_fn``, which is unsafe beside torch's threads."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return subprocess.Popen(list(command), env=env, start_new_session=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def run_cells(cells: Sequence[Cell], results: Results, args: argparse.Namespace,
              after: Callable[[Results], None] | None = None, cost: Callable[[Cell], float] | None = None) -> None:
    """Run every cell ``results`` lacks (of ``args.cells`` only, when given), saving after each;
    ``after(results)`` redraws the tables.  A cell another process sharing ``--out`` has finished
    meanwhile, or is training now (its run directory locked), is left to it.  With ``--jobs`` N > 1
    the cells go to N workers (:func:`run_workers`), their shares balanced by ``cost`` (default
    :func:`draws_cost`)."""
    keys = [cell.key for cell in cells]
    if len(set(keys)) != len(keys):
        raise ValueError(f"cell keys must be unique, got {keys}")
    wanted = getattr(args, "cells", None)
    unknown = sorted(set(wanted or ()) - set(keys))
    if unknown:
        raise SystemExit(f"--cells: no cell named {', '.join(unknown)}; the cells are {', '.join(keys)}")
    todo = [cell for cell in cells if cell.key not in results.cells and (not wanted or cell.key in wanted)]
    accept_stops(f"stopped before {' '.join(cell.key for cell in todo) or 'any cell'} started")
    if getattr(args, "jobs", 1) > 1:
        try:
            run_workers(todo, results, args, cost or draws_cost)
        finally:
            if after is not None:
                after(results)
        return
    bar = tqdm(todo, desc=results.data["experiment"], unit="cell", disable=not args.progress, dynamic_ncols=True)
    for cell in bar:
        bar.set_postfix_str(cell.key)
        results.refresh()
        if cell.key in results.cells or is_locked(args.out / "runs" / cell.key):
            continue
        pyro.clear_param_store()
        with stopped_cleanly(f"cell {cell.key} was interrupted"):
            try:
                results.add(cell.key, run_cell(cell, args), order=keys)
            except CheckpointError as error:
                raise SystemExit(f"cell {cell.key}: {error}") from None
        if after is not None:
            after(results)
    if after is not None:
        after(results)


def draws_cost(cell: Cell) -> float:
    """A cell's cost, roughly: draws from the guide per data point times stochastic layers."""
    o = cell.options
    return draws_per_point(o.get("objective", "trace"), o.get("particles"), o.get("groups")) * o.get(
        "stochastic_layers", 1)


def share_cells(cells: Sequence[Cell], jobs: int, cost: Callable[[Cell], float]) -> list[list[str]]:
    """The keys of ``cells`` in at most ``jobs`` disjoint shares of about equal total ``cost``: the
    costliest cell first, each to the share that costs least so far."""
    shares: list[tuple[float, list[str]]] = [(0.0, []) for _ in range(min(jobs, len(cells)))]
    for cell in sorted(cells, key=cost, reverse=True):
        i = min(range(len(shares)), key=lambda j: shares[j][0])
        shares[i] = (shares[i][0] + cost(cell), shares[i][1] + [cell.key])
    return [keys for _, keys in shares]


def run_workers(cells: Sequence[Cell], results: Results, args: argparse.Namespace,
                cost: Callable[[Cell], float]) -> None:
    """Run ``cells`` in ``args.jobs`` worker processes, each the same script on its share of the cells
    (:func:`share_cells`) with one torch thread, all writing into the one ``--out``; wait for them,
    saying which cells are done.  A stop signal (Ctrl-C, SIGTERM, SIGHUP) is passed on to every worker
    as a Ctrl-C, which a worker's training takes as "checkpoint and stop" and anything else unwinds
    from; the workers run in their own sessions, so a Ctrl-C in the terminal reaches them once, from
    here.  A worker that fails, or a stop, ends this with a non-zero exit."""
    if not cells:
        return
    shares = share_cells(cells, args.jobs, cost)
    script, argv = args.command_line
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    results.set("machine", {**machine(), "torch_threads": 1, "workers": len(shares)})
    workers: list[subprocess.Popen] = []
    stops: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        stops.append(signum)
        print(f"{signal.Signals(signum).name}: asking the workers to save and stop", file=sys.stderr)
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGINT)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    bar = tqdm(total=len(cells), desc=results.data["experiment"], unit="cell", disable=not args.progress,
               dynamic_ncols=True)
    failed: list[str] = []
    try:
        for keys in shares:
            if not stops:
                workers.append(start_worker([sys.executable, script, *argv, "--jobs", "1", "--no-progress",
                                             "--cells", *keys], env))
        done: set[str] = set()
        running = set(range(len(workers)))
        while running:
            time.sleep(POLL_SECONDS)
            results.refresh()
            for key in [key for keys in shares for key in keys if key in results.cells and key not in done]:
                done.add(key)
                bar.update()
                tqdm.write(f"{key} done ({len(done)}/{len(cells)} cells)")
            for i in sorted(running):
                code = workers[i].poll()
                if code is not None:
                    running.discard(i)
                    if code and not stops:
                        failed.append(f"worker {i + 1} (cells {' '.join(shares[i])}) exited with status {code}")
                        tqdm.write(failed[-1] + ("; waiting for the others" if running else ""))
    finally:
        bar.close()
        for worker in workers:  # only if this process itself failed: the workers save and stop
            if worker.poll() is None:
                worker.send_signal(signal.SIGINT)
        for worker in workers:
            worker.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        results.refresh()
    if stops:
        print(f"stopped by {signal.Signals(stops[0]).name}: the workers stopped, each run in training saved; "
              f"{TO_CONTINUE}", file=sys.stderr)
        raise SystemExit(128 + stops[0])
    if failed:
        raise SystemExit("; ".join(failed))


def estimate(row: dict[str, Any], name: str) -> str:
    """``mean ± stderr`` of a row's estimate ``name`` (nats), or an empty cell."""
    value = row.get(name)
    if not value:
        return ""
    return f"{value['mean']:.2f} ± {value['stderr']:.2f}"


def fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A markdown table; ``align`` has one of ``l``/``r`` per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    marks = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def command_without_cells(command: str) -> str:
    """``command`` without its ``--cells`` list: the cells of one ``--out`` may be run by several
    processes, and the table is the whole experiment's."""
    words, kept, skipping = command.split(), [], False
    for word in words:
        if word == "--cells":
            skipping = True
        elif skipping and word.startswith("-"):
            skipping = False
        if not skipping:
            kept.append(word)
    return " ".join(kept)


def provenance(results: Results) -> str:
    """Where the numbers come from: the command, the machine and the date."""
    m = results.data["machine"]
    threads = (f"{m['workers']} worker processes of {m['torch_threads']} torch thread(s)" if m.get("workers")
               else f"{m['torch_threads']} torch threads")
    device = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores, {threads}"
    return (f"Command: `{results.data['command']}`  \nMachine: {device}; Python {m['python']}, torch {m['torch']}, "
            f"pyro-ppl {m['pyro']}  \nDate: {results.data.get('updated', 'not finished')}\n")


def smoke_cells(cells: Sequence[Cell], keys: Sequence[str]) -> list[Cell]:
    """The cells of a smoke run: those named, in order (a smoke run checks the machinery, not the table)."""
    by_key = {cell.key: cell for cell in cells}
    missing = [key for key in keys if key not in by_key]
    if missing:
        raise ValueError(f"smoke cells {missing} are not cells of this experiment ({', '.join(by_key)})")
    return [by_key[key] for key in keys]


def smoke_options() -> dict[str, Any]:
    """A model small enough for a seconds-long run on the 8x8 digits."""
    return {"data": "digits", "epochs": 1, "batch_size": 128, "hidden": [32], "latent_dim": 4,
            "checkpoint_every": 0.0}


def reopen(row: dict[str, Any], device: str = "auto"):
    """The trained run of a results row (:func:`pyro_vae.load_run`)."""
    return load_run(row["run_dir"], device=device)
