"""The product ships without the local stack: packaging metadata, the production image, the CLI's answer."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from jobs import cli

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
#: What only the local stack needs.
LOCAL_ONLY = ("chdb", "zstandard")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].strip().lower()


def test_local_stack_dependencies_are_only_in_the_local_extra() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {_name(r) for r in project["dependencies"]}
    assert not base & set(LOCAL_ONLY)
    assert {_name(r) for r in project["optional-dependencies"]["local"]} >= set(LOCAL_ONLY)
    # the installed distribution's metadata says the same
    for requirement in metadata.requires("clickpulse") or []:
        if _name(requirement) in LOCAL_ONLY:
            assert 'extra == "local"' in requirement, requirement


def test_make_installs_the_local_extra_for_demo_and_test() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"pip install .*-e '\.\[[^\]]*local[^\]]*\]'", makefile)


def test_the_production_image_has_neither_the_local_stack_nor_its_dependencies() -> None:
    dockerfile = (REPO / "k8s" / "Dockerfile").read_text()
    copied = set()
    for line in dockerfile.splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            copied.update(words[1:-1])
    assert copied, "no COPY of the project found"
    assert not any(c.split("/")[0] == "devstack" for c in copied), copied
    assert copied <= {
        "pyproject.toml",
        "README.md",
        "jobs",
        "udfs",
        "connectors",
        "sql",
        "connectors/maven/pom.xml",
        "connectors/jvm",  # the JVM operators, built in the Maven stage
    }
    # the dependencies are installed from pyproject.toml without extras
    installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert installs and not any(re.search(r"\[.*local|--extra|--all-extras", line) for line in installs)


def test_local_commands_say_in_one_line_that_the_local_stack_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.local_stack_installed()  # here (make test installs the extra) it is there
    monkeypatch.setattr(cli, "local_stack_installed", lambda: False)
    for command in (["stack", "status"], ["simulate", "--events", "1"], ["demo"]):
        assert cli.main(command) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "local stack" in err and "pip install" in err
