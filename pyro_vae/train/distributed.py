"""Data-parallel runs on ``torch.distributed``: the launch environment, the process group, and the
few collectives the trainer and the evaluator need.

A process launched by ``torchrun`` (or by hand, with every variable of
:data:`LAUNCH_VARIABLES` set) joins the process group named by its
environment; :func:`join` does it once per process, with ``gloo`` on a CPU
and ``nccl`` on CUDA (each process on ``cuda:LOCAL_RANK``).  A process group
the caller initialized already is used as it is.  Without a launch
environment, or with ``WORLD_SIZE=1``, :func:`join` returns the one-process
:class:`World`, and the trainer and the evaluator run no collective at all.

What the trainer does with it (docs/distributed.md):

* every rank draws the same permutation from the shared data generator and
  scores its slice (:func:`shard_bounds`) of every global batch;
* :meth:`World.all_reduce_gradients` sums the gradients of all parameters in
  one coalesced all-reduce (one per dtype), so the optimizer steps stay in
  lockstep;
* rank 0 alone touches the run directory; :meth:`World.share` runs a step on
  rank 0 and hands its result, or its exception, to every rank, so a refusal
  there stops all ranks with the same message.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist

#: What ``torchrun`` sets for every process, and what a launch by hand must set.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: Any of these set says that the process is one of several.
_MARKERS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_MASK64 = (1 << 64) - 1

T = TypeVar("T")
#: Set when the ranks finished a command together: they then leave together (see :func:`_leave`).
_finished_together = False


class DistributedSetupError(ValueError):
    """The launch environment or the device cannot make a process group."""


class PeerLostError(ConnectionError):
    """A collective failed: another process of the run stopped, was killed or lost its connection."""


class WorldSizeChangedWarning(UserWarning):
    """A run continues with another number of processes than its checkpoint was written by."""


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a launch: its global rank, the number of processes, its rank on
    its node."""

    rank: int
    world_size: int
    local_rank: int


def _integer(env: Mapping[str, str], name: str, low: int, high: int | None = None) -> int:
    text = env[name]
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise DistributedSetupError(f"{name}={text!r} is not an integer {span}; start the processes with torchrun")
    return value


def launch_environment(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The launch this process is part of, read from ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``
    (``MASTER_ADDR``/``MASTER_PORT`` are read by ``init_process_group``); ``None`` when none of the
    first three is set.  A half-configured environment is a :class:`DistributedSetupError` naming
    the missing variables."""
    env = os.environ if environ is None else environ
    present = [name for name in _MARKERS if env.get(name)]
    if not present:
        return None
    missing = [name for name in LAUNCH_VARIABLES if not env.get(name)]
    if missing:
        raise DistributedSetupError(
            f"incomplete torch.distributed launch environment: {', '.join(present)} "
            f"{'is' if len(present) == 1 else 'are'} set but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not; start the processes with torchrun "
            f"(torchrun --nproc_per_node N -m pyro_vae ...), or unset {', '.join(present)} for a single-process run")
    world_size = _integer(env, "WORLD_SIZE", 1)
    rank = _integer(env, "RANK", 0, world_size - 1)
    local_rank = _integer(env, "LOCAL_RANK", 0, world_size - 1)
    _integer(env, "MASTER_PORT", 1, 65535)
    return Launch(rank, world_size, local_rank)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s contiguous share of ``n`` items: sizes differ by at most one,
    and the shares of ranks ``0..world_size-1`` are the items in order."""
    return n * rank // world_size, n * (rank + 1) // world_size


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): nearby inputs give unrelated streams."""
    h = 0
    for value in values:
        z = ((h ^ (value & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h >> 1


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank ``rank``'s sampling noise (rank 0 keeps the config's seed itself)."""
    return mix_seed(seed, rank, step)


