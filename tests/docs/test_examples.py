"""The examples of the user guide (docs/guide/*.md) and of README.md run as written.

* A fenced block whose first line is ``# file: NAME`` is written to ``NAME`` in
  the page's working folder (a module the other examples import, a TOML file).
* Every other ``python`` block is executed, in order, in one namespace per
  page, in a fresh working folder that is also on ``sys.path``.
* In ``bash`` blocks every ``pyro-vae ...`` (or ``python -m pyro_vae ...``)
  command, also one inside a ``&&`` chain, with optional ``VAR=value``
  prefixes (``PYTHONPATH=dir`` puts ``dir`` on ``sys.path``), goes through
  :func:`pyro_vae.cli.main.main`.  A command runs when it is cheap: training on
  ``digits`` or a local ``.npy``/``.npz`` file, and ``evaluate``, ``sample``,
  ``compare`` or ``--resume`` of runs an earlier command of the page made.  Any
  other command (MNIST training, runs that do not exist here) is parsed and its
  training options validated, so a stale flag or value still fails.  So is a
  ``torchrun ... -m pyro_vae ...`` command, which is never run here.

Sizes are cut, never options added that change what an example means: training
runs 1 epoch (2 when resumed), importance sampling uses at most 100 particles,
``snr`` at most 5 gradient draws at the first two values of K.
Python examples that load MNIST run only where ``$PYRO_VAE_DATA`` is set
(:func:`test_mnist_examples_run`), and then fail if its files are missing.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pyro
import pytest
import torch

from conftest import shared_data_dir
from pyro_vae.cli.main import build_parser, main
from pyro_vae.cli.train import config_from_args
from pyro_vae.data import load_dataset

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted((ROOT / "docs" / "guide").glob("*.md")) + [ROOT / "README.md"]

FENCE = re.compile(r"^(`{3,})([\w-]*)[^\n]*\n(.*?)^\1[ \t]*$", re.MULTILINE | re.DOTALL)
FILE_MARK = re.compile(r"^#\s*file:\s*(\S+)\s*$")
MNIST = re.compile(r"""["'](binarized-mnist|mnist-binarized|mnist)["']""")
COMMAND = re.compile(r"^(?:\w+=\S*\s+)*(?:pyro-vae|python3? -m pyro_vae|torchrun\s.*?-m pyro_vae)(?:\s|$)")
MAX_PARTICLES = 100
SNR_DRAWS = 5


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def file_name(self) -> str | None:
        first = self.text.splitlines()[0] if self.text.strip() else ""
        match = FILE_MARK.match(first)
        return match.group(1) if match else None


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    return [Block(page, text.count("\n", 0, m.start()) + 1, m.group(2).lower(), m.group(3))
            for m in FENCE.finditer(text)]


def needs_mnist(block: Block) -> bool:
    return block.lang == "python" and block.file_name is None and bool(MNIST.search(block.text))


# -- cutting sizes ----------------------------------------------------------------------------

def small_python(code: str) -> str:
    code = re.sub(r"\bepochs=\d+", "epochs=1", code)
    return re.sub(r"\bparticles=(\d+)", lambda m: f"particles={min(int(m.group(1)), MAX_PARTICLES)}", code)


def _set_option(argv: list[str], flag: str, value: str) -> list[str]:
    if flag in argv:
        i = argv.index(flag)
        return argv[:i + 1] + [value] + argv[i + 2:]
    return argv + [flag, value]


def small_command(argv: list[str]) -> list[str]:
    command = argv[0]
    if command == "train":
        argv = _set_option(argv, "--epochs", "2" if "--resume" in argv else "1")
        return argv + ["--no-progress"]
    if command == "evaluate":
        particles = int(argv[argv.index("--particles") + 1]) if "--particles" in argv else MAX_PARTICLES
        argv = _set_option(argv, "--particles", str(min(particles, MAX_PARTICLES)))
        return argv + ["--no-progress"]
    if command == "snr":
        draws = int(argv[argv.index("--draws") + 1]) if "--draws" in argv else SNR_DRAWS
        ks = argv[argv.index("--particles") + 1].split(",") if "--particles" in argv else ["1", "4"]
        argv = _set_option(argv, "--draws", str(min(draws, SNR_DRAWS)))
        return _set_option(argv, "--particles", ",".join(ks[:2])) + ["--no-progress"]
    return argv


# -- commands ---------------------------------------------------------------------------------

@dataclass
class Command:
    block: Block
    text: str
    env: dict[str, str]
    argv: list[str]
    launcher: str = ""  # "torchrun": several processes, never run here


def commands(block: Block) -> list[Command]:
    found = []
    for line in block.text.replace("\\\n", " ").splitlines():
        for segment in line.split("&&"):
            segment = segment.strip()
            if not COMMAND.match(segment):
                continue
            words = shlex.split(segment, comments=True)
            env = {}
            while "=" in words[0] and not words[0].startswith("-"):
                key, value = words.pop(0).split("=", 1)
                env[key] = value
            launcher = words[0] if words[0] == "torchrun" else ""
            if words[0] == "pyro-vae":
                words = words[1:]
            else:  # python -m pyro_vae ..., torchrun [its options] -m pyro_vae ...
                words = words[next(i for i in range(len(words) - 1) if words[i:i + 2] == ["-m", "pyro_vae"]) + 2:]
            found.append(Command(block, segment, env, words, launcher))
    return found


def cheap(argv: list[str], cwd: Path) -> tuple[bool, object]:
    """Whether the command is cheap to run here, and its parsed arguments."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"the command does not parse (exit {e.code})") from None
    if args.command == "train":
        if args.resume and not (cwd / args.resume).is_dir():
            return False, args
        config = config_from_args(args)  # validates every value, also of commands that do not run
        data = config.data
        return data == "digits" or (data.endswith((".npy", ".npz")) and (cwd / data).is_file()), args
    runs = args.run_dirs if args.command == "compare" else [args.run_dir]
    return all((cwd / run).is_dir() for run in runs), args


def run_command(command: Command, cwd: Path, monkeypatch) -> None:
    for path in filter(None, command.env.get("PYTHONPATH", "").split(os.pathsep)):
        folder = cwd / path if (cwd / path).is_dir() else ROOT / path
        assert folder.is_dir(), f"{command.block.where}: PYTHONPATH={path} is neither here nor in the repository"
        monkeypatch.syspath_prepend(str(folder))
    where = f"{command.block.where}: `{command.text}`"
    try:
        run, _ = cheap(command.argv, cwd)
    except (AssertionError, ValueError) as e:
        raise AssertionError(f"{where}: {e}") from None
    if not run or command.launcher:
        return
    argv = small_command(command.argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 0, f"{where} (run as {' '.join(argv)}) exited with {code}:\n{err.getvalue()}{out.getvalue()}"


# -- running a page ---------------------------------------------------------------------------

@pytest.fixture
def workdir(tmp_path, monkeypatch, cpu_threads):
    """A fresh working folder on sys.path; modules imported from it are forgotten afterwards."""
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield tmp_path
    for name in set(sys.modules) - before:
        file = getattr(sys.modules[name], "__file__", None) or ""
        if file.startswith(str(tmp_path)) or file.startswith(str(ROOT / "experiments")):
            del sys.modules[name]
    pyro.clear_param_store()


def run_blocks(page_blocks: list[Block], cwd: Path, monkeypatch) -> None:
    namespace: dict = {"__name__": "__doc_example__"}
    for block in page_blocks:
        if block.file_name:
            (cwd / block.file_name).write_text(block.text, encoding="utf-8")
        elif block.lang == "python":
            code = compile(small_python(block.text), block.where, "exec")
            with contextlib.redirect_stdout(io.StringIO()):
                exec(code, namespace)  # noqa: S102 - the documentation's own examples
        elif block.lang in ("bash", "sh", "shell", "console"):
            for command in commands(block):
                run_command(command, cwd, monkeypatch)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_run(page, workdir, monkeypatch):
    page_blocks = [b for b in blocks(page) if not needs_mnist(b)]
    assert page_blocks or page.name == "index.md", f"no examples found in {page.relative_to(ROOT)}"
    run_blocks(page_blocks, workdir, monkeypatch)


def test_mnist_examples_run(workdir, monkeypatch):
    """The Python examples that load MNIST, from ``$PYRO_VAE_DATA`` (which must then hold it)."""
    mnist_blocks = [b for page in PAGES for b in blocks(page) if needs_mnist(b)]
    assert mnist_blocks, "no example loads MNIST: the pattern or the pages changed"
    data = shared_data_dir()
    if data is None:
        pytest.skip("$PYRO_VAE_DATA is not set: the MNIST examples need the data sets there")
    for name in sorted({m.group(1) for b in mnist_blocks for m in MNIST.finditer(b.text)}):
        load_dataset(name, data, download=False)  # fails (MissingDataError) when the files are not there
    run_blocks(mnist_blocks, workdir, monkeypatch)


# -- the extraction itself --------------------------------------------------------------------

def test_the_extraction_finds_the_examples():
    found = {page.name: blocks(page) for page in PAGES}
    readme = found["README.md"]
    assert any(b.lang == "python" for b in readme), "README.md has no python block any more?"
    assert any(commands(b) for b in readme)
    assert [c.argv[:2] for c in commands(Block(ROOT, 1, "bash",
            "python3 -m venv .venv && pip install -e . && pyro-vae train  # note\n"
            "PYTHONPATH=experiments pyro-vae evaluate runs/x --particles 500\n"
            "torchrun --nproc_per_node=4 -m pyro_vae sample runs/x \\\n  --num 5\n"))] == [
        ["train"], ["evaluate", "runs/x"], ["sample", "runs/x"]]
    assert small_command(["evaluate", "r", "--particles", "5000"]) == ["evaluate", "r", "--particles", "100",
                                                                      "--no-progress"]
    assert small_command(["snr", "r", "--particles", "1,8,64"]) == ["snr", "r", "--particles", "1,8", "--draws", "5",
                                                                   "--no-progress"]
    assert small_command(["train", "--resume", "r", "--epochs", "20"]) == ["train", "--resume", "r", "--epochs",
                                                                         "2", "--no-progress"]


def test_cheap_commands_are_told_from_expensive_ones(tmp_path):
    (tmp_path / "runs" / "here").mkdir(parents=True)
    assert cheap(["train", "--epochs", "3"], tmp_path)[0]
    assert not cheap(["train", "--data", "binarized-mnist"], tmp_path)[0]
    assert not cheap(["train", "--data", "missing.npz"], tmp_path)[0]
    assert cheap(["evaluate", "runs/here"], tmp_path)[0] and cheap(["compare", "runs/here"], tmp_path)[0]
    assert not cheap(["sample", "runs/elsewhere"], tmp_path)[0]
    with pytest.raises(AssertionError, match="does not parse"):
        cheap(["train", "--no-such-flag"], tmp_path)
    with pytest.raises(ValueError):
        cheap(["train", "--data", "binarized-mnist", "--groups", "2"], tmp_path)  # validated, though not run
