"""How to train: data, objective, optimisation and output, plus the :class:`ModelConfig` trained.

Precedence is defaults < TOML file < command-line flags.  Flags and TOML keys
are flat (``latent_dim``, ``lr``); :meth:`TrainConfig.from_flat` sends each to
the model or the training side by name.  The resolved config is stored in
every checkpoint, so a run can be rebuilt from its directory.

Every value is checked against its field's type before anything is built
(:func:`check_types`, from the dataclass annotations of both configs): a bool
must be ``true``/``false`` (not the string ``"false"``), a number a number, a
float finite, a list of sizes a list of integers.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from pyro_vae.infer.objectives import GROUPED_OBJECTIVES, OBJECTIVES
from pyro_vae.models.config import ModelConfig

#: Seeds go to torch and numpy; numpy takes 32-bit seeds.
MAX_SEED = 2**32 - 1
#: Device names the trainer and the commands accept.
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
#: Options a resumed run may change: they change neither the program, nor the objective, nor the
#: sequence of batches.  Every other option must equal the checkpoint's (``run_dir`` and ``data_dir``
#: say where the run and its data are now; the data's fingerprint is checked separately).
RESUMABLE = ("epochs", "max_steps", "patience", "lr", "device", "progress", "checkpoint_every",
             "checkpoint_every_steps", "run_dir", "data_dir")


@dataclass
class TrainConfig:
    """How to train: the data set, the objective and its particles, optimisation, output, and the
    :class:`~pyro_vae.models.config.ModelConfig` (or a user's ``program`` by import path) trained.

    Flat options (as the flags and TOML keys spell them) go through :meth:`from_flat`, which sends
    each to the model or the training side and checks its type; :meth:`validate` checks ranges.
    """

    # data
    data: str = "digits"
    data_dir: str | None = None
    # objective
    objective: str = "trace"
    particles: int | None = None
    alpha: float | None = None
    groups: int | None = None  # miwae/piwae: M groups of `particles` draws (None: DEFAULT_GROUPS)
    ciwae_beta: float | None = None  # ciwae: weight of the ELBO, in [0, 1] (None: DEFAULT_CIWAE_BETA)
    beta: float = 1.0
    warmup_epochs: float = 0.0
    # optimisation
    epochs: int = 50
    max_steps: int = 0  # stop (resumably) once this many optimizer steps are taken in all; 0: no limit
    batch_size: int = 128
    lr: float = 1e-3
    patience: int = 10
    seed: int = 0
    device: str = "auto"
    # output
    run_dir: str | None = None
    progress: bool = True
    # checkpoints inside an epoch: every this many seconds (0: none) and/or steps (0: none)
    checkpoint_every: float = 120.0
    checkpoint_every_steps: int = 0
    # a user's model/guide program by import path (see pyro_vae.train.program); None: the built-in model
    program: str | None = None
    # the built-in model (parts, sizes); a program's factory also receives it
    model: ModelConfig = field(default_factory=ModelConfig)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} - {"model"}

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["model"] = self.model.to_dict()
        return values

    def to_flat(self) -> dict[str, Any]:
        """Training and model options in one dict, keyed as the flags are."""
        values = self.to_dict()
        return {**values.pop("model"), **values}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from :meth:`to_dict`'s form (a nested ``model``) or the flat form of the flags."""
        if not isinstance(values, dict):
            raise ValueError(f"a config must be a table of options, got {_describe(values)}")
        values = dict(values)
        model = values.pop("model", None)
        if isinstance(model, ModelConfig):
            model = model.to_dict()
        if model is not None and not isinstance(model, dict):
            raise ValueError(f"model must be a table of model options, got {model!r}")
        flat = {**(model or {}), **values}
        return cls.from_flat(flat)

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> "TrainConfig":
        """Split flat options into model and training options, rejecting unknown keys by name and
        values of the wrong type (:func:`check_types`) before anything is built."""
        train_keys, model_keys = cls.field_names(), ModelConfig.field_names()
        unknown = sorted(set(values) - train_keys - model_keys)
        if unknown:
            raise ValueError(f"unknown config key(s) {', '.join(unknown)}; valid keys are "
                             f"{', '.join(sorted(train_keys | model_keys))}")
        values = check_types(values, field_types())
        model = ModelConfig.from_dict({k: v for k, v in values.items() if k in model_keys})
        config = cls(model=model, **{k: v for k, v in values.items() if k in train_keys})
        config.validate()
        return config

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with flat options changed (model options included)."""
        return TrainConfig.from_flat({**self.to_flat(), **changes})

    def validate(self) -> None:
        """Check types and ranges that would otherwise fail deep inside training."""
        if not isinstance(self.model, ModelConfig):
            raise ValueError(f"model must be a ModelConfig (e.g. ModelConfig(latent_dim=...)), got "
                             f"{_describe(self.model)}")
        check_types(self.to_flat(), field_types())
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; expected one of {', '.join(OBJECTIVES)}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size}
        if self.particles is not None:
            positive["particles"] = self.particles
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        for name in ("beta", "warmup_epochs", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0 (0 disables early stopping), got {self.patience!r}")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0 (0: no limit), got {self.max_steps!r}")
        if self.checkpoint_every_steps < 0:
            raise ValueError(f"checkpoint_every_steps must be >= 0 (0: none), got {self.checkpoint_every_steps!r}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {self.seed!r}")
        check_device_name(self.device)
        self._check_objective_options()
        if not self.data:
            raise ValueError("data must name a data set or a .npy/.npz file, got an empty string")
        for name in ("run_dir", "data_dir", "program"):  # None means the default; "" would silently mean it too
            if getattr(self, name) == "":
                raise ValueError(f"{name} must not be empty; leave it out for the default")
        self.model.validate()

    def _check_objective_options(self) -> None:
        """``groups`` (miwae/piwae) and ``ciwae_beta`` (ciwae): in range, and refused by name for
        the objectives they do not apply to."""
        if self.groups is not None:
            if self.objective not in GROUPED_OBJECTIVES:
                raise ValueError(f"groups applies to objectives {' and '.join(GROUPED_OBJECTIVES)} only; got "
                                 f"groups={self.groups!r} with objective {self.objective!r}")
            if self.groups < 1:
                raise ValueError(f"groups must be a positive integer, got {self.groups!r}")
        if self.ciwae_beta is not None:
            if self.objective != "ciwae":
                raise ValueError(f"ciwae_beta applies to objective 'ciwae' only; got ciwae_beta={self.ciwae_beta!r} "
                                 f"with objective {self.objective!r} (the beta-VAE weight is beta)")
            if not 0.0 <= self.ciwae_beta <= 1.0:
                raise ValueError(f"ciwae_beta must be a number in [0, 1], got {self.ciwae_beta!r}")

    def refused_on_resume(self, saved: "TrainConfig") -> list[str]:
        """The options that differ from the checkpoint's ``saved`` config but may not change on
        resume (see :data:`RESUMABLE`), each as ``name (checkpoint X, now Y)``."""
        before, now = saved.to_flat(), self.to_flat()
        return [f"{k} (checkpoint {before.get(k)!r}, now {now.get(k)!r})"
                for k in sorted(set(before) | set(now)) if k not in RESUMABLE and before.get(k) != now.get(k)]


def check_device_name(name: Any) -> str:
    """``name`` if it is a device the commands accept (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    if not isinstance(name, str) or not DEVICE_PATTERN.fullmatch(name):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {name!r}")
    return name


# -- types ------------------------------------------------------------------------------------------

def field_types() -> dict[str, Any]:
    """Flat option name -> annotated type, of both configs (the training side wins on a clash)."""
    hints = {k: v for k, v in typing.get_type_hints(ModelConfig).items() if k in ModelConfig.field_names()}
    hints.update({k: v for k, v in typing.get_type_hints(TrainConfig).items() if k in TrainConfig.field_names()})
    return hints


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_value(name: str, value: Any, hint: Any) -> Any:
    """``value`` (ints widened to float for float fields, tuples to lists) if it fits ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _check_value(name, value, rest[0])
        return value  # a union of several types: left to validate()
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {_describe(value)}")
        return value
    if origin is list and len(args) == 1:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {_describe(value)}")
        return [_check_value(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)]
    return value  # a type this check does not know: validate() has the last word


def check_types(values: dict[str, Any], hints: dict[str, Any]) -> dict[str, Any]:
    """``values`` with each checked against ``hints[name]``; the first mismatch is a ``ValueError``
    naming the option, the value and the expected type."""
    return {k: (_check_value(k, v, hints[k]) if k in hints else v) for k, v in values.items()}


# -- files ------------------------------------------------------------------------------------------

def _flatten_toml(path: Path, values: dict[str, Any]) -> dict[str, Any]:
    """Flat options from a TOML document: top-level keys, ``[train]`` and ``[model]`` tables; the
    same option twice (``latent-dim`` and ``latent_dim``, or at top level and in a table) is an error."""
    found: dict[str, tuple[str, Any]] = {}  # option -> (where and how it was spelled, value)

    def add(key: str, value: Any, where: str) -> None:
        name = key.replace("-", "_")
        if name in found:
            raise ValueError(f"config file {path} sets {name} twice: as {found[name][0]} and as {where}; keep one")
        found[name] = (where, value)

    for key, value in values.items():
        if key in ("train", "model") and isinstance(value, dict):
            for inner, v in value.items():
                table = key
                if key == "train" and inner == "model" and isinstance(v, dict):  # [train.model]
                    tables = [("train.model", k, x) for k, x in v.items()]
                else:
                    tables = [(table, inner, v)]
                for table, name, x in tables:
                    if table != "train" and name.replace("-", "_") not in ModelConfig.field_names():
                        raise ValueError(f"config file {path}: [{table}] has no option {name!r}; model options "
                                         f"are {', '.join(sorted(ModelConfig.field_names()))}")
                    add(name, x, f"{name!r} in [{table}]")
        elif isinstance(value, dict):
            raise ValueError(f"config file {path} has a table [{key}]; expected options at top level or in "
                             "[train] (and [model])")
        elif key in ("train", "model"):
            raise ValueError(f"config file {path}: {key} must be a table [{key}] of options, got {_describe(value)}")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            raise ValueError(f"config file {path} has an array of tables [[{key}]]; expected options at top level "
                             "or in one table [train] (and [model])")
        else:
            add(key, value, repr(key))
    return {name: value for name, (_, value) in found.items()}


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config: flat keys at top level or under ``[train]`` (model keys also under ``[model]``).

    Every key and value is checked here, against the options' names and types, so a bad value
    in the file is refused by the file's name even where a flag would override it.  A UTF-8
    byte-order mark (as some editors write) is skipped.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
        values = tomllib.loads(text)
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"config file {path} is a directory; expected a TOML file") from None
    except OSError as e:
        raise ValueError(f"config file {path} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {path} is not UTF-8 text, as TOML must be ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path} is not valid TOML: {e}") from None
    flat = _flatten_toml(path, values)
    known = TrainConfig.field_names() | ModelConfig.field_names()
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ValueError(f"config file {path}: unknown config key(s) {', '.join(unknown)}; valid keys are "
                         f"{', '.join(sorted(known))}")
    try:
        return check_types(flat, field_types())
    except ValueError as e:
        raise ValueError(f"config file {path}: {e}") from None
