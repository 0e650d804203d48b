"""Saved, parameterized queries (``sql/queries/*.sql``) and the helpers of ``clickpulse query``.

A saved query is a file of ClickHouse SQL whose inputs are ClickHouse query parameters ``{name:Type}``:
values travel beside the SQL (``param_<name>`` on the HTTP interface, bound by the server), never
spliced into its text. Table names are unqualified: the query runs in the configured database
(``Connections.clickhouse_database``). Header lines ``-- param <name> = <value>`` give defaults, so
``clickpulse query funnel`` runs as is and ``--param name=value`` overrides them. Values given as text
are typed by the placeholder: ``Array(String)`` is a comma-separated list, ``Date`` an ISO date,
``today`` or ``today-N`` (UTC), integers are checked, ``now`` for an ``Int64`` is the current Unix time
in milliseconds.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

#: Saved queries live here (``clickpulse query funnel`` runs ``sql/queries/funnel.sql``).
QUERIES_DIR = Path(__file__).resolve().parent.parent / "sql" / "queries"


_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*):([^{}]+)\}")
_DEFAULT_RE = re.compile(r"^--\s*param\s+([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$", re.MULTILINE)
_NAME_RE = re.compile(r"[a-z0-9_]+\Z")
#: a single word given to ``clickpulse query``: a saved query's name, never SQL
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")
_TODAY_RE = re.compile(r"today(?:\s*([+-])\s*(\d{1,5}))?\Z")
_INT_RE = re.compile(r"(U?)Int(8|16|32|64)\Z")


class QueryParamError(ValueError):
    """A parameter of a saved query is unknown, missing or not a value of its type."""


class UnknownQuery(QueryParamError):
    """``clickpulse query`` was given a saved query name or ``.sql`` path that does not exist."""


def param_value(ch_type: str, text: str, *, today: date | None = None, now_ms: int | None = None) -> Any:
    """The Python value of ``text`` for a ``{name:<ch_type>}`` placeholder (see the module docstring).

    Raises :class:`QueryParamError` when ``text`` is not a value of that type; types this function does
    not know are passed on as text for the server to parse.
    """
    t = ch_type.strip()
    if t.startswith("LowCardinality(") and t.endswith(")"):
        t = t[len("LowCardinality(") : -1]
    if t == "String":
        return text
    if t == "Array(String)":
        return [part.strip() for part in text.split(",") if part.strip()]
    if t == "Date":
        day = today if today is not None else datetime.now(UTC).date()
        rel = _TODAY_RE.match(text.strip())
        if rel:
            n = int(rel.group(2) or 0)
            return day + timedelta(days=-n if rel.group(1) == "-" else n)
        try:
            return date.fromisoformat(text.strip())
        except ValueError:
            raise QueryParamError(f"not a date (YYYY-MM-DD, today or today-N): {text!r}") from None
    m = _INT_RE.match(t)
    if m:
        if t == "Int64" and text.strip() == "now":
            return now_ms if now_ms is not None else int(time.time() * 1000)
        try:
            value = int(text.strip())
        except ValueError:
            raise QueryParamError(f"not an integer ({t}): {text!r}") from None
        bits = int(m.group(2))
        lo, hi = (0, 2**bits - 1) if m.group(1) else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        if not lo <= value <= hi:
            raise QueryParamError(f"{value} is out of range for {t}")
        return value
    return text


@dataclass(frozen=True)
class SavedQuery:
    """A parameterized query: its SQL, the type of each ``{name:Type}`` placeholder and the defaults."""

    name: str
    sql: str
    types: Mapping[str, str]
    defaults: Mapping[str, str]

    @classmethod
    def parse(cls, name: str, text: str) -> SavedQuery:
        """Read placeholders and ``-- param`` defaults from ``text``; a placeholder used with two types,
        or a default for a name the SQL does not use, raises :class:`QueryParamError`."""
        types: dict[str, str] = {}
        for m in _PLACEHOLDER_RE.finditer(text):
            pname, ptype = m.group(1), m.group(2).strip()
            if types.setdefault(pname, ptype) != ptype:
                raise QueryParamError(f"{name}: parameter {pname} used as {types[pname]} and as {ptype}")
        defaults = {m.group(1): m.group(2) for m in _DEFAULT_RE.finditer(text)}
        stray = sorted(set(defaults) - set(types))
        if stray:
            raise QueryParamError(f"{name}: default for {', '.join(stray)}, which the query does not use")
        return cls(name, text, types, defaults)

    def bind(
        self, given: Mapping[str, Any], *, today: date | None = None, now_ms: int | None = None
    ) -> dict[str, Any]:
        """The parameters to send: ``given`` (text is typed with :func:`param_value`, other values pass as
        they are) over the defaults. Unknown or missing names raise :class:`QueryParamError`."""
        unknown = sorted(set(given) - set(self.types))
        if unknown:
            known = ", ".join(sorted(self.types)) or "none"
            raise QueryParamError(
                f"{self.name}: unknown parameter {', '.join(unknown)} (parameters: {known})"
            )
        out: dict[str, Any] = {}
        for pname, ptype in self.types.items():
            value = given[pname] if pname in given else self.defaults.get(pname)
            if value is None:
                raise QueryParamError(f"{self.name}: parameter {pname} ({ptype}) needs a value")
            out[pname] = (
                param_value(ptype, value, today=today, now_ms=now_ms) if isinstance(value, str) else value
            )
        return out


def load_query(name: str, directory: Path = QUERIES_DIR) -> SavedQuery:
    """The saved query ``<directory>/<name>.sql``; ``name`` is lower-case letters, digits and ``_``."""
    if not _NAME_RE.match(name):
        raise QueryParamError(f"not a saved query name: {name!r}")
    path = directory / f"{name}.sql"
    if not path.is_file():
        raise QueryParamError(f"no saved query {name!r} in {directory}")
    return SavedQuery.parse(name, path.read_text())


def saved_queries(directory: Path = QUERIES_DIR) -> list[str]:
    """Names of every saved query."""
    return sorted(p.stem for p in directory.glob("*.sql"))


def parse_param_args(items: Sequence[str]) -> dict[str, str]:
    """``--param name=value`` options as a mapping (a repeated name: the last one wins)."""
    out: dict[str, str] = {}
    for item in items:
        pname, sep, value = item.partition("=")
        if not sep or not pname.strip():
            raise QueryParamError(f"--param needs name=value, got {item!r}")
        out[pname.strip()] = value
    return out


def resolve_query(arg: str) -> tuple[SavedQuery, bool]:
    """The query ``arg`` names: a saved query's name, a ``.sql`` path, or SQL text; and whether it is a
    saved query (which runs in the configured database).

    A single word (letters, digits, ``_``, ``-``) is a saved query's name, and a single token ending in
    ``.sql`` a file: :class:`UnknownQuery` (listing the saved queries) when there is no such query or
    file, rather than sending the word to the server as SQL.
    """
    text = arg.strip()
    if text.endswith(".sql") and not any(c.isspace() for c in text):
        if not Path(text).is_file():
            raise UnknownQuery(f"no such SQL file: {text}")
        return SavedQuery.parse(Path(text).stem, Path(text).read_text()), False
    if _WORD_RE.match(text):
        if not (_NAME_RE.match(text) and (QUERIES_DIR / f"{text}.sql").is_file()):
            raise UnknownQuery(
                f"unknown saved query {text!r}; saved queries: {', '.join(saved_queries()) or '(none)'}"
            )
        return load_query(text), True
    return SavedQuery.parse("query", arg), False


def resolve_sql(arg: str) -> str:
    """SQL text as given, or the content of a ``.sql`` path or of a saved query's name."""
    return resolve_query(arg)[0].sql


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
