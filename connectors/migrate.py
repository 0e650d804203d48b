"""ClickHouse migrations: numbered, forward-only SQL files under ``sql/``, applied once each, in order.

A migration is ``sql/NNNN_name.sql``: one or more statements separated by ``;``, every object created
``IF NOT EXISTS``, the database written as ``{db}`` (substituted with the target database, a validated
identifier, so tests can migrate a database of their own). Files are never edited once landed; a change is
a new file (``ALTER TABLE ... MODIFY QUERY`` for views while data flows).

Applied migrations are recorded in ``<db>.schema_migrations`` (version, name, SHA-256 of the file,
applied_at). :func:`migrate` applies what is pending, refuses to run when an applied file changed or
disappeared, and is a no-op the second time. Running it twice at once, or while the loader inserts, is
safe: every statement is idempotent and nothing is dropped; a version applied by two runners is recorded
twice and collapses (ReplacingMergeTree).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from connectors.clickhouse import client_from_url

log = logging.getLogger(__name__)

#: Where the numbered migration files live.
SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
#: The placeholder every migration uses for the database name.
DB_PLACEHOLDER = "{db}"

_FILE_RE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql\Z")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}\Z")
# Pieces of SQL text a ';' inside of which does not end a statement: quoted strings and identifiers,
# comments. Anything else is matched one character at a time.
_SQL_TOKEN_RE = re.compile(
    r"""'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*"|`(?:[^`\\]|\\.|``)*`|--[^\n]*|/\*.*?\*/|;|[^'"`;/-]+|.""",
    re.DOTALL,
)


class MigrationError(RuntimeError):
    """A migration cannot be applied safely (edited after landing, missing, bad name, bad SQL)."""


