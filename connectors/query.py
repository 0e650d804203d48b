"""Helpers of ``clickpulse query``: find saved queries and render results as table, CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

#: Saved queries live here (``clickpulse query funnel`` runs ``sql/queries/funnel.sql``).
QUERIES_DIR = Path(__file__).resolve().parent.parent / "sql" / "queries"


_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")


class UnknownQuery(ValueError):
    """``clickpulse query`` was given a saved query name or ``.sql`` path that does not exist."""


def saved_queries() -> list[str]:
    """Names of the saved queries (``sql/queries/<name>.sql``), sorted."""
    return sorted(p.stem for p in QUERIES_DIR.glob("*.sql"))


def resolve_sql(arg: str) -> str:
    """SQL text as given, or the content of a ``.sql`` path or of a saved query's name.

    A single word (letters, digits, ``_``, ``-``) is a saved query's name, and a single token ending in
    ``.sql`` a file: :class:`UnknownQuery` (listing the saved queries) when there is no such query or
    file, rather than sending the word to the server as SQL.
    """
    text = arg.strip()
    if text.endswith(".sql") and not any(c.isspace() for c in text):
        if not Path(text).is_file():
            raise UnknownQuery(f"no such SQL file: {text}")
        return Path(text).read_text()
    if _NAME_RE.match(text):
        saved = QUERIES_DIR / f"{text}.sql"
        if not saved.is_file():
            raise UnknownQuery(
                f"unknown saved query {text!r}; saved queries: {', '.join(saved_queries()) or '(none)'}"
            )
        return saved.read_text()
    return arg


def _plain(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def render_result(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str = "table") -> str:
    """Render rows as a readable table (``table``), ``csv`` or JSON lines (``json``)."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_plain(v) for v in row])
        return buf.getvalue()
    if fmt == "json":
        return "".join(
            json.dumps(dict(zip(columns, (_plain(v) for v in row), strict=True)), ensure_ascii=False) + "\n"
            for row in rows
        )
    table = Table(*columns, show_lines=False)
    for row in rows:
        table.add_row(*(str(_plain(v)) for v in row))
    buf = io.StringIO()
    Console(file=buf, width=200, force_terminal=False).print(table)
    buf.write(f"{len(rows)} row{'s' if len(rows) != 1 else ''}\n")
    return buf.getvalue()


def result_document(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """A query result as one JSON-ready document: ``{columns, rows: [{column: value}], row_count}``."""
    return {
        "columns": list(columns),
        "rows": [dict(zip(columns, (_plain(v) for v in row), strict=True)) for row in rows],
        "row_count": len(rows),
    }
