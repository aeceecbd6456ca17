"""``pyro-vae train``: train a VAE (or a user's model/guide program) into a run directory."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from pyro_vae.cli.arguments import (device, finite_float, non_negative_float, non_negative_int, part_name,
                                    positive_float, positive_int, seed)
from pyro_vae.data import DATASET_NAMES
from pyro_vae.infer.objectives import (DEFAULT_CIWAE_BETA, DEFAULT_GROUPS, DEFAULT_PARTICLES, GROUPED_OBJECTIVES,
                                       OBJECTIVES)
from pyro_vae.models.registry import DECODERS, GUIDES, PRIORS
from pyro_vae.train.checkpoint import CheckpointError, load_checkpoint
from pyro_vae.train.config import TrainConfig, load_toml
from pyro_vae.train.trainer import CHECKPOINT, Trainer


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a VAE (default: on the embedded digits data)")
    p.add_argument("--config", help="TOML file of options; flags override it (with --resume: the same rules as "
                                    "flags)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR where it stopped; only --epochs, --max-steps, --patience, --lr, "
                        "--device, --checkpoint-every(-steps), --data-dir and --no-progress may change")
    _add_train_arguments(p)


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS  # unset flags stay absent, so a config file can supply them
    d = TrainConfig()
    m = d.model
    g = p.add_argument_group("data")
    g.add_argument("--data", default=S, help=f"data set: {', '.join(DATASET_NAMES)}, or a .npy/.npz path "
                                              f"(default {d.data})")
    g.add_argument("--data-dir", default=S, help="folder with data files (default: $PYRO_VAE_DATA, "
                                                 "else the user cache)")
    g = p.add_argument_group("model")
    g.add_argument("--program", default=S, metavar="IMPORT_PATH",
                   help="train a user's model/guide program instead of the built-in VAE: package.module (its "
                        "top-level model and guide functions) or package.module:name (an object with model and "
                        "guide, or a factory returning one); recorded so evaluate, sample and --resume rebuild it")
    g.add_argument("--prior", default=S, type=part_name("prior", PRIORS),
                   help=f"{', '.join(PRIORS)}, or package.module:Name (default {m.prior})")
    g.add_argument("--guide", default=S, type=part_name("guide", GUIDES),
                   help=f"{', '.join(GUIDES)}, or package.module:Name (default {m.guide})")
    g.add_argument("--decoder", default=S, type=part_name("decoder", DECODERS),
                   help=f"{', '.join(DECODERS)}, or package.module:Name (default {m.decoder})")
    g.add_argument("--latent-dim", type=positive_int, default=S, help=f"default {m.latent_dim}")
    g.add_argument("--hidden", type=positive_int, nargs="+", default=S,
                   help=f"encoder hidden sizes; the decoder mirrors them (default {' '.join(map(str, m.hidden))})")
    g.add_argument("--activation", default=S, help=f"default {m.activation}")
    g.add_argument("--sigma-x", type=positive_float, default=S, help=f"Gaussian decoder scale (default {m.sigma_x})")
    g.add_argument("--conditional", action="store_true", default=S, help="condition on labels (cVAE)")
    g.add_argument("--mixture-components", type=positive_int, default=S,
                   help=f"components of --prior mixture (default {m.mixture_components})")
    g.add_argument("--pseudo-inputs", type=positive_int, default=S,
                   help=f"pseudo-inputs of --prior vamp (default {m.pseudo_inputs})")
    g.add_argument("--flow-steps", type=positive_int, default=S,
                   help=f"autoregressive steps of --prior flow and --guide iaf (default {m.flow_steps})")
    g.add_argument("--network", default=S, choices=["mlp", "conv"],
                   help=f"guide and decoder networks: mlp, or conv for image data (ignores --hidden; "
                        f"default {m.network})")
    g.add_argument("--stochastic-layers", type=positive_int, default=S, choices=[1, 2],
                   help="1, or 2 for p(z2) p(z1 | z2) p(x | z1) (Burda et al. 2016); --latent-dim is then "
                        f"z1's size (default {m.stochastic_layers})")
    g.add_argument("--top-latent-dim", type=positive_int, default=S,
                   help=f"size of z2 with --stochastic-layers 2 (default {m.top_latent_dim})")
    g.add_argument("--top-hidden", type=positive_int, nargs="+", default=S,
                   help="hidden sizes of the z1 <-> z2 networks with --stochastic-layers 2 "
                        f"(default {' '.join(map(str, m.top_hidden))})")
    g.add_argument("--flow-hidden", type=positive_int, default=S,
                   help=f"hidden units per autoregressive network, >= latent dim (default {m.flow_hidden})")
    g.add_argument("--guide-rank", type=positive_int, default=S,
                   help=f"covariance rank of --guide lowrank (default {m.guide_rank})")
    g.add_argument("--num-categories", type=int, default=S,
                   help="categories per latent of --prior/--guide categorical; --latent-dim is then the "
                        f"number of categorical latents (default {m.num_categories})")
    g.add_argument("--temperature", type=finite_float, default=S,
                   help=f"initial Gumbel-Softmax temperature (default {m.temperature})")
    g.add_argument("--temperature-min", type=finite_float, default=S,
                   help=f"floor of the annealed temperature (default {m.temperature_min})")
    g.add_argument("--temperature-anneal", type=non_negative_float, default=S,
                   help=f"exponential temperature decay rate per epoch (default {m.temperature_anneal})")
    g.add_argument("--straight-through", action="store_true", default=S,
                   help="hard one-hot latents forward, relaxed gradients backward")
    g = p.add_argument_group("objective")
    g.add_argument("--objective", default=S, choices=OBJECTIVES,
                   help=f"default {d.objective}; iwae-dreg: IWAE with doubly reparameterized guide gradients, stl: "
                        "ELBO with the sticking-the-landing guide gradient, miwae/ciwae/piwae: the objectives of "
                        "Rainforth et al. 2018")
    by_default: dict[int, list[str]] = {}
    for name in OBJECTIVES:
        by_default.setdefault(DEFAULT_PARTICLES[name], []).append(name)
    defaults = ", ".join(f"{k} for {'/'.join(names)}" for k, names in by_default.items())
    g.add_argument("--particles", type=positive_int, default=S,
                   help=f"number of particles K per data point; for {'/'.join(GROUPED_OBJECTIVES)} the draws L of "
                        f"each of the --groups, M*L per point in all (default {defaults})")
    g.add_argument("--groups", type=positive_int, default=S, metavar="M",
                   help=f"{'/'.join(GROUPED_OBJECTIVES)} only: M groups of --particles L draws each per data point "
                        f"(default {DEFAULT_GROUPS})")
    g.add_argument("--ciwae-beta", type=finite_float, default=S, metavar="BETA",
                   help="ciwae only: weight in [0, 1] of the ELBO in BETA*ELBO + (1-BETA)*IWAE "
                        f"(default {DEFAULT_CIWAE_BETA}); not --beta, the beta-VAE weight on the KL")
    g.add_argument("--alpha", type=finite_float, default=S, help="Renyi alpha (renyi only; not 1)")
    g.add_argument("--beta", type=non_negative_float, default=S, help=f"beta-VAE weight on the KL (default {d.beta})")
    g.add_argument("--warmup-epochs", type=non_negative_float, default=S,
                   help="linear KL warm-up from 0 to beta over this many epochs (default 0: none)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=S, help=f"default {d.epochs}")
    g.add_argument("--max-steps", type=non_negative_int, default=S, metavar="N",
                   help="pause after N optimizer steps in all, saving a checkpoint there; --resume with a larger "
                        "--max-steps (or 0) trains on, bit for bit (default 0: no limit)")
    g.add_argument("--batch-size", type=positive_int, default=S, help=f"default {d.batch_size}")
    g.add_argument("--lr", type=positive_float, default=S, help=f"Adam learning rate (default {d.lr})")
    g.add_argument("--patience", type=non_negative_int, default=S,
                   help=f"early stopping patience in epochs, 0 disables (default {d.patience})")
    g.add_argument("--seed", type=seed, default=S, help=f"default {d.seed}")
    g.add_argument("--device", type=device, default=S, help="auto, cpu, cuda or cuda:N (default auto)")
    g = p.add_argument_group("output")
    g.add_argument("--run-dir", default=S,
                   help="where to write the run (default: a new runs/DATA-OBJECTIVE-TIME-XXXXXX)")
    g.add_argument("--checkpoint-every", type=non_negative_float, default=S, metavar="SECONDS",
                   help=f"also save a checkpoint inside an epoch every SECONDS, 0 never (default {d.checkpoint_every:g})")
    g.add_argument("--checkpoint-every-steps", type=non_negative_int, default=S, metavar="N",
                   help="also save a checkpoint inside an epoch every N steps, 0 never (default 0)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bars")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < TOML file (``--config``) < explicit flags.  With ``--resume`` the run's saved config
    replaces the defaults; the file and the flags then change it under the same rules (options
    outside :data:`~pyro_vae.train.config.RESUMABLE` must keep their values, else the trainer
    refuses them by name)."""
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "resume")}
    if args.resume:
        run_dir = Path(args.resume)
        if "run_dir" in flags and Path(flags["run_dir"]).resolve() != run_dir.resolve():
            raise ValueError(f"--run-dir {flags['run_dir']} differs from --resume {args.resume}; a resumed run "
                             "continues in its own directory (omit --run-dir)")
        if run_dir.exists() and not run_dir.is_dir():
            raise CheckpointError(f"cannot resume {run_dir}: it is a file, not a run directory; pass the folder "
                                  f"that holds {CHECKPOINT}")
        if not (run_dir / CHECKPOINT).is_file():
            raise CheckpointError(f"cannot resume: no {CHECKPOINT} in {run_dir}"
                                  + ("" if run_dir.is_dir() else " (the directory does not exist)"))
        state = load_checkpoint(run_dir / CHECKPOINT)
        try:
            base = TrainConfig.from_dict(state["config"]).to_flat()
        except ValueError as e:
            raise CheckpointError(f"{run_dir / CHECKPOINT} holds a config this pyro-vae cannot read: {e}") from None
        flags["run_dir"] = args.resume
    else:
        base = TrainConfig().to_flat()
    in_file = load_toml(args.config) if args.config else {}
    config = TrainConfig.from_flat({**base, **in_file, **flags})
    check_overridden_file_values(args.config, in_file, flags, config)
    return config


