"""pyproject.toml and the requirements files pin the same packages (Spaces reads requirements.txt)."""

from __future__ import annotations

import tomllib

from tests.helpers import ROOT


def pins(path) -> set[str]:
    """The requirement lines of a requirements file: no comments, blanks or -r includes."""
    lines = (line.split("#", 1)[0].strip() for line in (ROOT / path).read_text().splitlines())
    return {line for line in lines if line and not line.startswith("-")}


def test_requirements_files_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert pins("requirements.txt") == set(project["dependencies"])
    assert pins("requirements-dev.txt") == set(project["optional-dependencies"]["dev"])
    assert "-r requirements.txt" in (ROOT / "requirements-dev.txt").read_text()


def test_console_script_is_the_cli():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"compact": "compact.cli:main"}
