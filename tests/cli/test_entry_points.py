"""The installed ``pyro-vae`` command and ``python -m pyro_vae`` reach the CLI's main function."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib import import_module
from pathlib import Path

from pyro_vae import __version__

ROOT = Path(__file__).resolve().parents[2]


def test_the_console_script_names_a_callable():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attribute = scripts["pyro-vae"].partition(":")
    target = getattr(import_module(module), attribute)
    assert callable(target) and not isinstance(target, type(sys))  # a function, not a module


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "pyro_vae", "--version"], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == f"pyro-vae {__version__}"