def check_overridden_file_values(path: str | None, in_file: dict, flags: dict, config: TrainConfig) -> None:
    """A value of the config file that a flag overrides is still checked, each in the config that
    runs, so a flag never hides a value out of range in the file (``epochs = 0`` under
    ``--epochs 5``) any more than one of the wrong type (which :func:`load_toml` refuses)."""
    final = config.to_flat()
    for name in sorted(set(in_file) & set(flags)):
        if in_file[name] == flags[name]:
            continue
        try:
            TrainConfig.from_flat({**final, name: in_file[name]})
        except ValueError as e:
            raise ValueError(f"config file {path}: {e} (--{name.replace('_', '-')} on the command line overrides "
                             "it, but the file must hold valid values too)") from None


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    trainer = Trainer(config, resume=bool(args.resume), keep_lock=True)
    try:
        return _train_and_report(trainer)
    finally:
        trainer.close()


def _train_and_report(trainer: Trainer) -> int:
    result = trainer.fit()
    if not trainer.world.is_main:  # another rank of a distributed run: rank 0 reports and draws
        return 128 + (result.signal or signal.SIGINT) if result.interrupted else 0
    run_dir = result.run_dir
    if result.nothing_to_do:
        print(f"nothing to do: {result.nothing_to_do}")
        return 0
    if result.interrupted:
        name = signal.Signals(result.signal).name if result.signal else "interrupt"
        epoch, batch, _ = result.position
        where = f"epoch {epoch + 1}, batch {batch}" if batch else f"the end of epoch {epoch}"
        print(f"{name}: stopped and saved {run_dir / CHECKPOINT} at {where}; continue with: "
              f"pyro-vae train --resume {run_dir}")
        return 128 + (result.signal or signal.SIGINT)
    if result.reached_max_steps:
        epoch, batch, step = result.position
        where = f"epoch {epoch + 1}, batch {batch}" if batch else f"the end of epoch {epoch}"
        print(f"paused at --max-steps {step}: saved {run_dir / CHECKPOINT} at {where}; continue with: "
              f"pyro-vae train --resume {run_dir} --max-steps 0 (or a larger limit)")
        return 0
    from pyro_vae.evaluation.pictures import write_run_pictures

    last = result.history[-1] if result.history else None
    print(f"run directory: {run_dir}")
    if last:
        print(f"  final validation ELBO: {last['valid_elbo']:.3f} nats (epoch {last['epoch']})")
    if result.stopped_early:
        print(f"  stopped early: no improvement for {trainer.config.patience} epochs")
    print(f"  metrics:     {run_dir / 'metrics.jsonl'}")
    print(f"  checkpoint:  {run_dir / CHECKPOINT} (best: {run_dir / 'best.pt'})")
    try:
        pictures = write_run_pictures(run_dir)
    except OSError as e:  # the run is saved; a picture that cannot be written does not undo it
        print(f"pyro-vae train: warning: could not write the pictures into {run_dir}: {e.strerror or e}",
              file=sys.stderr)
        return 0
    for path in pictures:
        print(f"  picture:     {path}")
    return 0
