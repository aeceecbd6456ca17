"""A model/guide pair as the trainer, the evaluator and the run directory see it.

A *program* is any Pyro ``model(*args)`` / ``guide(*args)`` pair whose
latent and observed sites live inside ``pyro.plate("data", B)``: the
library's :class:`~pyro_vae.models.vae.VAE`, a user's ``nn.Module`` with
``model`` and ``guide`` methods, or two plain functions whose parameters come
from ``pyro.module``, ``PyroModule`` or ``pyro.param``.  ``args`` are ``(x,)``,
or ``(x, y)`` with labels.

Parameters are found the way ``SVI`` finds them: from the ``param`` sites of
one run of the guide and the model (:func:`program_parameters`).  A checkpoint
stores them by name, and restoring copies the saved values *into* those same
tensors, so an optimizer built on them keeps stepping the tensors the program
uses (replacing tensors in Pyro's parameter store would leave ``pyro.module``
networks and the optimizer on different copies).

A run records where its program came from, so ``evaluate``, ``sample`` and
``--resume`` can rebuild it: the model description (:class:`ModelConfig`) for
the built-in models, or an import path (``TrainConfig.program``):

* ``package.module`` -- a module with top-level ``model`` and ``guide`` functions;
* ``package.module:name`` -- an object with ``model`` and ``guide`` attributes,
  or a callable (class or factory) returning one; it is called with the
  keyword arguments its signature accepts among ``input_dim``,
  ``num_classes``, ``image_shape`` and ``config`` (the :class:`ModelConfig`).
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

import pyro

from pyro_vae.infer.params import program_parameters as site_parameters
from pyro_vae.models.config import ModelConfig

if TYPE_CHECKING:
    from pyro_vae.train.config import TrainConfig


class ProgramError(ValueError):
    """A program cannot be built, imported or restored."""


@dataclass
class Program:
    """A model/guide pair, the ``nn.Module`` that owns them (if any), and its source."""

    model: Callable
    guide: Callable
    module: nn.Module | None = None
    source: str | None = None

    @property
    def name(self) -> str:
        if self.source:
            return self.source
        owner = self.module if self.module is not None else self.model
        return type(owner).__name__ if self.module is not None else getattr(owner, "__qualname__", repr(owner))

    def to(self, device: torch.device) -> "Program":
        """Move the owning module (the built-in models) to ``device``."""
        if self.module is not None:
            self.module.to(device)
        return self

    def train(self, mode: bool = True) -> None:
        if self.module is not None:
            self.module.train(mode)

    def set_progress(self, step: int, steps_per_epoch: int) -> None:
        """Forward the trainer's position to parts with schedules (e.g. a relaxation temperature)."""
        hook = getattr(self.module, "set_progress", None)
        if hook is not None:
            hook(step, steps_per_epoch)


def as_program(obj: Any, source: str | None = None) -> Program:
    """A :class:`Program` from a ``Program``, an object with ``model``/``guide`` attributes
    (e.g. an ``nn.Module``) or a ``(model, guide)`` pair of callables."""
    if isinstance(obj, Program):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2:
        model, guide = obj
        module = None
    else:
        model, guide = getattr(obj, "model", None), getattr(obj, "guide", None)
        module = obj if isinstance(obj, nn.Module) else None
    if not (callable(model) and callable(guide)):
        raise ProgramError(f"{obj!r} is not a model/guide pair: expected an object with callable `model` and "
                           "`guide` attributes, or a (model, guide) tuple of callables")
    if module is None:  # bound methods of one nn.Module: that module owns the parameters
        owner = getattr(model, "__self__", None)
        if isinstance(owner, nn.Module) and getattr(guide, "__self__", None) is owner:
            module = owner
    return Program(model, guide, module, source)


def call_with_accepted(factory: Callable, available: dict[str, Any]) -> Any:
    """Call ``factory`` with the entries of ``available`` that its signature names
    (all of them if it takes ``**kwargs``)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: call it bare
        return factory()
    params = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return factory(**available)
    return factory(**{p.name: available[p.name] for p in params if p.name in available})


def import_object(path: str, what: str) -> Any:
    """Import ``package.module`` or ``package.module:attribute`` (dots allowed in the attribute)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or (":" in path and not attribute):
        raise ProgramError(f"{what} {path!r} is not an import path; expected 'package.module' or "
                           "'package.module:name'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ProgramError(f"{what} {path!r}: cannot import module {module_name!r} ({e}); is it installed "
                           "or on PYTHONPATH?") from None
    for name in filter(None, attribute.split(".")):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            raise ProgramError(f"{what} {path!r}: {module_name!r} has no attribute {attribute!r}") from None
    return obj


def import_program(path: str, input_dim: int, num_classes: int | None = None,
                   image_shape: tuple[int, ...] | None = None, config: ModelConfig | None = None) -> Program:
    """Build the program named by the import path ``path`` (see the module docstring)."""
    obj = import_object(path, "program")
    if ":" not in path:  # a module: its top-level model and guide functions
        if not (callable(getattr(obj, "model", None)) and callable(getattr(obj, "guide", None))):
            raise ProgramError(f"program {path!r}: the module has no top-level `model` and `guide` functions; "
                               "name an object or factory with 'package.module:name'")
        return Program(obj.model, obj.guide, None, path)
    if not (hasattr(obj, "model") and hasattr(obj, "guide")) or inspect.isclass(obj):
        if not callable(obj):
            raise ProgramError(f"program {path!r} is neither a model/guide pair nor callable")
        available = {"input_dim": input_dim, "num_classes": num_classes or 0, "image_shape": image_shape,
                     "config": config or ModelConfig()}
        try:
            obj = call_with_accepted(obj, available)
        except ProgramError:
            raise
        except Exception as e:  # a user's constructor can raise anything: name it and the path
            raise ProgramError(f"program {path!r} failed to build: {type(e).__name__}: {e}") from e
    try:
        return as_program(obj, source=path)
    except ProgramError as e:
        raise ProgramError(f"program {path!r}: {e}") from None


