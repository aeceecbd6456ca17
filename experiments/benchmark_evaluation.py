"""Benchmark: ``pyro-vae evaluate`` against a hand-written importance-sampling loop, side by side.

The hand-written side is plain PyTorch over the run's own networks
(:func:`handwritten.importance_log_likelihood`: encoder, ``K`` reparameterized
draws, decoder, Bernoulli log-likelihood, log-weights, a running ``logsumexp``),
in the run's float dtype, with particles in chunks of ``--hand-chunk`` (default:
the fastest of a short sweep, so it gets the same chunking freedom as the
library).  It computes ``log p(x)`` only; the library sides compute everything
``pyro-vae evaluate`` reports.  Sides:

* ``entry point``: :func:`pyro_vae.evaluation.run.evaluate` (what ``pyro-vae evaluate``
  runs) with ``num_points=--points`` and no pictures, writing its report into a
  scratch folder: reopening the run, loading the data, the evaluation, the report;
* ``evaluate_test_set``: :func:`pyro_vae.evaluation.evaluator.evaluate_test_set` on the
  run's program (bounds, IWAE-k, Renyi, k-hat, latent diagnostics);
* ``log p(x) only``: :func:`pyro_vae.evaluation.importance.importance_log_likelihood`;
* ``before`` (with ``--before``): ``evaluate_test_set`` with traces sized by the memory
  budget alone (no ``CPU_TRACE_MB``/``THREADED_CPU_TRACE_MB`` cap of
  :mod:`pyro_vae.evaluation.importance`) and
  k-hat from ArviZ's ``psislw`` row by row.

Timing: one warm-up block per side, then ``--rounds`` rounds; in a round every
side (the hand-written one included) evaluates the same ``--points`` test points
once, in alternating order (forward, then backward), and a side's ratio in that
round is its time over the hand-written time of the *same* round (1.0 = as fast,
above 1 = slower).  The table gives the median ratio over rounds with its range,
for wall-clock and for process CPU time (the latter is not inflated by waiting
for a core on a shared machine).  Each round also times a 2048^3 ``torch.mm``
and the decoder's own ``linear`` at the trace's shape: the physical floor is
the network FLOPs per (point, particle) (counted with ``FlopCounterMode``) over
that rate.  ``--threads 1,default`` repeats everything at each torch thread count.

    python experiments/benchmark_evaluation.py --run-dir RUN --points 10 --particles 5000 \\
        --threads 1,default --before --json /tmp/benchmark-evaluation.json

Without ``--run-dir`` it first trains a 784-400-20 MLP VAE for one epoch on
binarized MNIST (``pyro-vae train --data binarized-mnist --epochs 1``) into a
temporary folder.  ``--sweep`` also times the hand-written loop and
``evaluate_test_set`` at several trace sizes (the sweeps behind ``CPU_TRACE_MB`` at one
thread and ``THREADED_CPU_TRACE_MB`` at several).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import handwritten  # noqa: E402

from pyro_vae.evaluation import arviz_compat, importance  # noqa: E402
from pyro_vae.evaluation import run as run_module  # noqa: E402
from pyro_vae.evaluation.evaluator import EvaluationOptions, evaluate_test_set  # noqa: E402
from pyro_vae.train.runs import load_run  # noqa: E402

HAND = "hand-written"
BEST_HAND = "hand-written, fastest chunk"
FULL_TEST_POINTS = 10_000
PAPER_PARTICLES = 5000
SWEEP_PAIRS = (250, 500, 1000, 2000, 5000, 15000)


# -- the run -------------------------------------------------------------------------------------

def train_tiny_run(data_dir: str | None) -> Path:
    """A 784-400-20 MLP VAE trained one epoch on binarized MNIST, in a temporary folder."""
    run_dir = Path(tempfile.mkdtemp(prefix="evalbench-")) / "run"
    command = [sys.executable, "-m", "pyro_vae", "train", "--data", "binarized-mnist", "--epochs", "1",
               "--run-dir", str(run_dir), "--no-progress"]
    if data_dir:
        command += ["--data-dir", data_dir]
    print("training:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return run_dir


# -- the sides -----------------------------------------------------------------------------------

@contextlib.contextmanager
def uncapped_traces() -> Iterator[None]:
    """Traces sized by the memory budget alone and k-hat from ArviZ row by row."""
    caps, rows = (importance.CPU_TRACE_MB, importance.THREADED_CPU_TRACE_MB), arviz_compat._khat_rows
    importance.CPU_TRACE_MB = importance.THREADED_CPU_TRACE_MB = 1e12  # no cap
    arviz_compat._khat_rows = lambda lw, backend: rows(lw, "arviz" if backend is None else backend)
    try:
        yield
    finally:
        (importance.CPU_TRACE_MB, importance.THREADED_CPU_TRACE_MB), arviz_compat._khat_rows = caps, rows


@contextlib.contextmanager
def trace_pairs(pairs: int, per_pair: int) -> Iterator[None]:
    """Traces of about ``pairs`` (point, particle) pairs on a CPU (for the sweep)."""
    saved = importance.CPU_TRACE_MB, importance.THREADED_CPU_TRACE_MB, importance.MIN_CPU_TRACE_PAIRS
    cap = (pairs + 0.5) * per_pair / 2**20
    importance.CPU_TRACE_MB, importance.THREADED_CPU_TRACE_MB, importance.MIN_CPU_TRACE_PAIRS = cap, cap, 1
    try:
        yield
    finally:
        importance.CPU_TRACE_MB, importance.THREADED_CPU_TRACE_MB, importance.MIN_CPU_TRACE_PAIRS = saved


def hand_written(run, x: torch.Tensor, particles: int, pairs: int) -> Callable[[], object]:
    """The hand-written loop over ``x`` in chunks of about ``pairs`` (point, particle) pairs."""
    vae = run.program.module
    points, chunk = max(1, pairs // particles), min(particles, pairs)
    return lambda: handwritten.importance_log_likelihood(vae.encoder.net, vae.decoder.net, x, particles,
                                                         chunk_size=chunk, batch_size=points)


def make_sides(args, run, x: torch.Tensor, scratch: Path, plan_pairs: int) -> dict[str, Callable[[], object]]:
    """The hand-written loop in the library's chunks (the reference), in the fastest chunks of the
    sweep when those differ, and the library's sides."""
    K = args.particles
    options = EvaluationOptions(num_particles=K)
    entry_kwargs = dict(num_points=x.shape[0], plots_=False, data_dir=args.data_dir, device="cpu")
    if "out_dir" in inspect.signature(run_module.evaluate).parameters:
        entry_kwargs["out_dir"] = scratch  # never overwrite the run's own report

    def entry() -> object:
        return run_module.evaluate(args.run_dir, K, **entry_kwargs)

    def before() -> object:
        with uncapped_traces():
            return evaluate_test_set(run.program, x, None, options)

    sides: dict[str, Callable[[], object]] = {HAND: hand_written(run, x, K, plan_pairs)}
    if args.hand_chunk != plan_pairs:
        sides[BEST_HAND] = hand_written(run, x, K, args.hand_chunk)
    sides.update({
        "entry point": entry,
        "evaluate_test_set": lambda: evaluate_test_set(run.program, x, None, options),
        "log p(x) only": lambda: importance.importance_log_likelihood(run.program, x, num_particles=K),
    })
    if "out_dir" not in entry_kwargs:
        del sides["entry point"]  # an evaluate() without out_dir would overwrite the run's report
        print("run.evaluate has no out_dir: entry point side skipped", flush=True)
    if args.before:
        sides["before"] = before
    return sides