@dataclass(frozen=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    path: Path
    text: str

    @property
    def checksum(self) -> str:
        """SHA-256 (hex) of the file's text before ``{db}`` substitution."""
        return hashlib.sha256(self.text.encode()).hexdigest()

    def statements(self, database: str) -> list[str]:
        """The file's statements for ``database`` (``{db}`` substituted, comments kept)."""
        db = validate_identifier(database)
        return [s.replace(DB_PLACEHOLDER, db) for s in split_statements(self.text)]


def validate_identifier(name: str) -> str:
    """Return ``name`` if it is a plain ClickHouse identifier (letters, digits, ``_``), else raise."""
    if not _IDENT_RE.match(name):
        raise ValueError(f"not a plain identifier (letters, digits, _; max 63): {name!r}")
    return name


def split_statements(text: str) -> list[str]:
    """Split SQL text on top-level ``;`` (not inside strings, quoted identifiers or comments).

    Statements that are only comments and whitespace are dropped.
    """
    out: list[str] = []
    current: list[str] = []
    for m in _SQL_TOKEN_RE.finditer(text):
        tok = m.group()
        if tok == ";":
            out.append("".join(current))
            current = []
        else:
            current.append(tok)
    out.append("".join(current))
    return [s.strip() for s in out if _has_code(s)]


def _has_code(sql: str) -> bool:
    for m in _SQL_TOKEN_RE.finditer(sql):
        tok = m.group()
        if not (tok.isspace() or tok.startswith("--") or tok.startswith("/*")):
            return True
    return False


def discover(sql_dir: Path = SQL_DIR) -> list[Migration]:
    """The migration files in ``sql_dir``, ordered by version; raises on malformed or duplicate versions."""
    found: dict[int, Migration] = {}
    for path in sorted(sql_dir.glob("*.sql")):
        m = _FILE_RE.match(path.name)
        if not m:
            raise MigrationError(f"{path.name}: migration files are named NNNN_snake_case.sql")
        version = int(m.group(1))
        if version in found:
            raise MigrationError(f"{path.name}: version {version} also used by {found[version].path.name}")
        found[version] = Migration(version, path.stem, path, path.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


def _bootstrap(client: Client, db: str) -> None:
    client.command(f"CREATE DATABASE IF NOT EXISTS {db}")
    # ReplacingMergeTree(applied_at): concurrent runners may both record a version; one row survives.
    client.command(
        f"""CREATE TABLE IF NOT EXISTS {db}.schema_migrations
(
    version    UInt32,
    name       String,
    checksum   String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(applied_at)
ORDER BY version"""
    )


def applied(client: Client, database: str = "clickpulse") -> dict[int, tuple[str, str]]:
    """Versions recorded in ``<database>.schema_migrations``: version -> (name, checksum)."""
    db = validate_identifier(database)
    rows = client.query(
        f"SELECT version, argMin(name, applied_at), argMin(checksum, applied_at) "
        f"FROM {db}.schema_migrations GROUP BY version ORDER BY version"
    ).result_rows
    return {int(v): (str(n), str(c)) for v, n, c in rows}


def _check_history(migrations: list[Migration], done: dict[int, tuple[str, str]]) -> None:
    by_version = {m.version: m for m in migrations}
    for version, (name, checksum) in done.items():
        mig = by_version.get(version)
        if mig is None:
            raise MigrationError(
                f"migration {version:04d} ({name}) is applied but its file is missing: "
                "migrations are forward-only, restore the file"
            )
        if mig.checksum != checksum:
            raise MigrationError(
                f"{mig.path.name} changed after it was applied (checksum {checksum[:12]}… -> "
                f"{mig.checksum[:12]}…): never edit a landed migration, add a new one"
            )


def migrate(
    client_or_url: Client | str,
    database: str = "clickpulse",
    *,
    sql_dir: Path = SQL_DIR,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[str]:
    """Apply every pending migration of ``sql_dir`` to ``database``, in order; return the names applied.

    ``client_or_url`` is a clickhouse-connect client or a ``CLICKHOUSE_URL``. Creates the database and
    ``schema_migrations`` if needed. Raises :class:`MigrationError` when an applied migration's file
    changed or is missing (nothing is applied then), and when a statement fails (naming the file, the
    statement and the server's reason; the versions before it stay recorded; rerunning resumes at the
    failed file, whose statements are idempotent). ``progress(file name, done, total)`` is called before
    each pending file and once at the end (``("", total, total)``).
    """
    db = validate_identifier(database)
    client = client_from_url(client_or_url) if isinstance(client_or_url, str) else client_or_url
    try:
        migrations = discover(sql_dir)
        _bootstrap(client, db)
        done = applied(client, db)
        _check_history(migrations, done)
        names: list[str] = []
        todo = [mig for mig in migrations if mig.version not in done]
        for i, mig in enumerate(todo):
            if progress is not None:
                progress(mig.path.name, i, len(todo))
            statements = mig.statements(db)
            if not statements:
                raise MigrationError(f"{mig.path.name} has no statements")
            log.info("applying %s to %s (%d statements)", mig.path.name, db, len(statements))
            for n, sql in enumerate(statements, 1):
                try:
                    client.command(sql)
                except ClickHouseError as exc:
                    why = " ".join(str(exc).split())
                    raise MigrationError(
                        f"{mig.path.name}: statement {n} of {len(statements)} failed: {why}"
                    ) from exc
            client.insert(
                "schema_migrations",
                [[mig.version, mig.name, mig.checksum]],
                database=db,
                column_names=["version", "name", "checksum"],
            )
            names.append(mig.name)
        if progress is not None and todo:
            progress("", len(todo), len(todo))
        if not names:
            log.info("%s is up to date (%d migrations applied)", db, len(done))
        return names
    finally:
        if isinstance(client_or_url, str):
            client.close()


def pending(
    client_or_url: Client | str, database: str = "clickpulse", *, sql_dir: Path = SQL_DIR
) -> list[str]:
    """Names of the migrations :func:`migrate` would apply (checks the history the same way)."""
    db = validate_identifier(database)
    client = client_from_url(client_or_url) if isinstance(client_or_url, str) else client_or_url
    try:
        migrations = discover(sql_dir)
        exists = client.command(f"EXISTS TABLE {db}.schema_migrations")
        done = applied(client, db) if str(exists).strip() == "1" else {}
        _check_history(migrations, done)
        return [m.name for m in migrations if m.version not in done]
    finally:
        if isinstance(client_or_url, str):
            client.close()


def iter_create_statements(client: Client, database: str) -> Iterator[tuple[str, str]]:
    """``(name, SHOW CREATE)`` of every table, view and materialized view in ``database``, by name."""
    db = validate_identifier(database)
    names = client.query(
        "SELECT name FROM system.tables WHERE database = {db:String} ORDER BY name", parameters={"db": db}
    ).result_rows
    for (name,) in names:
        yield str(name), str(client.query(f"SHOW CREATE TABLE {db}.`{name}`").result_rows[0][0])
