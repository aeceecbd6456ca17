"""Signal-to-noise ratio of gradient estimators, for the guide's and the model's parameters.

At fixed parameters, :func:`gradient_snr` draws an estimator's gradient ``R``
times on one fixed batch and gives, for every parameter element,
``SNR = |mean of the R draws| / (their standard deviation)``,
summarized over the elements of each group by its mean and median (the
quantity of Rainforth et al. 2018, "Tighter Variational Bounds are Not
Necessarily Better", and of Tucker et al. 2018).  Rainforth et al. show that
the IWAE gradient's SNR falls like ``1 / sqrt(K)`` for the guide while it rises
like ``sqrt(K)`` for the model; the doubly reparameterized guide gradient's does
not fall (docs/derivations.md, Doubly reparameterized IWAE gradient).
:func:`snr_sweep` runs several estimators at several ``K`` and
:func:`write_snr` writes ``snr.json``, ``snr.md`` and ``snr.png``, the output of
``pyro-vae snr``.

The groups come from the program itself (:func:`parameter_groups`): of the
parameters the guide's and the model's ``param`` sites name
(:func:`~pyro_vae.infer.params.program_parameters`), those the guide's draws or
log-densities depend on are the guide's, those the model's log-densities (at
the guide's draws, detached) depend on are the model's, and those both depend
on -- a VampPrior's encoder -- are shared.  The param sites alone cannot tell
them apart: the built-in models register their whole module in both programs.
Statistics are accumulated one draw at a time (Welford's update, float64), so
memory does not grow with ``R``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import matplotlib.ticker
from pyro import poutine
from pyro.infer import ELBO
from tqdm.auto import tqdm

from pyro_vae.evaluation.plots import _save, plt
from pyro_vae.infer.fast import _Replay, make_loss_fn
from pyro_vae.infer.objectives import GROUPED_OBJECTIVES, make_elbo
from pyro_vae.infer.params import program_parameters
from pyro_vae.infer.rng import preserved_rng
from pyro_vae.infer.weights import is_random_site

GUIDE, MODEL, SHARED = "guide", "model", "shared"
SNR_JSON, SNR_TABLE, SNR_FIGURE = "snr.json", "snr.md", "snr.png"


@dataclass(frozen=True)
class GroupSNR:
    """The SNR of one group's parameter elements."""

    elements: int  # elements summarized
    excluded: int  # elements whose gradient was the same in every draw (zero, or exact): no SNR
    mean: float    # mean over the elements of |mean| / sd (NaN when no element is summarized)
    median: float


@dataclass(frozen=True)
class SNRResult:
    """One estimator at one number of draws per point."""

    objective: str
    particles: int      # draws per data point, K
    groups: int | None  # M groups of K / M draws (miwae, piwae), else None
    draws: int          # gradient draws R
    snr: dict[str, GroupSNR]


def parameter_groups(model: Callable, guide: Callable, *args, **kwargs) -> dict[str, dict[str, torch.Tensor]]:
    """``{"guide": ..., "model": ...}`` (and ``"shared"`` when some are both), each ``name -> tensor``:
    the trainable parameters of the program by which program's densities depend on them.

    One run of the guide and of the model replayed on its draws (detached), with the
    random state put back; a parameter neither depends on is left out.
    """
    params = {n: p for n, p in program_parameters(model, guide, *args, **kwargs).items() if p.requires_grad}
    with preserved_rng(), torch.enable_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        guide_sites = {n: s for n, s in guide_trace.nodes.items() if is_random_site(s)}
        replay = {n: {"value": s["value"].detach(), "infer": s["infer"]} for n, s in guide_sites.items()}
        with _Replay(replay):
            model_trace = poutine.trace(model).get_trace(*args, **kwargs)
        guide_term = guide_trace.log_prob_sum() + sum(s["value"].sum() for s in guide_sites.values()
                                                      if torch.is_floating_point(s["value"]))
        model_term = model_trace.log_prob_sum()
    names, tensors = list(params), list(params.values())
    in_guide = _depends(guide_term, tensors)
    in_model = _depends(model_term, tensors)
    groups: dict[str, dict[str, torch.Tensor]] = {GUIDE: {}, MODEL: {}, SHARED: {}}
    for name, p, g, m in zip(names, tensors, in_guide, in_model):
        if g or m:
            groups[SHARED if g and m else GUIDE if g else MODEL][name] = p
    if not groups[SHARED]:
        del groups[SHARED]
    return groups


