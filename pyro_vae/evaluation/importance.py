"""Per-data-point importance log-weights from the Pyro model and guide, chunked.

``pyro.infer.importance.vectorized_importance_weights`` sums the data plate
away; test log-likelihoods and per-point diagnostics need one weight per data
point *and* per particle.  :func:`log_weights` runs the guide under a particle
plate, replays the model against it, and keeps each site's log-density per
data point, so it works for any model/guide pair whose sites live inside
``pyro.plate("data", B)`` (:mod:`pyro_vae.train.program`), with any number of
latent sites of any names.

The importance-sampled log-likelihood (the IWAE estimator,
Burda et al. 2016) is ``log (1/K) sum_k p(x, z_k) / q(z_k | x)``.  With
``K = 5000`` over a 10,000-image test set, the decoder's per-pixel tensors
(``K x N x 784``) would need ~150 GB, so the work is cut into *traces* of
``points_per_trace x particles_per_trace`` (data point, particle) pairs sized
from a memory budget (:func:`plan_chunks`), and the per-point results are
reduced as they arrive: :class:`StreamingLogMeanExp` for ``log p(x)`` alone,
or a ``(K, G)`` buffer per group of ``G`` points (:func:`iter_point_groups`)
when all of a point's weights are needed (PSIS k-hat, bounds at several K).

On a CPU the memory budget is not what sets the speed: a trace whose
per-pixel tensors outgrow the cache runs its elementwise passes (the
Bernoulli log-likelihood, activations, sums) from main memory, and a tensor
over glibc's ``mmap`` threshold (at most 32 MB) is mapped, page-faulted and
unmapped afresh on every call.  So on a CPU one trace is further capped at
:data:`CPU_TRACE_MB` (one thread) or :data:`THREADED_CPU_TRACE_MB` (several
threads, whose every op waits for all of them); docs/performance-evaluation.md
has the sweeps behind the numbers.  On a GPU the budget alone sizes a trace.

With a ``seed``, every trace draws from torch's generators seeded by the seed
and the global index of its first point and particle (:func:`seed_trace`), so
a point's draws do not depend on how the data set is cut into groups or
shared between processes: a distributed evaluation, whose ranks take whole
blocks of :attr:`ChunkPlan.block_points` points, gives the numbers of a single
process with the same plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from pyro_vae.infer.bounds import StreamingLogMeanExp
from pyro_vae.infer import weights
from pyro_vae.infer.rng import preserved_rng
from pyro_vae.infer.weights import LogWeights
from pyro_vae.train.distributed import mix_seed
from pyro_vae.train.program import Program, as_program, program_parameters
from pyro_vae.train.trainer import batch_args

DEFAULT_MAX_MEMORY_MB = 512.0
# Share of the memory budget given to one group's (K, G) arrays; the rest bounds one trace.
GROUP_SHARE = 0.25
# Bytes per (point, particle) of a group: three log-weight buffers in the model's dtype, plus
# float64 copies made for PSIS k-hat and temporaries of the per-point reductions.
GROUP_BYTES_PER_PAIR_FLOAT64 = 3
MAX_GROUP_POINTS = 1000
#: tqdm's ``smoothing`` of the progress bars: close to the average rate since the start.
PROGRESS_SMOOTHING = 0.05
#: Cap on one trace's intermediate tensors on a CPU with one torch thread (estimated as in
#: :func:`estimate_bytes_per_pair`): about 1,000 (point, particle) pairs of a 784-400-20 MLP VAE,
#: whose per-pixel tensors (3 MB each) stay in the cache; 5,000 pairs ran 8-40 % slower.
CPU_TRACE_MB = 24.0
#: The cap with several torch threads: every op of a trace is then a parallel region whose threads
#: must all get a core, which on a busy machine can take milliseconds; about 5,000 pairs (16 MB
#: per-pixel tensors, still within a server CPU's last-level cache and under glibc's ``mmap``
#: threshold) ran 2-4x faster than 1,000 pairs with two threads on two shared cores.
THREADED_CPU_TRACE_MB = 112.0
#: Fewest pairs a CPU trace is cut to by :data:`CPU_TRACE_MB` (the memory budget may cut further):
#: below this the per-trace Python cost (a Pyro trace of the program) is no longer negligible.
MIN_CPU_TRACE_PAIRS = 256
#: Fewest points of a block (the unit whose draws are seeded together and that a rank of a
#: distributed evaluation takes whole), unless a group is smaller.
MIN_BLOCK_POINTS = 64


def program_device(program: Program, *args) -> torch.device:
    """The device of the program's parameters (of its owning module when it has one)."""
    program = as_program(program)
    if program.module is not None:
        for tensor in (*program.module.parameters(), *program.module.buffers()):
            return tensor.device
    with preserved_rng():
        for tensor in program_parameters(program, *args, strict=False).values():
            return tensor.device
    return torch.device("cpu")


