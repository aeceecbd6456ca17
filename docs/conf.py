"""Sphinx configuration of the pyro-vae documentation.

Build it with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``
after ``pip install -e ".[docs]"``.  The Markdown pages of ``docs/`` are read
by myst-parser; the API reference (``docs/api/``) is generated from the
docstrings by autodoc.  Each API page names a subpackage with the
``pyro-vae-modules`` directive defined below, which documents every module of
that subpackage found on import, so a new module appears without editing the
pages.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import dataclasses
import importlib
import inspect
import logging as pylogging
import os
import pkgutil
import re
import sys
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import Directive
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.nodes import nested_parse_with_titles

import pyro_vae

logger = logging.getLogger(__name__)

project = "pyro-vae"
author = "the pyro-vae authors"
copyright = "the pyro-vae authors"
release = version = pyro_vae.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
# docs/README.md is the folder's index for readers of the repository; index.md is the site's.
exclude_patterns = ["_build", "README.md"]

# Markdown: $...$ and $$...$$ math with \tag (docs/derivations.md), and heading anchors for links
# such as derivations.md#equation-table (a link to a missing anchor is a warning).
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 4
myst_dmath_double_inline = True

autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autoclass_content = "both"
# torch.nn.Module.forward and the like say nothing about this library
autodoc_inherit_docstrings = False

html_theme = "alabaster"
html_title = f"pyro-vae {release}"
html_static_path: list[str] = []
html_theme_options = {"description": "Variational autoencoders as Pyro model/guide pairs", "fixed_sidebar": False}


def submodules(package: str) -> list[str]:
    """Every module of ``package`` and its subpackages, in name order (the package itself first)."""
    pkg = importlib.import_module(package)
    names = [package]
    for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
        names.append(info.name)
    return sorted(set(names), key=lambda n: (n != package, n))


class ModulesDirective(Directive):
    """``.. pyro-vae-modules:: pyro_vae.infer``: one section per module of the package, each an
    ``automodule`` with its members."""

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        package = self.arguments[0]
        lines: list[str] = []
        for name in submodules(package):
            module = importlib.import_module(name)
            if name == package and not (module.__doc__ or "").strip():
                continue  # an empty package __init__: nothing to show
            title = f"``{name}``"
            lines += [title, "-" * len(title), "", f".. automodule:: {name}"]
            if hasattr(module, "__path__"):
                # a package's __all__ re-exports names documented in their own modules: link, do not repeat
                lines.append("   :ignore-module-all:")
            lines.append("")
        content = StringList(lines, source=f"<pyro-vae-modules {package}>")
        section = nodes.section()
        section.document = self.state.document
        nested_parse_with_titles(self.state, content, section)
        return section.children


def public_names() -> list[tuple[str, str]]:
    """``(name, home module)`` for each name of ``pyro_vae.__all__``, read from the imports of
    ``pyro_vae/__init__.py`` (the lazy ``evaluate`` included)."""
    tree = ast.parse(Path(pyro_vae.__file__).read_text(encoding="utf-8"))
    homes = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pyro_vae"):
            for alias in node.names:
                homes[alias.asname or alias.name] = node.module
    return [(name, homes.get(name, "pyro_vae")) for name in pyro_vae.__all__ if not name.startswith("__")]


def _summary(obj: object) -> str:
    """The first paragraph of a docstring on one line; for data, its value or its names."""
    if isinstance(obj, dict):
        return "names: " + ", ".join(f"``{k}``" for k in obj)
    if isinstance(obj, (tuple, list)):
        return ", ".join(f"``{v}``" for v in obj)
    doc = inspect.getdoc(obj) or ""
    if dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
        # the signature dataclasses write when a class has no docstring: name the fields instead
        return "a dataclass of " + ", ".join(f"``{f.name}``" for f in dataclasses.fields(obj))
    return " ".join(doc.split("\n\n")[0].split())


class PublicDirective(Directive):
    """``.. pyro-vae-public::``: a table of ``pyro_vae.__all__`` (the names that import from the
    package itself), each with its summary and a link to where it is documented."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        lines = [".. list-table::", "   :widths: 25 75", "   :header-rows: 1", "",
                 "   * - name", "     - what it is"]
        for name, home in public_names():
            obj = getattr(pyro_vae, name)
            lines += [f"   * - :py:obj:`{name} <{home}.{name}>`", f"     - {_summary(obj) or '(no docstring)'}"]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source="<pyro-vae-public>"), self.content_offset, container)
        return container.children


def drop_dataclass_signatures(app, what, name, obj, options, lines):
    """A dataclass without a docstring gets ``Name(field: type = default, ...)`` as its ``__doc__``;
    the signature is shown anyway, so that text is dropped."""
    if what == "class" and dataclasses.is_dataclass(obj) and lines and lines[0].startswith(f"{obj.__name__}("):
        if (obj.__doc__ or "").startswith(f"{obj.__name__}("):
            lines.clear()


class HelpDirective(Directive):
    """``.. pyro-vae-help::``: the ``--help`` text of every ``pyro-vae`` command, one section each,
    taken from the parser itself so that the page always lists the options the code accepts."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from pyro_vae.cli.main import build_parser

        parser = build_parser()
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        previous = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal width: fix it for the page
        try:
            lines: list[str] = []
            for name, sub in commands.items():
                title = f"``pyro-vae {name}``"
                lines += [title, "-" * len(title), "", "::", ""]
                lines += ["   " + line for line in sub.format_help().splitlines()] + [""]
        finally:
            if previous is None:
                del os.environ["COLUMNS"]
            else:
                os.environ["COLUMNS"] = previous
        section = nodes.section()
        section.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source="<pyro-vae-help>"), section)
        return section.children


_MISSING = object()


def _lookup(dotted: str) -> object:
    """The object ``dotted`` names (a module, then attributes), or ``_MISSING``."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, _MISSING)
            if obj is _MISSING:
                return _MISSING
        return obj
    return _MISSING


