"""The README's setup on a Python that already has torch (a GPU node): `make setup` then builds `.venv` with
`--system-site-packages`, and pip installs into it only what the interpreter lacks (numpy, for one, may stay in the
system's site-packages). `make check`'s type check must therefore resolve imports from the interpreter's whole
`sys.path`, not from the venv's own site-packages only."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def pyright_settings() -> str:
    """The repository's `[tool.pyright]` table, verbatim (the tests run on Python 3.10 too, which has no tomllib)."""
    text = (REPO / "pyproject.toml").read_text()
    start = text.index("[tool.pyright]")
    end = text.find("\n[", start + 1)
    return text[start:] if end < 0 else text[start:end]


def check_recipe_pyright_line() -> str:
    lines = (REPO / "Makefile").read_text().splitlines()
    recipe = lines[lines.index("check: setup") + 1 :]
    return next(line for line in recipe if "pyright" in line)


def test_make_check_gives_pyright_the_venv_interpreter():
    assert "--pythonpath $(abspath $(BIN)/python)" in check_recipe_pyright_line()


def test_type_check_sees_packages_outside_the_venv(tmp_path: Path):
    # A package on the interpreter's path but outside its venv, as the system's numpy is in a
    # --system-site-packages venv.
    outside = tmp_path / "system-site-packages" / "only_outside"
    outside.mkdir(parents=True)
    (outside / "__init__.py").write_text("VALUE: int = 1\n")
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "probe.py").write_text("from only_outside import VALUE\n\nprint(VALUE)\n")
    (project / "pyproject.toml").write_text(pyright_settings() + "\n")
    venv.create(project / ".venv", with_pip=False)
    interpreter = tmp_path / "python"
    interpreter.write_text(
        f'#!/bin/sh\nPYTHONPATH="{outside.parent}" exec "{project / ".venv" / "bin" / "python"}" "$@"\n'
    )
    interpreter.chmod(0o755)

    pyright = Path(sys.executable).parent / "pyright"
    env = {name: value for name, value in os.environ.items() if name != "VIRTUAL_ENV"}
    result = subprocess.run(
        [str(pyright), "--pythonpath", str(interpreter)], cwd=project, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