def gradient_snr(elbo: ELBO, model: Callable, guide: Callable, *args, draws: int = 100, seed: int = 0,
                 groups: dict[str, dict[str, torch.Tensor]] | None = None, progress: tqdm | None = None,
                 **kwargs) -> dict[str, GroupSNR]:
    """Per-group SNR of ``elbo``'s gradient over ``draws`` draws on ``args`` at the current parameters.

    The loss is :func:`~pyro_vae.infer.fast.make_loss_fn`'s (the estimator itself, or a faster
    one checked against it); gradients come from ``torch.autograd.grad``, so ``.grad`` is left
    alone, and the random state is put back.  ``groups`` defaults to
    :func:`parameter_groups`; ``progress`` is a bar advanced once per draw.
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 2:
        raise ValueError(f"draws must be an integer >= 2 (a standard deviation needs two draws), got {draws!r}")
    groups = parameter_groups(model, guide, *args, **kwargs) if groups is None else groups
    names = [g for g, members in groups.items() if members]
    params = [p for g in names for p in groups[g].values()]
    if not params:
        raise ValueError("the program has no trainable parameter that its densities depend on: no gradient to draw")
    sizes = [sum(p.numel() for p in groups[g].values()) for g in names]
    loss_fn = elbo.differentiable_loss if kwargs else make_loss_fn(elbo, model, guide, args)
    mean = m2 = None
    with preserved_rng():
        torch.manual_seed(seed)
        for r in range(1, draws + 1):
            loss = loss_fn(model, guide, *args, **kwargs)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double()
                              for p, g in zip(params, grads)])
            if mean is None:
                mean, m2 = flat.clone(), torch.zeros_like(flat)
            else:
                delta = flat - mean
                mean += delta / r
                m2 += delta * (flat - mean)
            if progress is not None:
                progress.update(1)
    sd = (m2 / (draws - 1)).sqrt()
    result = {}
    for name, chunk_mean, chunk_sd in zip(names, mean.split(sizes), sd.split(sizes)):
        varies = chunk_sd > 0
        snr = chunk_mean[varies].abs() / chunk_sd[varies]
        n = int(varies.sum())
        result[name] = GroupSNR(n, chunk_mean.numel() - n, float(snr.mean()) if n else math.nan,
                                float(snr.median()) if n else math.nan)
    return result


def split_groups(objective: str, particles: int, groups: int | None = None) -> int | None:
    """The ``M`` of ``miwae``/``piwae`` at ``K = particles`` draws per point (``None`` for the other
    objectives): ``groups`` when given (it must divide ``K``), else the largest divisor of ``K``
    not above ``sqrt(K)``, so that ``M <= L`` (``K = 64``: 8 groups of 8)."""
    if objective not in GROUPED_OBJECTIVES:
        return None
    if groups is None:
        return max(m for m in range(1, math.isqrt(particles) + 1) if particles % m == 0)
    if particles % groups:
        raise ValueError(f"{objective} splits the K={particles} draws per point into groups={groups}: K must be a "
                         "multiple of the number of groups")
    return groups


def snr_sweep(model: Callable, guide: Callable, *args, objectives: Sequence[str], particles: Sequence[int],
              draws: int = 100, groups: int | None = None, alpha: float | None = None,
              ciwae_beta: float | None = None, seed: int = 0, progress: bool = True) -> list[SNRResult]:
    """:func:`gradient_snr` of every objective in ``objectives`` at every ``K`` in ``particles``
    (draws per point; ``miwae``/``piwae`` as :func:`split_groups` says), with one progress bar.

    Every estimator is built before any is run, so a bad name or option fails at once.
    ``alpha`` goes to ``renyi`` only, ``ciwae_beta`` to ``ciwae`` only.
    """
    plan = []
    for name in objectives:
        for k in particles:
            m = split_groups(name, int(k), groups)
            elbo = make_elbo(name, int(k) // m if m else int(k), alpha if name == "renyi" else None, groups=m,
                             ciwae_beta=ciwae_beta if name == "ciwae" else None)
            plan.append((name, int(k), m, elbo))
    members = parameter_groups(model, guide, *args)
    results = []
    with tqdm(total=len(plan) * draws, desc="gradient SNR", unit="draw", disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        for name, k, m, elbo in plan:
            bar.set_postfix_str(f"{name} K={k}")
            snr = gradient_snr(elbo, model, guide, *args, draws=draws, seed=seed, groups=members, progress=bar)
            results.append(SNRResult(name, k, m, draws, snr))
    return results


# -- output ----------------------------------------------------------------------------------------

def _number(value: float) -> float | None:
    return None if not math.isfinite(value) else value


def snr_report(results: Sequence[SNRResult], **about: Any) -> dict[str, Any]:
    """The JSON document of ``results`` (NaN as ``null``), with ``about`` (run, batch, seed) on top."""
    rows = []
    for r in results:
        row = asdict(r)
        row["snr"] = {g: {**asdict(s), "mean": _number(s.mean), "median": _number(s.median)} for g, s in r.snr.items()}
        rows.append(row)
    return {**about, "results": rows}


def snr_table(results: Sequence[SNRResult]) -> str:
    """Markdown table: one row per estimator and ``K``, the mean and median SNR of each group."""
    groups = [g for g in (GUIDE, MODEL, SHARED) if any(g in r.snr for r in results)]
    head = ["objective", "K", "M x L"] + [f"{g} SNR {stat}" for g in groups for stat in ("mean", "median")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        split = f"{r.groups} x {r.particles // r.groups}" if r.groups else ""
        cells = [r.objective, str(r.particles), split]
        for g in groups:
            s = r.snr.get(g)
            cells += ["" if s is None else f"{s.mean:.4g}", "" if s is None else f"{s.median:.4g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_snr(results: Sequence[SNRResult], path: str | Path, title: str = "") -> Path:
    """SNR against ``K`` (log-log), one line per estimator; one panel per group (guide, model,
    shared), the mean over the group's elements."""
    groups = [g for g in (GUIDE, MODEL, SHARED) if any(g in r.snr for r in results)]
    labels = {GUIDE: "guide (encoder) parameters", MODEL: "model (decoder, prior) parameters",
              SHARED: "parameters of both"}
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.2), squeeze=False)
    objectives = list(dict.fromkeys(r.objective for r in results))
    for ax, group in zip(axes[0], groups):
        for name in objectives:
            rows = sorted((r for r in results if r.objective == name and group in r.snr), key=lambda r: r.particles)
            points = [(r.particles, r.snr[group].mean) for r in rows if math.isfinite(r.snr[group].mean)]
            if points:
                ax.plot(*zip(*points), marker="o", ms=4, label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ks = sorted({r.particles for r in results})
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("draws per data point K")
        ax.set_ylabel("gradient SNR, mean over elements")
        ax.set_title(labels[group], fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def write_snr(results: Sequence[SNRResult], out_dir: str | Path, title: str = "", **about: Any) -> list[Path]:
    """Write ``snr.json``, ``snr.md`` and ``snr.png`` into ``out_dir`` (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / SNR_JSON, out / SNR_TABLE]
    paths[0].write_text(json.dumps(snr_report(results, **about), indent=2) + "\n")
    intro = f"# Gradient signal-to-noise ratio\n\n{title}\n\n" if title else "# Gradient signal-to-noise ratio\n\n"
    paths[1].write_text(intro + snr_table(results))
    paths.append(plot_snr(results, out / SNR_FIGURE, title))
    return paths


def _depends(term: torch.Tensor, tensors: list[torch.Tensor]) -> list[bool]:
    """Whether ``term``'s graph reaches each tensor."""
    if not torch.is_tensor(term) or not term.requires_grad:
        return [False] * len(tensors)
    grads = torch.autograd.grad(term, tensors, allow_unused=True, retain_graph=True)
    return [g is not None for g in grads]


__all__ = ["GUIDE", "GroupSNR", "MODEL", "SHARED", "SNRResult", "gradient_snr", "parameter_groups", "plot_snr",
           "snr_report", "snr_sweep", "snr_table", "split_groups", "write_snr"]