def current_rank() -> int:
    """This process's rank in the initialized process group, else 0."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@dataclass
class World:
    """The processes of a run, seen from one of them; ``size == 1`` is a plain single-process run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run directory and reports."""
        return self.rank == 0

    @property
    def _comm_device(self) -> torch.device:
        """Where collective tensors live: the training device for nccl, the CPU for gloo."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    # -- objects --------------------------------------------------------------------------
    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        with _collective("broadcast"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def share(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and return its result on every rank; an exception it raises is
        raised on every rank (so a refusal there stops all ranks with the same message)."""
        if not self.distributed:
            return fn()
        if self.is_main:
            try:
                payload = (True, fn())
            except Exception as error:
                self.broadcast_object((False, _picklable(error)))
                raise
            self.broadcast_object(payload)
            return payload[1]
        ok, value = self.broadcast_object()
        if not ok:
            raise value
        return value

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank 0, ``None`` on the others."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size if self.is_main else None
        with _collective("gather"):
            dist.gather_object(obj, out, dst=0)
        return out

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        with _collective("all-gather"):
            dist.all_gather_object(out, obj)
        return out

    # -- tensors --------------------------------------------------------------------------
    def broadcast_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copy rank 0's values into ``tensors`` on every rank (one broadcast per dtype)."""
        if not self.distributed:
            return
        with torch.no_grad():
            for group in _by_dtype(tensors).values():
                flat = torch.cat([t.detach().reshape(-1) for t in group]).to(self._comm_device)
                with _collective("broadcast"):
                    dist.broadcast(flat, src=0)
                for t, value in zip(group, _split(flat, group)):
                    t.copy_(value)

    def all_reduce_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Sum ``p.grad`` over ranks for every parameter, flattened into one all-reduce per dtype.

        A parameter without a gradient on one rank counts as zero there; one without a
        gradient on every rank keeps ``grad = None``, so the optimizer skips it as it
        would in one process.
        """
        if not self.distributed or not params:
            return
        groups = _by_dtype(params)
        first = next(iter(groups))
        present = [p.grad is not None for p in params]
        # All present here means present after the sum: then the counts need not be read back (on a
        # GPU that would wait for the step), and the flags are made on the device.
        everywhere = all(present)
        for dtype, group in groups.items():
            parts = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in group]
            if dtype == first:  # one count per parameter of the ranks that had a gradient
                like = group[0]
                parts += ([like.new_ones(len(params))] if everywhere else
                          [like.new_ones(1) if has else like.new_zeros(1) for has in present])
            flat = torch.cat(parts)
            if flat.device != self._comm_device:
                flat = flat.to(self._comm_device)
            with _collective("the all-reduce of the gradients"):
                dist.all_reduce(flat)
            if dtype == first:
                counts = [1.0] * len(params) if everywhere else flat[-len(params):].tolist()
                has_grad = {id(p): c > 0 for p, c in zip(params, counts)}
                flat = flat[:-len(params)]
            for p, value in zip(group, _split(flat, group)):
                p.grad = value.to(p.device) if has_grad[id(p)] else None

    def agree(self, losses: torch.Tensor, signum: int, due: bool) -> tuple[torch.Tensor, int, bool]:
        """At a point every rank reaches together: the per-step losses summed over ranks, the
        largest stop signal any rank received (0: none) and whether any rank finds a checkpoint due."""
        local = torch.cat([losses.detach().reshape(-1).double(),
                           torch.tensor([float(signum), float(due)], dtype=torch.float64, device=losses.device)])
        local = local.to(self._comm_device)
        out = [torch.empty_like(local) for _ in range(self.size)]
        with _collective("all-gather"):
            dist.all_gather(out, local)
        table = torch.stack(out)
        return table[:, :-2].sum(0).to(losses.device), int(table[:, -2].max()), bool(table[:, -1].max() > 0)

    def any_signal(self, signum: int | None) -> int | None:
        """The largest stop signal any rank received, or ``None``."""
        if not self.distributed:
            return signum
        flag = torch.tensor([signum or 0], dtype=torch.int64, device=self._comm_device)
        with _collective("all-reduce"):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def finished(self) -> None:
        """Record that the ranks finished their work in agreement: at exit each then waits for the
        others (rank 0 may still be writing and reporting) before leaving the group."""
        global _finished_together
        _finished_together = self.distributed

    def sums(self, values: Sequence[float]) -> list[float]:
        """Each of ``values`` summed over ranks (in float64)."""
        if not self.distributed:
            return list(values)
        total = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        with _collective("all-reduce"):
            dist.all_reduce(total)
        return total.tolist()


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn the backend's error for a peer that is gone into one line saying so."""
    try:
        yield
    except RuntimeError as e:  # gloo and nccl report a lost peer as (subclasses of) RuntimeError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PeerLostError(f"{what} failed: another process of this distributed run stopped, was killed or lost "
                            f"its connection ({first}); its own output says why") from None


def _by_dtype(tensors: Sequence[torch.Tensor]) -> dict[torch.dtype, list[torch.Tensor]]:
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return groups


def _split(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in like]), like)]