# -- the floor -----------------------------------------------------------------------------------

def flops_per_pair(run, input_dim: int, particles: int) -> dict[str, float]:
    """FLOPs of the decoder per (point, particle) and of the encoder per point, counted by
    ``FlopCounterMode`` (matmuls and convolutions), and their sum per pair at ``particles``."""
    vae = run.program.module
    latent = vae.encoder.latent_dim
    with torch.no_grad():
        with FlopCounterMode(display=False) as dec_count:
            vae.decoder.net(torch.zeros(100, latent))
        with FlopCounterMode(display=False) as enc_count:
            vae.encoder.net(torch.zeros(100, input_dim))
    decoder = dec_count.get_total_flops() / 100
    encoder = enc_count.get_total_flops() / 100
    return {"decoder_per_pair": decoder, "encoder_per_point": encoder,
            "per_pair": decoder + encoder / particles}


def matmul_rates(run, pairs: int) -> dict[str, float]:
    """GFLOP/s of a 2048^3 ``torch.mm`` and of the decoder's widest ``linear`` at ``pairs`` rows."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    start = time.perf_counter()
    torch.mm(a, b)
    mm = 2 * 2048**3 / (time.perf_counter() - start) / 1e9
    layers = [m for m in run.program.module.decoder.net.modules() if isinstance(m, torch.nn.Linear)]
    widest = max(layers, key=lambda m: m.in_features * m.out_features)
    h = torch.randn(pairs, widest.in_features)
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(5):
            widest(h)
        linear = 5 * 2 * pairs * widest.in_features * widest.out_features / (time.perf_counter() - start) / 1e9
    return {"mm_2048_gflops": mm, "decoder_linear_gflops": linear}


# -- timing --------------------------------------------------------------------------------------

def timed(fn: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def ratio_stats(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "q1": q[0], "q3": q[2]}


def interleave(sides: dict[str, Callable[[], object]], rounds: int, probe: Callable[[], dict] | None = None
               ) -> dict:
    """Every side once per round, alternating order; per-side times and per-round ratios to HAND."""
    names = list(sides)
    times = {name: {"wall": [], "cpu": []} for name in names}
    probes = []
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            wall, cpu = timed(sides[name])
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
        if probe is not None:
            probes.append(probe())
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n]['wall'][-1]:.2f}s" for n in names),
              flush=True)
    ratios = {name: {kind: ratio_stats([s / h for s, h in zip(times[name][kind], times[HAND][kind])])
                     for kind in ("wall", "cpu")} for name in names if name != HAND}
    best = BEST_HAND if BEST_HAND in times else HAND
    to_best = {name: ratio_stats([s / h for s, h in zip(times[name]["wall"], times[best]["wall"])])
               for name in names if name not in (HAND, BEST_HAND)}
    return {"times": times, "ratios": ratios, "ratios_to_fastest_hand_written": to_best, "probes": probes}


def threads_setting(value: str) -> int:
    return torch.get_num_threads() if value == "default" else int(value)


# -- main ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", help="a trained run (default: train a tiny one first)")
    parser.add_argument("--data-dir", default=os.environ.get("PYRO_VAE_DATA"))
    parser.add_argument("--points", type=int, default=10, help="test points per block (default 10)")
    parser.add_argument("--particles", type=int, default=PAPER_PARTICLES, help="K (default 5000)")
    parser.add_argument("--threads", default="1", help="comma-separated torch thread counts, or 'default'")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--hand-chunk", type=int, default=0,
                        help="(point, particle) pairs per hand-written chunk (default: fastest of a sweep)")
    parser.add_argument("--before", action="store_true", help="also time evaluate_test_set with traces sized by the memory budget alone and k-hat row by row")
    parser.add_argument("--sweep", action="store_true", help="also time both sides at several trace sizes")
    parser.add_argument("--json", help="write every timing here")
    args = parser.parse_args(argv)
    default_threads = torch.get_num_threads()
    args.run_dir = args.run_dir or str(train_tiny_run(args.data_dir))
    run = load_run(args.run_dir, "cpu")
    data = run.load_data(args.data_dir)
    x = data.test[:args.points]
    K = args.particles
    flops = flops_per_pair(run, x.shape[-1], K)
    out: dict = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                 "machine": {"cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
                             "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
                             "load_average": os.getloadavg()},
                 "run_dir": args.run_dir, "points_per_block": args.points, "particles": K, "dtype": str(x.dtype),
                 "flops": flops, "settings": {}}
    print(f"FLOPs per (point, particle): {flops['per_pair']:.4g} (decoder {flops['decoder_per_pair']:.4g}, "
          f"encoder per point {flops['encoder_per_point']:.4g})", flush=True)
    with tempfile.TemporaryDirectory(prefix="evalbench-report-") as scratch:
        for setting in args.threads.split(","):
            threads = default_threads if setting == "default" else int(setting)
            torch.set_num_threads(threads)
            print(f"\n== {threads} torch thread(s) ==", flush=True)
            plan = importance.plan_chunks(run.program, data.test.shape[0], K, x.shape[-1], dtype=x.dtype,
                                          device="cpu")
            print(f"plan for {data.test.shape[0]} test points: {plan.as_dict()}", flush=True)
            result: dict = {"threads": threads, "plan": plan.as_dict()}
            trace_pairs_now = plan.points_per_trace * plan.particles_per_trace
            if args.hand_chunk <= 0 or args.sweep:
                result["sweep"] = sweep(args, run, x, plan.bytes_per_pair)
                best = min(result["sweep"]["hand"], key=lambda p: statistics.median(result["sweep"]["hand"][p]))
                hand_chunk = args.hand_chunk or int(best)
            else:
                hand_chunk = args.hand_chunk
            result["hand_chunk_pairs"] = hand_chunk
            sides = make_sides(argparse.Namespace(**{**vars(args), "hand_chunk": hand_chunk}), run, x,
                               Path(scratch), trace_pairs_now)
            for name, fn in sides.items():  # warm-up: allocator, MKL, imports
                fn()
            result.update(interleave(sides, args.rounds, lambda: matmul_rates(run, trace_pairs_now)))
            summarize(result, args, flops)
            out["settings"][str(threads)] = result
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return out


def sweep(args, run, x: torch.Tensor, per_pair: int) -> dict:
    """Per-block seconds of the hand-written loop and of ``evaluate_test_set`` at each trace size."""
    vae = run.program.module
    K = args.particles
    options = EvaluationOptions(num_particles=K)
    hand, lib = {}, {}
    sides = {}
    for pairs in SWEEP_PAIRS:
        particles, points = min(K, pairs), max(1, pairs // K)
        sides[f"hand {pairs}"] = (lambda p=particles, b=points: handwritten.importance_log_likelihood(
            vae.encoder.net, vae.decoder.net, x, K, chunk_size=p, batch_size=b))
        if args.sweep:
            def library(pairs=pairs):
                with trace_pairs(pairs, per_pair):
                    evaluate_test_set(run.program, x, None, options)
            sides[f"lib {pairs}"] = library
    names = list(sides)
    rounds = 3
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            wall, _ = timed(sides[name])
            kind, pairs = name.split()
            (hand if kind == "hand" else lib).setdefault(pairs, []).append(wall)
    for pairs in hand:
        line = f"  sweep {pairs:>6} pairs/trace: hand-written {statistics.median(hand[pairs]):.2f}s"
        if pairs in lib:
            line += f", evaluate_test_set {statistics.median(lib[pairs]):.2f}s"
        print(line, flush=True)
    return {"hand": hand, "library": lib}


def summarize(result: dict, args, flops: dict) -> None:
    """Print the table and the floor; store the extrapolations in ``result``."""
    times, K, P = result["times"], args.particles, args.points
    rates = result["probes"]
    mm = statistics.median(p["mm_2048_gflops"] for p in rates)
    linear = statistics.median(p["decoder_linear_gflops"] for p in rates)
    best = BEST_HAND if BEST_HAND in times else HAND
    best_wall = statistics.median(times[best]["wall"])
    floor_s = flops["per_pair"] * K * P / (mm * 1e9)
    result["floor"] = {"mm_2048_gflops": mm, "decoder_linear_gflops": linear, "block_seconds_at_mm_rate": floor_s,
                       "full_test_set_seconds_at_mm_rate": floor_s * FULL_TEST_POINTS / P * PAPER_PARTICLES / K}
    blocks = FULL_TEST_POINTS / P * PAPER_PARTICLES / K
    chunks = {HAND: result["plan"]["points_per_trace"] * result["plan"]["particles_per_trace"],
              BEST_HAND: result["hand_chunk_pairs"]}
    print(f"\n| side | s per block (median) | pt/s | time ratio to {HAND} in the library's chunks, wall "
          f"(median, min-max) | the same, CPU time | time ratio to the fastest hand-written chunks, wall "
          f"| full test set, K={PAPER_PARTICLES} (extrapolated) |")
    print("|---|---:|---:|---|---|---|---:|")
    extrapolated = {}
    for name in times:
        wall = statistics.median(times[name]["wall"])
        extrapolated[name] = wall * blocks
        label = f"{name} ({chunks[name]} pairs/chunk)" if name in chunks else name
        cells = ["1", "1"] if name == HAND else [
            f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})" for r in
            (result["ratios"][name]["wall"], result["ratios"][name]["cpu"])]
        to_best = result["ratios_to_fastest_hand_written"].get(name)
        cells.append("1" if name == best else "" if to_best is None else
                     f"{to_best['median']:.3f} ({to_best['min']:.3f}-{to_best['max']:.3f})")
        print(f"| {label} | {wall:.2f} | {P / wall:.2f} | {' | '.join(cells)} | {wall * blocks / 60:.1f} min |")
    result["extrapolated_full_seconds"] = extrapolated
    if "entry point" in times and "evaluate_test_set" in times:
        # The entry point's extra time per call (reopening the run, loading and checking the data set,
        # writing the report) does not grow with the points: at the full test set it is spread thin.
        fixed = statistics.median(e - t for e, t in zip(times["entry point"]["wall"],
                                                        times["evaluate_test_set"]["wall"]))
        full = fixed + blocks * statistics.median(times["evaluate_test_set"]["wall"])
        result["entry_point_fixed_seconds"] = fixed
        result["entry_point_full_ratio"] = full / (blocks * best_wall)
        print(f"| entry point at {FULL_TEST_POINTS} points (fixed {fixed:.2f} s per call + evaluate_test_set's "
              f"time per point) | | | | | {result['entry_point_full_ratio']:.3f} | {full / 60:.1f} min |")
    print(f"\nfloor: {flops['per_pair']:.4g} FLOP per (point, particle) at {mm:.1f} GFLOP/s (2048^3 torch.mm; "
          f"decoder linear at the trace's shape: {linear:.1f} GFLOP/s) = {floor_s:.2f} s per block, "
          f"{result['floor']['full_test_set_seconds_at_mm_rate'] / 60:.1f} min for the full test set; "
          f"the fastest hand-written loop runs at {floor_s / best_wall:.0%} of the floor's speed, "
          f"evaluate_test_set at {floor_s / statistics.median(times['evaluate_test_set']['wall']):.0%}")


if __name__ == "__main__":
    main()
