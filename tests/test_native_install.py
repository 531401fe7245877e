"""The native parser is installed by pip, as the local package ./native, by every route.

`pip install -r requirements.txt` (the exercise's route, and what make, CI and the
Dockerfile run) compiles native/login_columns.c into `_login_columns`. Without a
C compiler the install must still succeed, without the module: the processor then
parses in pure Python. tests/test_parsing.py checks that the module is there.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from ingest.parsing import NATIVE_PARSER_AVAILABLE

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "native"
SOURCE = NATIVE / "login_columns.c"


def _requirement_lines(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [kept for line in lines if (kept := line.split("#")[0].strip())]


def test_requirements_name_the_native_package_with_a_pinned_build_backend():
    assert "./native" in _requirement_lines("requirements.txt")  # pip reads it from the current directory
    assert "-r requirements.txt" in _requirement_lines("requirements-dev.txt")
    project = tomllib.loads((NATIVE / "pyproject.toml").read_text())
    [backend] = project["build-system"]["requires"]
    assert backend.startswith("setuptools==") and project["build-system"]["build-backend"] == "setuptools.build_meta"
    assert not (ROOT / "setup.py").exists()  # one way to build it: pip, from native/


def test_no_in_place_build_shadows_the_installed_module():
    # Older trees built _login_columns*.so into the repository root, first on sys.path.
    stray = sorted(path.name for path in ROOT.glob("_login_columns*"))
    assert not stray, f"remove {stray} (make clean does): the installed module is the one to use"


@pytest.mark.skipif(not NATIVE_PARSER_AVAILABLE, reason="not installed (tests/test_parsing.py fails for that)")
def test_the_imported_module_is_the_installed_one_built_from_the_current_source():
    import _login_columns

    loaded = Path(_login_columns.__file__).resolve()
    distribution = importlib.metadata.distribution("login-columns")
    installed = {Path(distribution.locate_file(file)).resolve() for file in distribution.files or ()}
    assert loaded in installed, f"{loaded} is not the file pip installed ({sorted(map(str, installed))})"
    assert loaded.stat().st_mtime >= SOURCE.stat().st_mtime, (
        "the installed module is older than native/login_columns.c: reinstall it"
        " (make does; or pip install -r requirements.txt from the repository root)"
    )


@pytest.mark.slow
def test_without_a_compiler_the_package_still_builds_without_the_module(tmp_path):
    # A copy: pip builds a local directory in place, and an up-to-date native/build/ would
    # be reused instead of compiling.
    project = tmp_path / "native"
    project.mkdir()
    for name in ("pyproject.toml", "setup.py", "login_columns.c"):
        shutil.copy2(NATIVE / name, project / name)
    no_compiler = shutil.which("false")
    assert no_compiler
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-cache-dir", "--wheel-dir", tmp_path, project],
        env={**os.environ, "CC": no_compiler},
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert 'building extension "_login_columns" failed' in output, output  # it did try, and went on
    [wheel] = tmp_path.glob("login_columns-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [name for name in names if name.startswith("_login_columns")], names
    assert any(name.endswith(".dist-info/METADATA") for name in names)
