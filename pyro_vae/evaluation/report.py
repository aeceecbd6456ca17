"""The evaluation report: ``evaluation.json`` (every figure), ``evaluation.md`` (a short
summary with the pictures), and the side-by-side table of ``pyro-vae compare``."""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Any, Sequence

EVALUATION_JSON = "evaluation.json"
EVALUATION_MD = "evaluation.md"


class EvaluationMissing(ValueError):
    """A run directory has no ``evaluation.json``."""


def package_versions() -> dict[str, str | None]:
    """Versions of Python and of the packages the numbers depend on."""
    import numpy
    import pyro
    import torch

    from pyro_vae import __version__
    from pyro_vae.evaluation.arviz_compat import arviz_version

    return {"pyro_vae": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "pyro-ppl": pyro.__version__, "numpy": numpy.__version__, "arviz": arviz_version()}


def jsonable(value: Any) -> Any:
    """Replace non-finite floats (not valid JSON) by the strings ``"inf"``, ``"-inf"``, ``"nan"``."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_report(report: dict[str, Any], run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``evaluation.json`` and ``evaluation.md`` into ``run_dir`` (each atomically)."""
    from pyro_vae.train.rundir import write_atomic

    run_dir = Path(run_dir)
    report = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **report}
    json_path = write_atomic(run_dir / EVALUATION_JSON, json.dumps(jsonable(report), indent=2, allow_nan=False) + "\n")
    md_path = write_atomic(run_dir / EVALUATION_MD, render_markdown(report))
    return json_path, md_path