def _find(node) -> tuple[str, object]:
    """What a Python reference written in this library means: ``(text, object)``, the object being
    ``_MISSING`` when no such name exists there."""
    target = node.get("reftarget", "")
    if target.startswith("pyro_vae."):
        return target, _lookup(target)
    module, cls = node.get("py:module") or "", node.get("py:class") or ""
    for scope in ([f"{module}.{cls}"] if cls else []) + [module]:
        obj = _lookup(f"{scope}.{target}")
        if obj is not _MISSING:
            return target, obj
    return target, _MISSING


def resolve_pyro_vae_reference(app, env, node, contnode):
    """Sphinx is not nitpicky (torch and Pyro have no inventory here), but a reference to a name of
    this library must land somewhere.  A name a module imports (``:class:`DataError``` in
    ``pyro_vae.data.dataset``) is resolved to where it is defined; a name that does not exist is
    a stale reference and is warned about, so the ``-W`` build fails.  Private names, type
    variables and undocumented members stay plain text."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    module = node.get("py:module") or ""
    if not (target.startswith("pyro_vae.") or (module.startswith("pyro_vae") and "." not in target)):
        return None
    if hasattr(builtins, target):
        return None
    text, obj = _find(node)
    if obj is _MISSING:
        logger.warning(f"reference to {text!r}, which does not exist (from {module or 'a page'})", location=node,
                       type="pyro_vae", subtype="ref")
        return None
    home_module = getattr(obj, "__module__", None) or ""
    name = getattr(obj, "__qualname__", None)
    if not home_module.startswith("pyro_vae") or not isinstance(name, str):
        return None  # another library's object, or a value without a home
    domain = env.get_domain("py")
    for role in ("obj", node.get("reftype") or "obj"):
        resolved = domain.resolve_xref(env, node["refdoc"], app.builder, role, f"{home_module}.{name}", node,
                                       contnode)
        if resolved is not None:
            return resolved
    return None


#: Docstring problems known to the owners of those files and not yet fixed there: (the object whose
#: docstring it is, the start of the message).  Each is dropped from the warnings (so ``-W`` passes)
#: and printed as a note; nothing else is.  Remove an entry once its docstring is fixed.
KNOWN_DOCSTRING_PROBLEMS: list[tuple[str, str]] = []


_NOTED: set[tuple[str, str]] = set()


class KnownProblems(pylogging.Filter):
    """Drop exactly the :data:`KNOWN_DOCSTRING_PROBLEMS`, printing each as a note."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.levelno < pylogging.WARNING:
            return True
        where, message = str(getattr(record, "location", "") or ""), str(record.msg)
        for obj, start in KNOWN_DOCSTRING_PROBLEMS:
            if where.endswith(f"docstring of {obj}") or f"docstring of {obj}:" in where:
                if message.startswith(start):
                    if (where, start) in _NOTED:
                        return False
                    _NOTED.add((where, start))
                    print(f"note: known docstring problem, not failing the build: {where}: "
                          f"{message.splitlines()[0]}", file=sys.stderr)
                    return False
        return True


DOCS = Path(__file__).resolve().parent
#: The line of index.md's topics list that stands for the top-level pages it does not name.
OTHER_TOPICS = "OTHER-TOPICS"


def list_other_topics(app, docname, source):
    """Put every top-level Markdown page that index.md does not name (a new topic page) where
    ``OTHER-TOPICS`` stands, so that a new page is part of the site without editing the index."""
    if docname != root_doc or OTHER_TOPICS not in source[0]:
        return
    text = source[0]
    named = set(re.findall(r"^([\w./-]+)$", text, flags=re.MULTILINE))
    others = [p.stem for p in sorted(DOCS.glob("*.md"))
              if p.stem not in named and p.name not in ("index.md", *exclude_patterns)]
    source[0] = text.replace(OTHER_TOPICS, "\n".join(others))


def note_fixed_problems(app, exception):
    """At the end, name the known problems that no longer occur, so their entries get removed."""
    for obj, start in KNOWN_DOCSTRING_PROBLEMS:
        if exception is None and not any(f"docstring of {obj}" in where and s == start for where, s in _NOTED):
            print(f"note: the known docstring problem of {obj} ({start!r}) no longer occurs: remove it from "
                  "KNOWN_DOCSTRING_PROBLEMS in docs/conf.py", file=sys.stderr)


def setup(app):
    app.connect("source-read", list_other_topics)
    app.connect("build-finished", note_fixed_problems)
    for handler in pylogging.getLogger(logging.NAMESPACE).handlers:
        handler.filters.insert(0, KnownProblems())
    app.add_directive("pyro-vae-modules", ModulesDirective)
    app.add_directive("pyro-vae-help", HelpDirective)
    app.add_directive("pyro-vae-public", PublicDirective)
    app.connect("missing-reference", resolve_pyro_vae_reference)
    app.connect("autodoc-process-docstring", drop_dataclass_signatures)
    return {"parallel_read_safe": True}