def log_weights(program: Program, x: torch.Tensor, y: torch.Tensor | None = None,
                num_particles: int = 1) -> LogWeights:
    """Log-weights ``log p(x, z_k) - log q(z_k | x)`` with ``z_k ~ q(z | x)``, in one trace, without
    gradients: :func:`pyro_vae.infer.weights.log_weights` of the program on ``(x,)`` or ``(x, y)``.
    For many particles or points use :func:`iter_point_groups`, which bounds memory."""
    program = as_program(program)
    with torch.no_grad():
        return weights.log_weights(program.model, program.guide, *batch_args(x, y), num_particles=num_particles)


# -- chunking ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ChunkPlan:
    """How a ``(K particles) x (N points)`` computation is cut up.

    One Pyro trace covers ``points_per_trace x particles_per_trace`` pairs; the
    per-point results are assembled in groups of ``group_points`` points (a
    ``(K, group_points)`` buffer).  ``bytes_per_pair`` is the estimate the plan
    was sized from.  A block of ``block_points`` points (whole traces; groups hold
    whole blocks; 0 means one trace's points) is what the ranks of a distributed
    evaluation share out, and the unit of the latent diagnostics' seeded draws.
    """

    num_points: int
    num_particles: int
    points_per_trace: int
    particles_per_trace: int
    group_points: int
    bytes_per_pair: int
    max_memory_mb: float
    block_points: int = 0

    @property
    def block(self) -> int:
        """Points per block: ``block_points``, or one trace's points."""
        return self.block_points or self.points_per_trace

    @property
    def num_traces(self) -> int:
        groups = math.ceil(self.num_points / self.group_points)
        per_group = math.ceil(self.group_points / self.points_per_trace)
        return groups * per_group * math.ceil(self.num_particles / self.particles_per_trace)

    def as_dict(self) -> dict[str, float | int]:
        return {"points_per_trace": self.points_per_trace, "particles_per_trace": self.particles_per_trace,
                "group_points": self.group_points, "block_points": self.block,
                "bytes_per_pair": self.bytes_per_pair, "max_memory_mb": self.max_memory_mb}


