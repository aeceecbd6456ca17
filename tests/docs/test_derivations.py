"""docs/derivations.md stays in step with the code.

* every ``pyro_vae....`` dotted name in backticks imports and resolves
  (modules, then attributes: functions, classes, methods);
* every ``tests/...py::name`` node id in backticks names a test function in
  that file (parsed with ``ast``; a parametrized id's ``[...]`` is stripped;
  ``Class::method`` is followed);
* the numbered equations are (D1), (D2), ... in order, each appears in the
  equation table, and every table row names a function or says
  "not implemented", and names a test or says "no test yet";
* every "docs/derivations.md, <section>" citation in the library's source
  names a heading of the document.

Each test collects every broken link before failing, and lists them all.
"""

from __future__ import annotations

import ast
import importlib
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "derivations.md"
TABLE_HEADING = "## Equation table"

DOTTED_NAME = re.compile(r"`(pyro_vae(?:\.[A-Za-z_]\w*)+)`")
NODE_ID = re.compile(r"`(tests/[\w./-]+\.py(?:::[^`\s]+)+)`")
EQUATION_TAG = re.compile(r"\\tag\{(D\d+)\}")
ROW_LABEL = re.compile(r"^\((D\d+)\)")
CITATION = re.compile(r"docs/derivations\.md,\s+([^)\];\n]+?)\s*[)\];]")


@pytest.fixture(scope="module")
def doc() -> str:
    assert DOC.is_file(), f"{DOC.relative_to(ROOT)} is missing"
    return DOC.read_text(encoding="utf-8")


def _fail(problems: list[str], what: str) -> None:
    if problems:
        pytest.fail(f"{len(problems)} {what} in docs/derivations.md:\n  " + "\n  ".join(problems), pytrace=False)


# -- dotted names -----------------------------------------------------------------------------

def resolve(dotted: str) -> str | None:
    """``None`` if ``dotted`` names a module or an attribute reachable from one, else why not."""
    parts = dotted.split(".")
    module, error = None, None
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not name.startswith(exc.name):
                return f"importing {name} fails: {exc}"  # a dependency is missing, not the name
            error = exc
            continue
        except Exception as exc:  # noqa: BLE001 - an import that raises is a broken link too
            return f"importing {name} raises {type(exc).__name__}: {exc}"
        obj, done = module, name
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return f"{done} has no module or attribute {attr!r}"
            obj, done = getattr(obj, attr), f"{done}.{attr}"
        return None
    return f"no module to import ({error})"


def test_every_dotted_name_resolves(doc):
    names = sorted(set(DOTTED_NAME.findall(doc)))
    assert names, "no `pyro_vae....` names found: the pattern or the document changed"
    problems = [f"`{name}`: {why}" for name in names if (why := resolve(name)) is not None]
    _fail(problems, "broken function link(s)")


# -- test node ids ----------------------------------------------------------------------------

@cache
def _module_tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _find(body: list[ast.stmt], name: str) -> ast.stmt | None:
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return node
    return None


def check_node_id(node_id: str) -> str | None:
    """``None`` if ``node_id`` names a test function (or method), else why not."""
    path_part, *names = node_id.split("::")
    path = ROOT / path_part
    if not path.is_file():
        return f"no file {path_part}"
    try:
        body = _module_tree(path).body
    except SyntaxError as exc:
        return f"{path_part} does not parse: {exc}"
    names[-1] = re.sub(r"\[.*\]$", "", names[-1])
    node: ast.stmt | None = None
    where = path_part
    for i, name in enumerate(names):
        node = _find(body, name)
        if node is None:
            return f"{where} has no {name!r}"
        last = i == len(names) - 1
        if not last:
            if not isinstance(node, ast.ClassDef):
                return f"{where}::{name} is not a class"
            body, where = node.body, f"{where}::{name}"
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return f"{where}::{names[-1]} is not a function"
    if not node.name.startswith("test"):
        return f"{where}::{node.name} is not a test (pytest collects test* functions only)"
    return None


def test_every_test_node_id_exists(doc):
    ids = sorted(set(NODE_ID.findall(doc)))
    assert ids, "no `tests/...::name` node ids found: the pattern or the document changed"
    problems = [f"`{node_id}`: {why}" for node_id in ids if (why := check_node_id(node_id)) is not None]
    _fail(problems, "broken test link(s)")


