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
