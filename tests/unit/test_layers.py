"""``udfs/`` is pure logic: it never imports the frameworks and clients the adapters wrap."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

UDFS = Path(__file__).resolve().parents[2] / "udfs"
FORBIDDEN = {"pyflink", "kafka", "httpx", "redis", "connectors", "jobs", "devstack"}


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_udfs_imports_no_framework_client_or_adapter() -> None:
    files = sorted(UDFS.rglob("*.py"))
    assert UDFS / "rules" / "evaluate.py" in files
    offenders = {str(f.relative_to(UDFS)): sorted(imported_roots(f) & FORBIDDEN) for f in files}
    assert {f: bad for f, bad in offenders.items() if bad} == {}


REPO = UDFS.parent


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def test_no_job_imports_another_job() -> None:
    """Each job builds its part of the graph alone; only ``jobs/pipeline.py`` composes the parts."""
    offenders: dict[str, list[str]] = {}
    for path in _modules("jobs"):
        if path.name == "pipeline.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] if node.module != "jobs" else [f"jobs.{a.name}" for a in node.names]
            for name in names:
                if name.startswith("jobs.") and name != f"jobs.{path.stem}":
                    offenders.setdefault(path.name, []).append(name)
    assert offenders == {}


def test_the_product_never_imports_the_local_stack() -> None:
    """``connectors/`` and ``udfs/`` never import ``devstack``; ``jobs/`` only in the CLI's local commands,
    inside the functions that run them (the production image has no ``devstack``)."""
    offenders = []
    for package in ("connectors", "udfs", "jobs"):
        for path in _modules(package):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            top_level = {id(n) for n in tree.body}
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "devstack":
                    local_command = path == REPO / "jobs" / "cli.py" and id(node) not in top_level
                    if not local_command:
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, normalized text)`` of the lines that carry code (no blanks, comments, imports)."""
    out = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = " ".join(raw.split())
        if not text or text.startswith("#") or text.startswith(("import ", "from ")) or len(text) < 4:
            continue
        out.append((number, text))
    return out


def test_no_block_of_six_lines_is_repeated_between_files_of_jobs_and_connectors() -> None:
    window = 6
    seen: dict[tuple[str, ...], str] = {}
    repeats = []
    for path in [*_modules("jobs"), *_modules("connectors")]:
        lines = _code_lines(path)
        here: set[tuple[str, ...]] = set()
        for i in range(len(lines) - window + 1):
            block = tuple(text for _, text in lines[i : i + window])
            if block in here:
                continue
            here.add(block)
            where = f"{path.relative_to(REPO)}:{lines[i][0]}"
            other = seen.setdefault(block, where)
            if other != where and other.split(":")[0] != where.split(":")[0]:
                repeats.append(f"{where} repeats {other}")
    assert repeats == []