# -- the equations and the table --------------------------------------------------------------

def table_rows(doc: str) -> list[list[str]]:
    """The equation table's body rows, as lists of stripped cells."""
    assert TABLE_HEADING in doc, f"no {TABLE_HEADING!r} section"
    section = doc.split(TABLE_HEADING, 1)[1].split("\n## ", 1)[0]
    lines = [line.strip() for line in section.splitlines() if line.strip().startswith("|")]
    assert len(lines) > 2, "the equation table is empty"
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_equations_are_numbered_in_order_and_all_in_the_table(doc):
    tags = EQUATION_TAG.findall(doc)
    expected = [f"D{i}" for i in range(1, len(tags) + 1)]
    problems = []
    if tags != expected:
        first = next(i for i, (got, want) in enumerate(zip(tags, expected)) if got != want)
        problems.append(f"equation number {first + 1} is tagged {tags[first]}, expected {expected[first]}: "
                        "tag the equations D1, D2, ... once each, in order")
    in_table = []
    for row in table_rows(doc):
        label = ROW_LABEL.match(row[0])
        if label is None:
            problems.append(f"table row {row[0]!r} does not start with an equation label such as (D1)")
        else:
            in_table.append(label.group(1))
    missing = [t for t in expected if t not in in_table]
    unknown = [t for t in in_table if t not in expected]
    if missing:
        problems.append(f"equations without a table row: {', '.join(missing)}")
    if unknown:
        problems.append(f"table rows for equations that do not exist: {', '.join(unknown)}")
    _fail(problems, "numbering problem(s)")


def test_every_table_row_names_a_function_and_a_test_or_says_why_not(doc):
    problems = []
    for row in table_rows(doc):
        if len(row) != 3:
            problems.append(f"row {row[0]!r} has {len(row)} cells, expected 3 (equation | function | test)")
            continue
        label, function, test = row
        if not DOTTED_NAME.search(function) and not function.startswith("not implemented"):
            problems.append(f"{label}: the function cell names no `pyro_vae....` function "
                            "and does not say 'not implemented'")
        if not NODE_ID.search(test) and test != "no test yet":
            problems.append(f"{label}: the test cell names no `tests/...::test` and does not say 'no test yet'")
    _fail(problems, "incomplete table row(s)")


# -- citations from the code ------------------------------------------------------------------

def _normalize(text: str) -> str:
    text = re.sub(r"\s+", " ", text.replace("`", "")).strip().lower()
    return re.sub(r"^the ", "", text)


CITED_TAG = re.compile(r"\(D(\d+)\)|\bD(\d+) in docs/derivations")


def test_equation_tags_cited_in_the_library_exist(doc):
    """Every ``(Dn)`` a docstring or comment of the library cites is an equation of derivations.md."""
    tags = {int(n) for n in re.findall(r"\\tag\{D(\d+)\}", doc)}
    assert tags, "derivations.md tags no equation"
    problems = []
    for path in sorted((ROOT / "pyro_vae").rglob("*.py")):
        for match in CITED_TAG.finditer(path.read_text(encoding="utf-8")):
            number = int(match.group(1) or match.group(2))
            if number not in tags:
                problems.append(f"{path.relative_to(ROOT)} cites (D{number}), which derivations.md does not tag")
    _fail(problems, "dangling equation tag(s) of")


def test_section_citations_in_the_library_name_a_heading(doc):
    headings = [_normalize(h) for h in re.findall(r"^#{2,4} (.+)$", doc, flags=re.MULTILINE)]
    problems = []
    for path in sorted((ROOT / "pyro_vae").rglob("*.py")):
        # join wrapped comment and docstring lines so a citation split over two lines is read whole
        text = re.sub(r"\s*\n\s*#?\s*", " ", path.read_text(encoding="utf-8"))
        for cited in CITATION.findall(text):
            if not any(_normalize(cited) in heading for heading in headings):
                problems.append(f"{path.relative_to(ROOT)} cites section {cited!r}, which no heading names")
    _fail(problems, "dangling section citation(s) of")