def _picklable(error: Exception) -> Exception:
    """``error`` itself when it survives pickling, else a ``RuntimeError`` with its message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def rank_device(device: torch.device, requested: str, local_rank: int, world_size: int,
                explicit: bool = False) -> torch.device:
    """The device of one rank: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` on a GPU, the CPU as it is.
    A ``cuda:N`` is kept when it is the rank's own GPU, or when ``explicit`` (the caller built the
    process group and maps ranks to GPUs)."""
    if device.type == "mps":
        raise DistributedSetupError("distributed runs use CPUs (gloo) or CUDA GPUs (nccl), not mps; "
                                    "pass --device cpu")
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if count == 1:  # each process sees its own GPU (CUDA_VISIBLE_DEVICES set per process)
        index = 0
    elif local_rank < count:
        index = local_rank
    else:
        raise DistributedSetupError(f"LOCAL_RANK {local_rank} has no GPU: this node has {count} CUDA devices; start "
                                    f"at most {count} processes per node (--nproc_per_node {count})")
    if device.index is not None and device.index != index:
        if not explicit:
            raise DistributedSetupError(f"--device {requested} names one GPU for all {world_size} processes; pass "
                                        f"--device cuda (or auto): each process takes cuda:LOCAL_RANK")
        index = device.index
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def join(device: torch.device, requested: str = "auto") -> World:
    """The :class:`World` of this process, joining the launch's process group on first use.

    ``device`` is the resolved ``--device``; under a launch of several processes a
    CUDA device becomes ``cuda:LOCAL_RANK``.  The group is initialized once per
    process (``gloo`` on a CPU, ``nccl`` on CUDA) and destroyed at exit; one the
    caller initialized is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
        if size == 1:
            return World(device=device)
        local = os.environ.get("LOCAL_RANK", "")
        local_rank = int(local) if local.isdigit() else rank % max(1, torch.cuda.device_count())
        backend = str(dist.get_backend())
        device = rank_device(device, requested, local_rank, size, explicit=True)
        if backend == "nccl" and device.type != "cuda":
            raise DistributedSetupError("the process group uses nccl, which needs CUDA tensors; train on a GPU "
                                        "(--device cuda) or initialize the group with backend='gloo'")
        return World(rank, size, local_rank, device, backend)
    launch = launch_environment()
    if launch is None or launch.world_size == 1:
        return World(device=device)
    if not dist.is_available():
        raise DistributedSetupError("this torch build has no torch.distributed; run a single process")
    device = rank_device(device, requested, launch.local_rank, launch.world_size)
    backend = "nccl" if device.type == "cuda" else "gloo"
    options: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, init_method="env://", rank=launch.rank, world_size=launch.world_size,
                            **options)
    atexit.register(_leave)
    return World(launch.rank, launch.world_size, launch.local_rank, device, backend)


def _leave() -> None:
    """At exit, leave the process group this module joined.  After work the ranks finished together,
    first wait for all of them: a launcher stops every process as soon as one exits with a non-zero
    status (an interrupted run's 128+N), which could cut rank 0's reporting short; once all are here,
    its signals are ignored, the work being done."""
    if not dist.is_initialized():
        return
    if _finished_together:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        try:
            dist.barrier()
            for name in ("SIGTERM", "SIGINT", "SIGHUP"):
                if hasattr(signal, name):
                    signal.signal(getattr(signal, name), signal.SIG_IGN)
        except Exception:  # another rank is gone: nothing to wait for
            pass
    try:
        dist.destroy_process_group()
    except Exception:
        pass


__all__ = ["DistributedSetupError", "LAUNCH_VARIABLES", "Launch", "PeerLostError", "World", "WorldSizeChangedWarning",
           "current_rank", "join", "launch_environment", "mix_seed", "rank_device", "rank_seed", "shard_bounds"]