def checkpoint_identity(path: str | Path | None, state: dict[str, Any]) -> dict[str, Any] | None:
    """Which checkpoint an evaluation used: file name, checksum, size and modification time (to
    tell later whether the evaluation is stale)."""
    if path is None:
        return None
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return None
    checksum = state.get("checksum") or {}
    return {"file": path.name, "digest": checksum.get("digest"), "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "epoch": state.get("epoch")}


def load_evaluation(run_dir: str | Path) -> dict[str, Any]:
    """Read a run's ``evaluation.json``; :class:`EvaluationMissing` names the run without one."""
    path = Path(run_dir) / EVALUATION_JSON
    if not path.is_file():
        raise EvaluationMissing(f"{run_dir} has no {EVALUATION_JSON}: run `pyro-vae evaluate {run_dir}` first")
    try:
        value = json.loads(path.read_bytes())
    except OSError as e:
        raise EvaluationMissing(f"{path} cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # invalid JSON, or bytes that are not UTF-8 text
        raise EvaluationMissing(f"{path} is not valid JSON ({e}); run `pyro-vae evaluate {run_dir}` again") from None
    if not isinstance(value, dict):
        raise EvaluationMissing(f"{path} holds a JSON {type(value).__name__}, not an evaluation report (an "
                                f"object); run `pyro-vae evaluate {run_dir}` again")
    return value


# -- formatting -----------------------------------------------------------------------------------

def fmt_estimate(est: Any, digits: int = 3) -> str:
    """``mean ± se`` for an estimate dict, or the text of an n/a entry."""
    if isinstance(est, dict) and "mean" in est:
        return f"{est['mean']:.{digits}f} ± {est['stderr']:.{digits}f}"
    return str(est) if est is not None else "n/a"


def _mean(est: Any, digits: int = 2) -> str:
    return f"{est['mean']:.{digits}f}" if isinstance(est, dict) and "mean" in est else "n/a"


def render_markdown(report: dict[str, Any]) -> str:
    """A short human-readable report that embeds the pictures written next to it."""
    res = report["results"]
    K = res["num_particles"]
    cfg = report.get("config", {})
    lines = [
        f"# Evaluation of `{report.get('run_dir', '')}`",
        "",
        f"Test set: **{report['test_set']['name']}**, {res['num_points']} points"
        + (" (first points only)" if report["test_set"].get("subset") else "")
        + f"; K = {K} importance samples per point; seed {report['seed']}; "
          f"{report.get('seconds', res.get('seconds', 0.0)):.1f} s.",
        (f"Model: the program `{cfg['program']}`, trained with `{cfg.get('objective')}`."
         if cfg.get("program") else
         f"Model: prior `{cfg.get('prior')}`, guide `{cfg.get('guide')}`, decoder `{cfg.get('decoder')}`, "
         f"latent dim {cfg.get('latent_dim')}, trained with `{cfg.get('objective')}`."),
        "",
        "## Test log-likelihood and bounds (nats per point, mean ± standard error)",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| log p(x), importance sampled (K={K}) | {fmt_estimate(res['log_likelihood'])} |",
        f"| ELBO, Monte Carlo | {fmt_estimate(res['elbo'])} |",
        f"| ELBO, analytic KL | {fmt_estimate(res['elbo_analytic_kl'])} |",
        f"| reconstruction E_q[log p(x \\| z)] | {fmt_estimate(res['reconstruction'])} |",
        f"| KL(q(z \\| x) ‖ p(z)), Monte Carlo | {fmt_estimate(res['kl'])} |",
        f"| KL, analytic | {fmt_estimate(res['kl_analytic'])} |",
        f"| gap log p(x) - ELBO (posterior gap, the KL identity) | {fmt_estimate(res['gap'])} |",
    ]
    for k, est in res["iwae"].items():
        lines.append(f"| IWAE bound, k={k} | {fmt_estimate(est)} |")
    for alpha, est in res["renyi"].items():
        lines.append(f"| Renyi bound, alpha={alpha} | {fmt_estimate(est)} |")
    lines += ["", f"Draws: {res['shared_draws']}."]
    lines += [f"Renyi alpha={alpha}: {est['meaning']}." for alpha, est in res["renyi"].items()]
    lines += [""]
    latent = res["latent"]
    kl = latent["kl_per_dim"]
    kl_text = ", ".join(f"{v:.2f}" for v in kl) if isinstance(kl, list) else str(kl)
    lines += [
        "## Latent diagnostics",
        "",
        f"Active units (Cov_x(E_q[z_u]) > {latent['active_unit_threshold']}): "
        f"**{latent['active_units']} of {latent['latent_dim']}** (E_q[z] from the {latent['guide_mean']}).",
        "",
        f"KL per latent dimension: {kl_text}.",
        "",
    ]
    psis = res["psis"]
    lines += ["## Guide diagnostics (PSIS k-hat)", ""]
    if isinstance(psis, dict):
        lines += [
            f"Fraction of test points with k-hat > 0.5: **{psis['fraction_above_0.5']:.1%}**, "
            f"> 0.7: **{psis['fraction_above_0.7']:.1%}** (median {psis['median']:.2f}; computed with "
            f"{psis['backend']}).",
            "",
            psis["meaning"],
            "",
        ]
    else:
        lines += [str(psis), ""]
    export = report.get("posterior_export")
    if export:
        lines += [f"Posterior draws for test points {export['indices']} were exported to "
                  f"`{Path(export['path']).name}` (ArviZ netCDF; open with `arviz.from_netcdf`).", ""]
    pictures = report.get("pictures") or {}
    if pictures:
        lines += ["## Pictures", ""]
        for name, file in pictures.items():
            lines += [f"### {name.replace('_', ' ')}", "", f"![{name}]({Path(file).name})", ""]
    return "\n".join(lines).rstrip() + "\n"


# -- compare ----------------------------------------------------------------------------------------

COMPARE_COLUMNS = ("run", "data", "objective", "prior/guide/decoder", "K", "log p(x) ± se", "ELBO", "gap",
                   "active", "k-hat>0.7", "note")


def compare_row(run_dir: str | Path) -> dict[str, str]:
    """One row of the comparison table from a run's ``evaluation.json``, with a note saying when
    the evaluation is stale or the run's training incomplete."""
    ev = load_evaluation(run_dir)
    try:
        res, cfg = ev["results"], ev.get("config") or {}
        if not isinstance(cfg, dict):
            raise TypeError(f"config is a {type(cfg).__name__}")
        psis = res.get("psis")
        latent = res["latent"]
        row = {
            "run": str(run_dir),
            "data": ev["test_set"]["name"] + (f" (first {res['num_points']})" if ev["test_set"].get("subset") else ""),
            "objective": str(cfg.get("objective")),
            "prior/guide/decoder": f"{cfg.get('prior')}/{cfg.get('guide')}/{cfg.get('decoder')}",
            "K": str(res["num_particles"]),
            "log p(x) ± se": fmt_estimate(res["log_likelihood"], 2),
            "ELBO": _mean(res["elbo"]),
            "gap": _mean(res["gap"]),
            "active": f"{latent['active_units']}/{latent['latent_dim']}",
            "k-hat>0.7": f"{psis['fraction_above_0.7']:.1%}" if isinstance(psis, dict) else "n/a",
        }
    except (KeyError, TypeError, ValueError) as e:
        raise EvaluationMissing(f"{Path(run_dir) / EVALUATION_JSON} lacks an expected entry ({e}); run "
                                f"`pyro-vae evaluate {run_dir}` again") from None
    row["note"] = "; ".join(run_notes(run_dir, ev))
    return row


def run_notes(run_dir: str | Path, evaluation: dict[str, Any] | None = None) -> list[str]:
    """What a reader of a run's numbers must know: training still running or cut short, and an
    evaluation older than the checkpoint it describes."""
    from pyro_vae.train.rundir import run_status

    notes = []
    status = run_status(run_dir)
    if status:
        state, epoch, epochs = status.get("state"), status.get("epoch"), status.get("epochs")
        at = f"epoch {epoch}/{epochs}"
        if state == "training":
            notes.append(f"training in progress ({at})")
        elif state in ("killed", "interrupted", "aborted", "failed"):
            notes.append(f"incomplete: {state} at {at}")
        elif state == "paused":
            notes.append(f"incomplete: paused at step {status.get('step')} (--max-steps), {at}")
        elif state == "diverged":
            notes.append(f"incomplete: diverged after {at}")
    if evaluation is not None and is_stale(run_dir, evaluation):
        notes.append("stale: the checkpoint changed after this evaluation")
    return notes


def is_stale(run_dir: str | Path, evaluation: dict[str, Any]) -> bool:
    """True when the checkpoint an evaluation used has changed since (same size and time: unchanged;
    otherwise its checksum decides)."""
    ident = evaluation.get("checkpoint")
    if not isinstance(ident, dict) or not isinstance(ident.get("file"), str) or not ident["file"]:
        return False  # an evaluation that did not record its checkpoint cannot be judged
    path = Path(run_dir) / Path(ident["file"]).name
    try:
        stat = path.stat()
    except OSError:
        return True
    if stat.st_size == ident.get("size") and stat.st_mtime_ns == ident.get("mtime_ns"):
        return False
    from pyro_vae.train.checkpoint import load_checkpoint

    try:
        digest = (load_checkpoint(path).get("checksum") or {}).get("digest")
    except ValueError:
        return True
    return digest != ident.get("digest")


def _missing_row(run_dir: str | Path, note: str) -> dict[str, str]:
    return {**{c: "-" for c in COMPARE_COLUMNS}, "run": str(run_dir), "note": note}


def format_table(rows: Sequence[dict[str, str]], columns: Sequence[str] = COMPARE_COLUMNS) -> str:
    """Left-aligned text columns (numbers right-aligned), one line per row."""
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    numeric = {"K", "log p(x) ± se", "ELBO", "gap", "active", "k-hat>0.7"}

    def line(values: dict[str, str]) -> str:
        return "  ".join(values[c].rjust(widths[c]) if c in numeric else values[c].ljust(widths[c])
                         for c in columns).rstrip()

    header = line({c: c for c in columns})
    rule = "  ".join("-" * widths[c] for c in columns)
    return "\n".join([header, rule, *(line(r) for r in rows)])


def compare_rows(run_dirs: Sequence[str | Path]) -> list[dict[str, str]]:
    """A row per run: the numbers of every evaluated run, and for the others a note saying why
    there are none (no such directory, not evaluated, unreadable evaluation)."""
    if not run_dirs:
        raise ValueError("compare needs at least one run directory")
    rows = []
    for run_dir in run_dirs:
        if not Path(run_dir).is_dir():
            rows.append(_missing_row(run_dir, "no such run directory"))
            continue
        try:
            rows.append(compare_row(run_dir))
        except EvaluationMissing as e:
            rows.append(_missing_row(run_dir, "; ".join([*_notes_or_none(run_dir), f"no numbers: {e}"])))
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:  # one damaged run never hides the others
            reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
            rows.append(_missing_row(run_dir, f"unreadable run: {reason}"))
    return rows


def _notes_or_none(run_dir: str | Path) -> list[str]:
    try:
        return run_notes(run_dir)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return []


def compare_runs(run_dirs: Sequence[str | Path]) -> str:
    """The comparison table of several runs (see :func:`compare_rows`)."""
    rows = compare_rows(run_dirs)
    columns = COMPARE_COLUMNS if any(r["note"] for r in rows) else COMPARE_COLUMNS[:-1]
    return format_table(rows, columns)