def estimate_bytes_per_pair(program: Program, input_dim: int, dtype: torch.dtype = torch.float32,
                            probe_args: tuple | None = None) -> int:
    """Rough peak bytes of intermediate tensors per (data point, particle) pair.

    A trace keeps, per pair, every network layer's output (estimated from the
    parameters: the output width of each weight matrix, about twice with the
    activation), a few copies of the per-feature log-density (``input_dim``),
    and the latent draws and their densities.  This is an estimate that sizes
    chunks, not a measurement.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    program = as_program(program)
    if program.module is not None:  # no need to run the program to find its parameters
        params = list(program.module.parameters())
    else:
        args = probe_args if probe_args is not None else (torch.zeros(2, input_dim, dtype=dtype),)
        with preserved_rng():
            params = list(program_parameters(program, *args, strict=False).values())
    widths = 0
    for p in params:
        if p.dim() == 2:
            widths += p.shape[0]
        elif p.dim() > 2:  # convolution kernels: channels times the (at most input-sized) feature map
            widths += p.shape[0] * input_dim // max(1, p.shape[1])
    if widths == 0:
        widths = 2 * input_dim
    return itemsize * (3 * input_dim + 2 * widths + 64)


def plan_chunks(program: Program, num_points: int, num_particles: int, input_dim: int,
                max_memory_mb: float = DEFAULT_MAX_MEMORY_MB, dtype: torch.dtype = torch.float32,
                probe_args: tuple | None = None, device: torch.device | str | None = None) -> ChunkPlan:
    """Size traces and groups so that one trace and one group fit in ``max_memory_mb``.

    Three quarters of the budget bound one trace; on a CPU (``device``, by default
    the program's) one trace is also capped at :data:`CPU_TRACE_MB` with one torch
    thread, :data:`THREADED_CPU_TRACE_MB` with several (but not below
    :data:`MIN_CPU_TRACE_PAIRS` pairs), so that it runs from the cache.  The draws a
    seed gives depend on the plan, so on the device and on whether torch runs one
    thread or several (not on the result's distribution).  All ``K``
    particles of a point go into one trace when they fit (then several points
    share the trace), otherwise a point's particles are split into near-equal
    chunks.  The last quarter bounds the ``(K, G)`` arrays of a group of ``G``
    points (at most :data:`MAX_GROUP_POINTS`, at least one trace's points), cut to
    whole blocks of at least :data:`MIN_BLOCK_POINTS` points (whole traces).
    """
    if num_points < 1:
        raise ValueError(f"need at least one data point to evaluate, got {num_points}")
    _check_particles(num_particles)
    if not max_memory_mb > 0:
        raise ValueError(f"max_memory_mb must be positive, got {max_memory_mb!r}")
    program = as_program(program)
    per_pair = estimate_bytes_per_pair(program, input_dim, dtype, probe_args)
    budget = max_memory_mb * 2**20
    pairs = max(1, int(budget * (1 - GROUP_SHARE) // per_pair))
    if device is None:  # without probe arguments a module-less program's device is unknown: sized as for a CPU
        device = program_device(program, *(probe_args or ())) \
            if probe_args is not None or program.module is not None else "cpu"
    if torch.device(device).type == "cpu":
        cap_mb = CPU_TRACE_MB if torch.get_num_threads() == 1 else THREADED_CPU_TRACE_MB
        pairs = min(pairs, max(MIN_CPU_TRACE_PAIRS, int(cap_mb * 2**20 // per_pair)))
    if pairs >= num_particles:
        particles = num_particles
        points = min(num_points, pairs // num_particles)
    else:
        splits = math.ceil(num_particles / pairs)
        particles = math.ceil(num_particles / splits)
        points = 1
    itemsize = torch.empty((), dtype=dtype).element_size()
    group_per_pair = 3 * itemsize + 8 * GROUP_BYTES_PER_PAIR_FLOAT64
    buffer_points = int(budget * GROUP_SHARE // (group_per_pair * num_particles))
    group = min(num_points, max(points, min(MAX_GROUP_POINTS, buffer_points)))
    group = max(points, group - group % points)  # whole traces per group
    block = min(group, points * math.ceil(MIN_BLOCK_POINTS / points))
    group = max(block, group - group % block)  # whole blocks per group
    return ChunkPlan(num_points, num_particles, points, particles, group, per_pair, float(max_memory_mb), block)


def seed_trace(seed: int, point: int, particle: int) -> None:
    """Seed torch's generators for the trace whose first point has global index ``point`` and
    whose first particle is ``particle``."""
    torch.manual_seed(mix_seed(seed, point, particle))


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """A bar over data points (unit ``pt``, so the rate reads points per second) whose
    ETA uses the average rate over the whole run (``smoothing`` near 0): every point
    costs the same, so the average is the honest predictor."""
    return tqdm(total=total, desc=desc, unit="pt", disable=not enabled, leave=False, dynamic_ncols=True,
                smoothing=PROGRESS_SMOOTHING, mininterval=0.5)


def iter_point_groups(program: Program, x: torch.Tensor, y: torch.Tensor | None, num_particles: int,
                      plan: ChunkPlan | None = None, max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
                      progress: bool = False, desc: str = "importance sampling", seed: int | None = None,
                      offset: int = 0) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor | None, LogWeights]]:
    """Yield ``(points, x_group, y_group, LogWeights)`` with ``(K, G)`` weights per group of points.

    Runs on the program's device (each group is moved there), without gradients,
    one Pyro trace per ``plan.points_per_trace x plan.particles_per_trace``
    block, with a progress bar over data points when ``progress`` is set; the bar
    advances as each trace's points get all their particles, not once per group.
    With ``seed``, each trace is seeded from it and its first point's global index
    (``offset`` is the global index of ``x[0]``, a multiple of ``plan.block``);
    without, the traces draw on from torch's generators as they are.
    """
    program = as_program(program)
    probe = batch_args(x[:2], None if y is None else y[:2])
    device = program_device(program, *probe)
    probe = tuple(a.to(device) for a in probe)
    if plan is None:
        plan = plan_chunks(program, x.shape[0], num_particles, x.shape[-1], max_memory_mb, x.dtype, probe,
                           device)
    n = x.shape[0]
    bar = progress_bar(n, desc, progress)
    try:
        for start in range(0, n, plan.group_points):
            points = slice(start, min(start + plan.group_points, n))
            xg = x[points].to(device)
            yg = None if y is None else y[points].to(device)
            parts = _group_log_weights(program, xg, yg, num_particles, plan, bar.update, seed, offset + start)
            yield points, xg, yg, parts
    finally:
        bar.close()


def _group_log_weights(program: Program, x: torch.Tensor, y: torch.Tensor | None, num_particles: int,
                       plan: ChunkPlan, done: Callable[[int], object] = lambda points: None,
                       seed: int | None = None, offset: int = 0) -> LogWeights:
    """``(K, G)`` log-weights of the group ``x``, one trace per block of the plan; ``done(n)`` is
    called as each block of ``n`` points has all its particles.  With ``seed``, each trace is
    seeded by :func:`seed_trace` (``offset``: the global index of ``x[0]``)."""
    g = x.shape[0]
    if g <= plan.points_per_trace and num_particles <= plan.particles_per_trace:
        if seed is not None:
            seed_trace(seed, offset, 0)
        parts = log_weights(program, x, y, num_particles)
        done(g)
        return parts
    buffers: list[torch.Tensor] | None = None
    site_buffers: dict[str, torch.Tensor] = {}
    for p0 in range(0, g, plan.points_per_trace):
        p1 = min(p0 + plan.points_per_trace, g)
        xb = x[p0:p1]
        yb = None if y is None else y[p0:p1]
        for k0 in range(0, num_particles, plan.particles_per_trace):
            k1 = min(k0 + plan.particles_per_trace, num_particles)
            if seed is not None:
                seed_trace(seed, offset + p0, k0)
            part = log_weights(program, xb, yb, k1 - k0)
            if buffers is None:
                buffers = [x.new_empty((num_particles, g)) for _ in range(3)]
                site_buffers = {name: x.new_empty((num_particles, g)) for name in part.sites}
            for buffer, value in zip(buffers, part[:3]):
                buffer[k0:k1, p0:p1] = value
            for name, value in part.sites.items():
                site_buffers[name][k0:k1, p0:p1] = value
        done(p1 - p0)
    return LogWeights(*buffers, site_buffers)


# -- reductions ---------------------------------------------------------------------------

@torch.no_grad()
def importance_log_likelihood(program: Program, x: torch.Tensor, y: torch.Tensor | None = None,
                              num_particles: int = 5000, max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
                              progress: bool = False) -> torch.Tensor:
    """Importance-sampled ``log p(x)`` per data point (the IWAE estimator, Burda et al. 2016).

    ``log (1/K) sum_k p(x, z_k) / q(z_k | x)`` with ``z_k ~ q(z | x)``, streamed
    over particle chunks (:class:`~pyro_vae.infer.bounds.StreamingLogMeanExp`) so
    that only one trace of at most ``max_memory_mb`` is alive at a time.  Returns
    a ``(N,)`` tensor on the program's device.  Its expectation is a lower bound on
    ``log p(x)`` that tightens as ``K`` grows (Burda et al. 2016, Theorem 1).
    """
    program = as_program(program)
    probe = batch_args(x[:2], None if y is None else y[:2])
    device = program_device(program, *probe)
    probe = tuple(a.to(device) for a in probe)
    plan = plan_chunks(program, x.shape[0], num_particles, x.shape[-1], max_memory_mb, x.dtype, probe, device)
    out = torch.empty(x.shape[0], dtype=x.dtype, device=device)
    bar = progress_bar(x.shape[0], "log p(x)", progress)
    try:
        for p0 in range(0, x.shape[0], plan.points_per_trace):
            p1 = min(p0 + plan.points_per_trace, x.shape[0])
            xb = x[p0:p1].to(device)
            yb = None if y is None else y[p0:p1].to(device)
            acc = StreamingLogMeanExp()
            for k0 in range(0, num_particles, plan.particles_per_trace):
                k = min(plan.particles_per_trace, num_particles - k0)
                acc.update(log_weights(program, xb, yb, k).log_weight)
            out[p0:p1] = acc.result()
            bar.update(p1 - p0)
    finally:
        bar.close()
    return out


@torch.no_grad()
def collect_log_weights(program: Program, x: torch.Tensor, y: torch.Tensor | None = None, num_particles: int = 1,
                        max_memory_mb: float = DEFAULT_MAX_MEMORY_MB, progress: bool = False) -> LogWeights:
    """All ``(K, N)`` log-weights of ``x``, computed in bounded chunks (memory: ``3 K N`` floats)."""
    groups = [parts for _, _, _, parts in iter_point_groups(program, x, y, num_particles,
                                                            max_memory_mb=max_memory_mb, progress=progress)]
    sites = {name: torch.cat([g.sites[name] for g in groups], dim=1) for name in groups[0].sites}
    return LogWeights(*(torch.cat(tensors, dim=1) for tensors in zip(*(g[:3] for g in groups))), sites)


def _check_particles(num_particles: int) -> None:
    if not isinstance(num_particles, int) or isinstance(num_particles, bool) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
