"""The user guide names what exists: every objective and every command, each described once;
its ``pyro_vae....`` names resolve; its pictures exist, are small, and are all used."""

from __future__ import annotations

import re
from pathlib import Path

from test_derivations import DOTTED_NAME, resolve

from pyro_vae.cli.main import COMMANDS
from pyro_vae.infer.objectives import OBJECTIVES

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "guide"
IMAGES = ROOT / "docs" / "images"
MAX_IMAGE_BYTES = 200_000
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def _table_names(text: str) -> list[str]:
    """The backticked names in the first cell of every table row."""
    return re.findall(r"^\| `([\w-]+)` \|", text, flags=re.MULTILINE)


def test_every_objective_is_described_once_and_only_objectives_that_exist():
    names = _table_names((GUIDE / "objectives.md").read_text(encoding="utf-8"))
    assert sorted(names) == sorted(set(names)), f"objectives described twice: {names}"
    unknown = sorted(set(names) - set(OBJECTIVES))
    missing = [o for o in OBJECTIVES if o not in names]
    assert not unknown, f"docs/guide/objectives.md describes objectives that do not exist: {unknown}"
    assert not missing, f"docs/guide/objectives.md has no table row for objective(s) {missing}"


def test_every_command_has_a_section_and_every_section_a_command():
    text = (GUIDE / "commands.md").read_text(encoding="utf-8")
    sections = re.findall(r"^## `pyro-vae (\w+)`", text, flags=re.MULTILINE)
    assert sorted(sections) == sorted(COMMANDS), (f"docs/guide/commands.md has sections for {sections}, "
                                                  f"the commands are {sorted(COMMANDS)}")


def test_every_dotted_name_in_the_guide_resolves():
    problems = []
    for page in sorted(GUIDE.glob("*.md")):
        for name in sorted(set(DOTTED_NAME.findall(page.read_text(encoding="utf-8")))):
            if (why := resolve(name)) is not None:
                problems.append(f"{page.relative_to(ROOT)}: `{name}`: {why}")
    assert not problems, "\n".join(problems)


def test_pictures_exist_are_small_and_are_all_used():
    used = set()
    problems = []
    for page in sorted((ROOT / "docs").rglob("*.md")):
        if "_build" in page.parts:
            continue
        for ref in IMAGE.findall(page.read_text(encoding="utf-8")):
            path = (page.parent / ref).resolve()
            used.add(path)
            if not path.is_file():
                problems.append(f"{page.relative_to(ROOT)}: {ref} does not exist")
    for path in sorted(IMAGES.glob("*")):
        if path.stat().st_size > MAX_IMAGE_BYTES:
            problems.append(f"{path.relative_to(ROOT)} is {path.stat().st_size} bytes, over {MAX_IMAGE_BYTES}")
        if path.resolve() not in used:
            problems.append(f"{path.relative_to(ROOT)} is not shown on any page")
    assert not problems, "\n".join(problems)