# -- parameters -------------------------------------------------------------------------------

def program_parameters(program: Program, *args: Any, strict: bool = True) -> dict[str, torch.Tensor]:
    """Name -> unconstrained tensor of every parameter the guide and the model use on ``args``
    (:func:`pyro_vae.infer.params.program_parameters`: their ``param`` sites, as ``SVI`` finds
    them), plus the owning module's parameters that those runs did not touch.
    ``strict``: a program without parameters is an error (there is nothing to train)."""
    params = dict(site_parameters(program.model, program.guide, *args))
    if program.module is not None:
        seen = {id(p) for p in params.values()}
        for name, p in program.module.named_parameters():
            if p.requires_grad and id(p) not in seen:
                params[name] = p
    if not params and strict:
        raise ProgramError(f"program {program.name} has no parameters: register networks with pyro.module or "
                           "PyroModule, or use pyro.param")
    return params


def fresh_program_parameters(program: Program, *args: Any, strict: bool = True,
                             warn_replaced: bool = False) -> dict[str, torch.Tensor]:
    """:func:`program_parameters` as the program itself initialises them, whatever Pyro's global
    parameter store already holds.

    ``pyro.module`` and ``pyro.param`` return the store's entry when one of the same name
    exists, so a store left by another run in this process would make the program read that
    run's tensors -- and an optimizer step tensors its networks never use.  The parameters are
    therefore found in an empty store scope and then written into the global store under their
    names, replacing such entries and keeping every other entry; ``warn_replaced`` names the
    replaced entries in a warning (for a user's program starting a new run, which might have
    meant to start from them).
    """
    store = pyro.get_param_store()
    with store.scope() as own:
        params = program_parameters(program, *args, strict=strict)
    current = store.get_state()
    replaced = sorted(set(current["params"]) & set(own["params"]))
    store.set_state({"params": {**current["params"], **own["params"]},
                     "constraints": {**current["constraints"], **own["constraints"]}})
    if replaced and warn_replaced:
        shown = ", ".join(replaced[:5]) + (f" and {len(replaced) - 5} more" if len(replaced) > 5 else "")
        warnings.warn(f"Pyro's parameter store held parameters of the same names as program {program.name}'s "
                      f"({shown}), left by another run in this process; the program uses its own parameters "
                      "and the store now holds them (to continue a run, resume it instead)", stacklevel=2)
    return params


def program_state(program: Program, params: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What a checkpoint keeps of a program: its parameters by name, the owning module's
    buffers, and the constrained/unconstrained bookkeeping of Pyro's parameter store."""
    buffers = {} if program.module is None else {n: b.detach().clone() for n, b in program.module.named_buffers()}
    return {"params": {n: p.detach().clone() for n, p in params.items()}, "buffers": buffers}


def restore_program_state(program: Program, params: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Copy a checkpoint's values into ``params`` and the module's buffers, in place.

    Names and shapes must match exactly: a different program (another part, size or
    component count) is refused by name rather than loaded half-way.
    """
    saved = state["params"]
    missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or extra:
        raise ProgramError("the checkpoint is of a different program: "
                           + "; ".join(filter(None, [f"parameters not in the checkpoint: {', '.join(missing)}"
                                                     if missing else "",
                                                     f"parameters the program lacks: {', '.join(extra)}"
                                                     if extra else ""])))
    wrong = [f"{n} (checkpoint {tuple(saved[n].shape)}, program {tuple(p.shape)})"
             for n, p in params.items() if tuple(saved[n].shape) != tuple(p.shape)]
    if wrong:
        raise ProgramError("the checkpoint is of a different program: parameter shapes differ: " + ", ".join(wrong))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device))
        if program.module is not None:
            buffers = dict(program.module.named_buffers())
            for name, value in state.get("buffers", {}).items():
                if name in buffers and buffers[name].shape == value.shape:
                    buffers[name].copy_(value.to(buffers[name].device))


# -- building a run's program -------------------------------------------------------------------

def build_program(config: "TrainConfig", input_dim: int, num_classes: int | None = None,
                  image_shape: tuple[int, ...] | None = None) -> Program:
    """The program a run trains (or reopens): ``config.program`` imported, else the built-in model
    of ``config.model``, for data of ``input_dim`` features (``num_classes`` labels, images of
    ``image_shape``).  Its parameters are bound with :func:`fresh_program_parameters`, so that
    what Pyro's global parameter store holds from other runs does not leak in."""
    if config.program:
        return import_program(config.program, input_dim, num_classes, image_shape, config.model)
    if config.model.stochastic_layers == 2 and config.objective == "meanfield":
        raise ProgramError("objective 'meanfield' does not apply to --stochastic-layers 2: the guide q(z2 | z1) "
                           "q(z1 | x) is not mean-field, so TraceMeanField_ELBO's analytic KL would be biased; "
                           "use trace, iwae or renyi")
    from pyro_vae.models.registry import build_model

    return as_program(build_model(config.model, input_dim, num_classes, image_shape))


def check_program_data(program: Program, x: torch.Tensor, what: str) -> None:
    """Reject data the program's likelihood cannot score: the decoder's own ``check_data`` hook
    when the program has a decoder with one, else only non-finite values."""
    from pyro_vae.models.protocols import check_part_data

    check_part_data(getattr(program.module, "decoder", None), x, what)
