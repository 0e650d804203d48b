"""Embedded ClickHouse endpoint: chDB (the in-process ClickHouse engine) on ClickHouse's HTTP interface.

A chDB data directory can be opened by one process only, so this module runs a small HTTP server that is
the single owner of one data directory and speaks enough of ClickHouse's HTTP protocol for
``clickhouse-connect`` (default settings, compression on), ``curl`` and ``urllib`` to use it like a real
server. Every other part of the project connects through :func:`connectors.clickhouse.client_from_url`
and cannot tell the difference, so pointing ``CLICKHOUSE_URL`` at a real server needs no code change.

Run it as::

    python -m devstack.chserver --host 127.0.0.1 --port 8123 --data-dir DIR \\
        [--log-file FILE] [--user U --password-env VAR] [--readonly-user U --readonly-password-env VAR] \\
        [--port-file FILE] [limits, see --help]

What it implements (see ``docs/adr/001-embedded-clickhouse.md`` for what it does not):

* ``GET /ping``, ``GET /`` -> ``Ok.``; queries via ``GET /?query=...`` (read-only, like ClickHouse) or
  ``POST`` with the query in the ``query`` parameter and/or the body (ClickHouse joins them with a
  newline). ``INSERT ... FORMAT X`` followed by data runs as ``INSERT ... SELECT * FROM file(...)`` over
  the body (chDB's streaming insert hides errors raised after parsing, see ``_insert_from_file``);
  ``INSERT ... SELECT ... FROM input('<structure>') FORMAT X`` followed by data (ClickHouse's way to
  transform data while inserting it) reads the body through ``file(..., X, '<structure>')`` the same way.
* Settings as URL parameters, ``database`` (or ``X-ClickHouse-Database``), ``default_format`` (or
  ``X-ClickHouse-Format``), ``param_*`` query parameters, ``query_id``, ``session_id`` /
  ``session_timeout`` / ``session_check`` / ``close_session``. URL settings apply to that request only;
  each ClickHouse session gets its own chDB connection, so ``SET``, ``USE`` and temporary tables persist
  within the session exactly as on a server.
* Request bodies compressed with ``Content-Encoding`` lz4 (frame), zstd, gzip, deflate, br (if installed),
  xz, bz2; responses compressed when the client sends ``Accept-Encoding`` (lz4 first, then ClickHouse's
  order zstd, br, gzip, deflate) unless ``enable_http_compression=0``.
* Errors as ClickHouse sends them: status from ClickHouse's exception-code mapping,
  ``X-ClickHouse-Exception-Code`` header, ``Code: N. DB::Exception: ... (NAME) (version V)`` body.
* Optional authentication (HTTP basic, ``X-ClickHouse-User``/``X-ClickHouse-Key``, ``user``/``password``
  parameters); ``AUTHENTICATION_FAILED`` (516) -> 403, no credentials -> 401 ``REQUIRED_PASSWORD``.
* An optional read-only user (``--readonly-user U --readonly-password-env VAR``): every request that
  authenticates as that user runs as ClickHouse's ``readonly=1`` on GET and POST alike (reads only, no
  ``SET``, no file or network table functions), whatever settings it sends; a wrong password is 516.
* Limits of a server (:class:`ChServerSettings`): request body and decompressed size caps (413), no
  ambiguous framing (400), server-side defaults and maxima of ``max_execution_time`` and
  ``max_result_bytes``, at most ``max_connections`` connections, keep-alive and receive timeouts
  (slow clients are cut off), read-only GET without file or network access, ``Host``/``Origin`` allowlist.
* Response headers ``X-ClickHouse-Summary``, ``X-ClickHouse-Query-Id``, ``X-ClickHouse-Format`` (only for
  statements that produce a result set, as clickhouse-connect's ``command`` relies on),
  ``X-ClickHouse-Timezone``, ``X-ClickHouse-Server-Display-Name``.
"""

from __future__ import annotations

import argparse
import base64
import bz2
import contextlib
import email.parser
import email.policy
import fcntl
import hmac
import io
import json
import logging
import lzma
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, urlsplit

from pydantic import Field, field_validator, model_validator

from connectors.settings import Settings, process_environment
from udfs.rules import Allowlist

logger = logging.getLogger("devstack.chserver")

DEFAULT_FORMAT = "TabSeparated"
DEFAULT_SESSION_TIMEOUT_S = 60
MAX_SESSION_TIMEOUT_S = 3600
_MIB = 1 << 20
_DECOMPRESS_CHUNK = 1 << 20  # output of one step of a streaming decompressor


class ChServerSettings(Settings):
    """Limits of the embedded ClickHouse endpoint (``python -m devstack.chserver``), after the server
    settings of ClickHouse that do the same job (``max_connections``, ``keep_alive_timeout``,
    ``http_receive_timeout``, ``max_execution_time`` and ``max_result_bytes`` with a constraint). Flags
    of ``python -m devstack.chserver`` win over the variables; ``clickpulse stack up`` passes its
    environment on."""

    max_body_bytes: int = Field(128 * _MIB, alias="CLICKPULSE_CHSERVER_MAX_BODY_BYTES", gt=0)
    """``CLICKPULSE_CHSERVER_MAX_BODY_BYTES`` / ``--max-body-bytes``: largest request body as sent; a larger
    ``Content-Length`` gets 413 before the body is read (default 134217728)."""
    max_decompressed_bytes: int = Field(128 * _MIB, alias="CLICKPULSE_CHSERVER_MAX_DECOMPRESSED_BYTES", gt=0)
    """``CLICKPULSE_CHSERVER_MAX_DECOMPRESSED_BYTES`` / ``--max-decompressed-bytes``: largest request body
    after ``Content-Encoding`` is undone, decompressed as a stream and refused with 413 past it
    (default 134217728)."""
    max_execution_time_ms: int = Field(60_000, alias="CLICKPULSE_CHSERVER_MAX_EXECUTION_TIME_MS", gt=0)
    """``CLICKPULSE_CHSERVER_MAX_EXECUTION_TIME_MS`` / ``--max-execution-time-ms``: ClickHouse's
    ``max_execution_time`` of every connection (default 60000)."""
    max_execution_time_limit_ms: int = Field(
        600_000, alias="CLICKPULSE_CHSERVER_MAX_EXECUTION_TIME_LIMIT_MS", gt=0
    )
    """``CLICKPULSE_CHSERVER_MAX_EXECUTION_TIME_LIMIT_MS`` / ``--max-execution-time-limit-ms``: the most a
    request, ``SET`` or ``SETTINGS`` clause may raise ``max_execution_time`` to; 0 (unlimited) is refused
    (default 600000)."""
    max_result_bytes: int = Field(256 * _MIB, alias="CLICKPULSE_CHSERVER_MAX_RESULT_BYTES", gt=0)
    """``CLICKPULSE_CHSERVER_MAX_RESULT_BYTES`` / ``--max-result-bytes``: ClickHouse's ``max_result_bytes``
    of every connection, uncompressed result blocks (default 268435456)."""
    max_result_bytes_limit: int = Field(1024 * _MIB, alias="CLICKPULSE_CHSERVER_MAX_RESULT_BYTES_LIMIT", gt=0)
    """``CLICKPULSE_CHSERVER_MAX_RESULT_BYTES_LIMIT`` / ``--max-result-bytes-limit``: the most a request may
    raise ``max_result_bytes`` to; 0 (unlimited) is refused (default 1073741824)."""
    max_connections: int = Field(1024, alias="CLICKPULSE_CHSERVER_MAX_CONNECTIONS", gt=0)
    """``CLICKPULSE_CHSERVER_MAX_CONNECTIONS`` / ``--max-connections``: open client connections, one
    worker thread each; more are answered 503 and closed (default 1024)."""
    keep_alive_timeout_ms: int = Field(30_000, alias="CLICKPULSE_CHSERVER_KEEP_ALIVE_TIMEOUT_MS", gt=0)
    """``CLICKPULSE_CHSERVER_KEEP_ALIVE_TIMEOUT_MS`` / ``--keep-alive-timeout-ms``: how long a connection
    may wait idle for its next request before it is closed (default 30000)."""
    receive_timeout_ms: int = Field(30_000, alias="CLICKPULSE_CHSERVER_RECEIVE_TIMEOUT_MS", gt=0)
    """``CLICKPULSE_CHSERVER_RECEIVE_TIMEOUT_MS`` / ``--receive-timeout-ms``: a request's line and headers
    must arrive within this of its first byte (slow clients are cut off), and each read of the body or
    write of the response may wait this long (default 30000)."""
    allowed_hosts: str = Field(
        "localhost,*.localhost,127.0.0.0/8,::1", alias="CLICKPULSE_CHSERVER_ALLOWED_HOSTS"
    )
    """``CLICKPULSE_CHSERVER_ALLOWED_HOSTS`` / ``--allowed-hosts``: comma-separated names, ``*.suffix``
    patterns and CIDRs accepted in the ``Host`` header and in an ``Origin`` header, so that a web page
    cannot drive the endpoint through a browser (default ``localhost,*.localhost,127.0.0.0/8,::1``)."""

    @field_validator("allowed_hosts")
    @classmethod
    def _parses(cls, value: str) -> str:
        Allowlist.parse(value.split(","))  # raises ValueError naming the bad entry
        return value

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> ChServerSettings:
        if self.max_execution_time_ms > self.max_execution_time_limit_ms:
            raise ValueError("max_execution_time_ms is larger than max_execution_time_limit_ms")
        if self.max_result_bytes > self.max_result_bytes_limit:
            raise ValueError("max_result_bytes is larger than max_result_bytes_limit")
        return self


@dataclass(frozen=True)
class QueryLimits:
    """The server-side defaults and maxima of the settings that bound a query, as ClickHouse settings."""

    max_execution_time_s: float = 60.0
    max_execution_time_limit_s: float = 600.0
    max_result_bytes: int = 256 * _MIB
    max_result_bytes_limit: int = 1024 * _MIB

    @classmethod
    def from_settings(cls, s: ChServerSettings) -> QueryLimits:
        """The limits of ``s``."""
        return cls(
            s.max_execution_time_ms / 1000,
            s.max_execution_time_limit_ms / 1000,
            s.max_result_bytes,
            s.max_result_bytes_limit,
        )

    @property
    def defaults(self) -> dict[str, str]:
        """``SET`` on every new connection."""
        return {
            "max_execution_time": f"{self.max_execution_time_s:g}",
            "max_result_bytes": str(self.max_result_bytes),
        }

    @property
    def maxima(self) -> dict[str, float]:
        """The most a request may set each bounded setting to."""
        return {
            "max_execution_time": self.max_execution_time_limit_s,
            "max_result_bytes": float(self.max_result_bytes_limit),
        }

    def check(self, name: str, value: str) -> None:
        """Refuse (``SETTING_CONSTRAINT_VIOLATION``) a value of a bounded setting above its maximum or 0."""
        limit = self.maxima.get(name.lower())
        if limit is None:
            return
        text = value.strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1].strip()
        try:
            number = float(text)
        except ValueError:
            raise ClickHouseError(
                SETTING_CONSTRAINT_VIOLATION,
                f"Setting {name} must be a number not greater than {limit:g} on this server, got {value}",
            ) from None
        if number == 0:
            raise ClickHouseError(
                SETTING_CONSTRAINT_VIOLATION,
                f"Setting {name} shouldn't be 0 (unlimited) on this server: its maximum is {limit:g}",
            )
        if number < 0 or number > limit:
            raise ClickHouseError(
                SETTING_CONSTRAINT_VIOLATION, f"Setting {name} shouldn't be greater than {limit:g}"
            )


# ClickHouse error codes this module raises itself (numbers as in ClickHouse's ErrorCodes.cpp).
BAD_ARGUMENTS = 36
NOT_IMPLEMENTED = 48
SYNTAX_ERROR = 62
UNKNOWN_COMPRESSION_METHOD = 89
READONLY = 164
REQUIRED_PASSWORD = 194
TOO_MANY_SIMULTANEOUS_QUERIES = 202
SOCKET_TIMEOUT = 209
QUERY_IS_TOO_LARGE = 229
ABORTED = 236
CANNOT_DECOMPRESS = 271
SESSION_NOT_FOUND = 372
SESSION_IS_LOCKED = 373
INVALID_SESSION_TIMEOUT = 374
SETTING_CONSTRAINT_VIOLATION = 452
ACCESS_DENIED = 497
AUTHENTICATION_FAILED = 516
STD_EXCEPTION = 1001

_ERROR_NAMES = {
    BAD_ARGUMENTS: "BAD_ARGUMENTS",
    NOT_IMPLEMENTED: "NOT_IMPLEMENTED",
    SYNTAX_ERROR: "SYNTAX_ERROR",
    UNKNOWN_COMPRESSION_METHOD: "UNKNOWN_COMPRESSION_METHOD",
    READONLY: "READONLY",
    REQUIRED_PASSWORD: "REQUIRED_PASSWORD",
    TOO_MANY_SIMULTANEOUS_QUERIES: "TOO_MANY_SIMULTANEOUS_QUERIES",
    SOCKET_TIMEOUT: "SOCKET_TIMEOUT",
    QUERY_IS_TOO_LARGE: "QUERY_IS_TOO_LARGE",
    ABORTED: "ABORTED",
    CANNOT_DECOMPRESS: "CANNOT_DECOMPRESS",
    SESSION_NOT_FOUND: "SESSION_NOT_FOUND",
    SESSION_IS_LOCKED: "SESSION_IS_LOCKED",
    INVALID_SESSION_TIMEOUT: "INVALID_SESSION_TIMEOUT",
    SETTING_CONSTRAINT_VIOLATION: "SETTING_CONSTRAINT_VIOLATION",
    ACCESS_DENIED: "ACCESS_DENIED",
    AUTHENTICATION_FAILED: "AUTHENTICATION_FAILED",
    STD_EXCEPTION: "STD_EXCEPTION",
}

# ClickHouse's exceptionCodeToHTTPStatus, keyed by error name (chDB messages end with the name).
_HTTP_STATUS_BY_ERROR: dict[str, int] = {
    "REQUIRED_PASSWORD": 401,
    **dict.fromkeys(
        ("UNKNOWN_USER", "WRONG_PASSWORD", "AUTHENTICATION_FAILED", "SET_NON_GRANTED_ROLE", "ACCESS_DENIED"),
        403,
    ),
    **dict.fromkeys(
        (
            "BAD_ARGUMENTS CANNOT_COMPILE_REGEXP CANNOT_PARSE_TEXT CANNOT_PARSE_ESCAPE_SEQUENCE "
            "CANNOT_PARSE_QUOTED_STRING CANNOT_PARSE_DATE CANNOT_PARSE_DATETIME CANNOT_PARSE_NUMBER "
            "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING CANNOT_PARSE_IPV4 CANNOT_PARSE_IPV6 "
            "CANNOT_PARSE_INPUT_ASSERTION_FAILED CANNOT_PARSE_UUID DUPLICATE_COLUMN ILLEGAL_COLUMN "
            "UNKNOWN_ELEMENT_IN_AST UNKNOWN_TYPE_OF_AST_NODE THERE_IS_NO_COLUMN TOO_DEEP_AST TOO_BIG_AST "
            "UNEXPECTED_AST_STRUCTURE SYNTAX_ERROR INCORRECT_DATA TYPE_MISMATCH "
            "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE"
        ).split(),
        400,
    ),
    **dict.fromkeys(
        (
            "UNKNOWN_TABLE UNKNOWN_FUNCTION UNKNOWN_IDENTIFIER UNKNOWN_TYPE UNKNOWN_STORAGE UNKNOWN_DATABASE "
            "UNKNOWN_SETTING UNKNOWN_DIRECTION_OF_SORTING UNKNOWN_AGGREGATE_FUNCTION UNKNOWN_FORMAT "
            "UNKNOWN_DATABASE_ENGINE UNKNOWN_TYPE_OF_QUERY UNKNOWN_ROLE"
        ).split(),
        404,
    ),
    "QUERY_IS_TOO_LARGE": 413,
    "NOT_IMPLEMENTED": 501,
    "SOCKET_TIMEOUT": 503,
    "CANNOT_OPEN_FILE": 503,
    "CANNOT_SCHEDULE_TASK": 503,
    "HTTP_LENGTH_REQUIRED": 411,
    "TIMEOUT_EXCEEDED": 408,
    "UNSUPPORTED_MEDIA_TYPE": 415,
}

# URL parameters that belong to the HTTP interface, not to the query's settings.
_RESERVED_PARAMS = frozenset(
    {
        "query",
        "database",
        "default_format",
        "user",
        "password",
        "quota_key",
        "query_id",
        "stacktrace",
        "buffer_size",
        "wait_end_of_query",
        "session_id",
        "session_timeout",
        "session_check",
        "close_session",
        "client_protocol_version",
        "compress",
        "decompress",
        "role",
    }
)
# Settings that only steer ClickHouse's HTTP layer; this server consumes them and never forwards them.
_TRANSPORT_SETTINGS = frozenset(
    {
        "enable_http_compression",
        "send_progress_in_http_headers",
        "cancel_http_readonly_queries_on_client_close",
        "add_http_cors_header",
        "output_format_enable_streaming",
    }
)
# ClickHouse's readonly=1: reads only, no SET (settings changes that outlive the request).
_READ_ONLY_KINDS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "USE"})
_RESULT_KINDS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "CHECK"})
_SETTING_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_CODE_RE = re.compile(r"Code: (\d+)\.")
_NAME_RE = re.compile(r"\(([A-Z][A-Z0-9_]+)\)(?:\s*\(version [^)]*\))?\s*\Z")
_VERSION_RE = re.compile(r"\(version [^)]*\)\s*\Z")
_CONTENT_TYPES = {
    "tabseparated": "text/tab-separated-values; charset=UTF-8",
    "tsv": "text/tab-separated-values; charset=UTF-8",
    "csv": "text/csv; charset=UTF-8; header=absent",
    "csvwithnames": "text/csv; charset=UTF-8; header=present",
    "json": "application/json; charset=UTF-8",
    "jsoncompact": "application/json; charset=UTF-8",
    "jsoneachrow": "application/x-ndjson; charset=UTF-8",
    "native": "application/octet-stream",
    "rowbinary": "application/octet-stream",
    "arrow": "application/octet-stream",
    "arrowstream": "application/octet-stream",
    "parquet": "application/octet-stream",
}


class ClickHouseError(Exception):
    """An error reported to the client the way ClickHouse reports it (code, name, message)."""

    def __init__(
        self, code: int, message: str, name: str | None = None, *, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.name = name or _ERROR_NAMES.get(code, "")
        self.message = message
        self.status = status

    def text(self, version: str) -> str:
        """The response body ClickHouse would send: ``Code: N. DB::Exception: ... (NAME) (version V)``."""
        msg = self.message
        if not msg.startswith("Code: "):
            msg = f"Code: {self.code}. DB::Exception: {msg}"
            if self.name:
                msg += f" ({self.name})"
        if not _VERSION_RE.search(msg):
            msg += f" (version {version})"
        return msg

    @property
    def http_status(self) -> int:
        """The HTTP status ClickHouse uses for this exception code (or the one the error was raised with)."""
        return self.status or _HTTP_STATUS_BY_ERROR.get(self.name, 500)

    @classmethod
    def from_engine(cls, exc: BaseException) -> ClickHouseError:
        """Convert a chDB exception (``Code: 60. DB::Exception: ...``) into a :class:`ClickHouseError`."""
        raw = str(exc)
        idx = raw.find("Code: ")
        msg = raw[idx:].strip() if idx >= 0 else raw.strip()
        m = _CODE_RE.match(msg)
        if not m:
            return cls(STD_EXCEPTION, msg or type(exc).__name__)
        name_m = _NAME_RE.search(msg)
        return cls(int(m.group(1)), msg, name_m.group(1) if name_m else None)


# ----------------------------------------------------------------------------------------------------
# SQL scanning: just enough lexing to split "INSERT ... FORMAT X <data>", find the output format, the
# statement kind and multi-statements, without ever looking inside string literals or comments.
# ----------------------------------------------------------------------------------------------------
_TOKEN_RE = re.compile(
    rb"""
      (?P<ws>\s+)
    | (?P<comment>--[^\n]*|\#[ !][^\n]*|/\*.*?(?:\*/|\Z))
    | (?P<string>'(?:[^'\\]|\\.|'')*(?:'|\Z))
    | (?P<quoted>"(?:[^"\\]|\\.|"")*(?:"|\Z)|`(?:[^`\\]|\\.|``)*(?:`|\Z))
    | (?P<word>[A-Za-z_][A-Za-z0-9_$]*)
    | (?P<number>[0-9][0-9A-Za-z_.]*)
    | (?P<other>.)
    """,
    re.DOTALL | re.VERBOSE,
)


@dataclass
class Statement:
    """One request's statement, split the way ClickHouse's HTTP handler sees it."""

    kind: str
    """First keyword, upper case (``SELECT``, ``INSERT``, ``CREATE``...); empty for an empty query."""
    sql: str
    """The SQL to run; for an insert with data, the ``INSERT INTO t (cols) [SETTINGS ...]`` head only."""
    insert_format: str | None = None
    """Input format when data follows the statement (``INSERT ... FORMAT X <data>``)."""
    data: bytes = b""
    output_format: str | None = None
    """Explicit ``FORMAT X`` of a non-insert statement (validated against the known output formats)."""
    temporary: bool = False
    """``CREATE TEMPORARY TABLE``: changes connection state."""
    inputs: tuple[tuple[int, int], ...] = ()
    """``INSERT ... SELECT ... FROM input(...) FORMAT X``: byte spans of each ``input(`` in ``sql`` (UTF-8),
    where the data is read from."""


@dataclass
class _Scan:
    kind: str = ""
    second: str = ""
    format_kw: int = -1
    format_name: str | None = None
    data_start: int = -1
    output_format: str | None = None
    multi: bool = False
    select: bool = False
    inputs: list[tuple[int, int]] = field(default_factory=list)


def _scan(text: bytes, input_formats: Mapping[str, str], output_formats: Mapping[str, str]) -> _Scan:
    res = _Scan()
    depth = 0
    pending_format = -1
    prev = b""
    prev_at = -1
    after_semicolon = False
    for m in _TOKEN_RE.finditer(text):
        group = m.lastgroup
        if group in ("ws", "comment"):
            continue
        if after_semicolon:
            res.multi = True
            break
        tok = m.group()
        if pending_format >= 0:
            kw_at, pending_format = pending_format, -1
            if group == "word":
                name = tok.decode()
                if res.kind == "INSERT" and name.lower() in input_formats and (res.inputs or not res.select):
                    res.format_kw, res.format_name = kw_at, input_formats[name.lower()]
                    pos = m.end()
                    while pos < len(text) and text[pos] in b" \t":
                        pos += 1
                    if text.startswith(b"\r\n", pos):
                        pos += 2
                    elif text.startswith(b"\n", pos):
                        pos += 1
                    res.data_start = pos
                    return res
                if res.kind != "INSERT" and name.lower() in output_formats:
                    res.output_format = output_formats[name.lower()]
                    prev = tok
                    continue
        if group == "word":
            up = tok.upper().decode()
            if not res.kind:
                res.kind = up
            elif not res.second:
                res.second = up
            if depth == 0 and up == "FORMAT" and prev != b".":
                pending_format = m.start()
            elif res.kind == "INSERT" and depth == 0 and up == "VALUES":
                return res  # inline data: the whole text is the statement
            elif res.kind == "INSERT" and depth == 0 and up in ("SELECT", "WITH") and not res.select:
                res.select = True  # INSERT ... SELECT: data follows only a FORMAT after input(...)
        elif tok in (b"(", b"["):
            if tok == b"(" and res.select and prev.lower() == b"input" and prev_at >= 0:
                res.inputs.append((prev_at, m.end()))
            depth += 1
        elif tok in (b")", b"]"):
            depth = max(0, depth - 1)
        elif tok == b";" and depth == 0:
            after_semicolon = True
        prev, prev_at = tok, (m.start() if group == "word" else -1)
    return res


def parse_statement(
    query_param: str | None,
    body: bytes,
    input_formats: Mapping[str, str],
    output_formats: Mapping[str, str],
) -> Statement:
    """Build the statement of one HTTP request from the ``query`` parameter and the (decoded) body.

    As in ClickHouse, the query is the ``query`` parameter, a newline, then the body; for ``INSERT ... FORMAT
    X`` the data starts after the format name (skipping blanks and one line break). ``input_formats`` /
    ``output_formats`` map lower-case format names to their canonical spelling.
    """
    if query_param:
        head = query_param.encode()
        sc = _scan(head, input_formats, output_formats)
        if sc.format_name is not None:
            inline = head[sc.data_start :]
            data = body if not inline else (inline + b"\n" + body if body else inline)
            return Statement(
                "INSERT", head[: sc.format_kw].decode(), sc.format_name, data, inputs=tuple(sc.inputs)
            )
        text = head + b"\n" + body if body else head
        if body:
            sc = _scan(text, input_formats, output_formats)
    else:
        text = body
        sc = _scan(text, input_formats, output_formats)
        if sc.format_name is not None:
            return Statement(
                "INSERT",
                text[: sc.format_kw].decode(),
                sc.format_name,
                text[sc.data_start :],
                inputs=tuple(sc.inputs),
            )
    sql = text.decode("utf-8", errors="replace")
    if not sql.strip() or not sc.kind:
        raise ClickHouseError(SYNTAX_ERROR, "Empty query")
    if sc.multi:
        raise ClickHouseError(
            SYNTAX_ERROR, "Syntax error: Multi-statements are not allowed (send one statement per request)"
        )
    return Statement(
        sc.kind,
        sql,
        output_format=sc.output_format,
        temporary=sc.kind == "CREATE" and sc.second == "TEMPORARY",
    )


# Table functions a read-only (GET) request may use: they only read this server's own tables or make up
# data. Every other table function of the engine (file, url, s3, remote, mysql, executable, python, ...)
# reaches the filesystem, the network or other processes, which ClickHouse's readonly mode forbids.
_READONLY_TABLE_FUNCTIONS = frozenset(
    {
        "numbers", "numbers_mt", "zeros", "zeros_mt", "generate_series", "generateseries", "generaterandom",
        "values", "null", "view", "viewifpermitted", "viewexplain", "merge", "format", "loop", "fuzzjson",
        "fuzzquery", "mergetreeindex", "mergetreeprojection", "primes",
    }
)  # fmt: skip


def _tokens(sql: bytes) -> list[tuple[str, bytes]]:
    """The significant tokens of ``sql`` (no blanks, no comments) as ``(group, text)``."""
    return [
        (m.lastgroup or "", m.group())
        for m in _TOKEN_RE.finditer(sql)
        if m.lastgroup not in ("ws", "comment")
    ]


def _name(group: str, tok: bytes) -> str:
    """An identifier token as a lower-case name (quoted identifiers unquoted), else ``""``."""
    if group == "word":
        return tok.decode().lower()
    if group == "quoted" and len(tok) >= 2:
        return tok[1:-1].decode(errors="replace").lower()
    return ""


def readonly_violation(sql: str, forbidden_functions: frozenset[str]) -> str | None:
    """Why ``sql`` is not allowed in readonly mode (GET), or ``None``: ``INTO OUTFILE`` writes a file, and
    the functions in ``forbidden_functions`` (lower case) reach the filesystem or the network."""
    toks = _tokens(sql.encode())
    for i, (group, tok) in enumerate(toks):
        name = _name(group, tok)
        if not name:
            continue
        nxt = toks[i + 1][1] if i + 1 < len(toks) else b""
        if name == "into" and nxt.upper() == b"OUTFILE":
            return "SELECT ... INTO OUTFILE writes a file on the server"
        if nxt == b"(" and name in forbidden_functions and (i == 0 or toks[i - 1][1] != b"."):
            return f"function {tok.decode(errors='replace')}() reaches the server's filesystem or network"
    return None


def setting_assignments(sql: str, names: Collection[str]) -> list[tuple[str, str]]:
    """``(name, value)`` of every ``name = value`` after a ``SET`` or ``SETTINGS`` keyword in ``sql`` for the
    settings ``names`` (lower case); ``value`` is the raw token (a number, a string literal or a word)."""
    toks = _tokens(sql.encode())
    found: list[tuple[str, str]] = []
    in_settings = False
    for i, (group, tok) in enumerate(toks):
        name = _name(group, tok)
        if name in ("set", "settings"):
            in_settings = True
        elif in_settings and name in names and i + 1 < len(toks) and toks[i + 1][1] == b"=":
            value = toks[i + 2][1] if i + 2 < len(toks) else b""
            found.append((name, value.decode(errors="replace")))
    return found


# ----------------------------------------------------------------------------------------------------
# Compression
# ----------------------------------------------------------------------------------------------------
def _brotli() -> Any | None:
    try:
        import brotli
    except ImportError:
        return None
    return brotli


class _Truncated(ValueError):
    pass


def _stream_pieces(data: bytes, new: Callable[[], Any]) -> Iterator[bytes]:
    """Output of a bz2/xz/lz4-style decompressor (``decompress(data, max_length)``, ``eof``,
    ``unused_data``, ``needs_input``), at most one chunk at a time; concatenated streams are followed."""
    dec, pending = new(), data
    while True:
        out = dec.decompress(pending, _DECOMPRESS_CHUNK)
        pending = b""
        if out:
            yield out
        if dec.eof:
            pending = dec.unused_data or b""  # lz4 says None
            if not pending.strip(b"\0"):
                return
            dec = new()
        elif dec.needs_input and not out:
            raise _Truncated("truncated stream")


def _zlib_pieces(data: bytes, wbits: int, *, multi: bool) -> Iterator[bytes]:
    """Output of zlib/gzip data (``multi``: concatenated gzip members), at most one chunk at a time."""
    dec, pending = zlib.decompressobj(wbits), data
    while True:
        out = dec.decompress(pending, _DECOMPRESS_CHUNK)
        pending = dec.unconsumed_tail
        if out:
            yield out
        if dec.eof:
            pending = dec.unused_data
            if not multi or not pending.strip(b"\0"):
                if pending.strip(b"\0"):
                    raise ValueError("trailing data after the compressed stream")
                return
            dec = zlib.decompressobj(wbits)
        elif not out and not pending:
            raise _Truncated("truncated stream")


def _zstd_pieces(data: bytes) -> Iterator[bytes]:
    import zstandard

    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True) as reader:
        while piece := reader.read(_DECOMPRESS_CHUNK):
            yield piece


def _brotli_pieces(data: bytes, brotli: Any) -> Iterator[bytes]:
    dec = brotli.Decompressor()
    if not hasattr(dec, "can_accept_more_data"):  # brotli < 1.1 cannot bound its output
        raise ClickHouseError(
            UNKNOWN_COMPRESSION_METHOD, "br request bodies need brotli >= 1.1 (bounded decompression)"
        )
    out = dec.process(data, output_buffer_limit=_DECOMPRESS_CHUNK)
    yield out
    while not dec.is_finished():
        out = dec.process(b"", output_buffer_limit=_DECOMPRESS_CHUNK)
        if not out:
            raise _Truncated("truncated stream")
        yield out


def _decoder(enc: str, data: bytes) -> Iterator[bytes] | None:
    if enc == "lz4":
        import lz4.frame

        return _stream_pieces(data, lz4.frame.LZ4FrameDecompressor)
    if enc == "zstd":
        return _zstd_pieces(data)
    if enc in ("gzip", "x-gzip"):
        return _zlib_pieces(data, 31, multi=True)
    if enc == "deflate":
        return _zlib_pieces(data, 15, multi=False)
    if enc == "xz":
        return _stream_pieces(data, lzma.LZMADecompressor)
    if enc in ("bz2", "bzip2"):
        return _stream_pieces(data, bz2.BZ2Decompressor)
    if enc == "br" and (brotli := _brotli()) is not None:
        return _brotli_pieces(data, brotli)
    return None


def decompress_body(data: bytes, encoding: str, max_bytes: int | None = None) -> bytes:
    """Decode a request body sent with ``Content-Encoding`` (several concatenated frames allowed).

    Decompression is streamed and stops with ``QUERY_IS_TOO_LARGE`` (HTTP 413) as soon as the output
    exceeds ``max_bytes``, so a few hundred bytes of bz2 that would inflate to gigabytes cost at most
    ``max_bytes`` plus one chunk of memory.
    """
    enc = encoding.strip().lower()
    if not enc or enc == "identity" or not data:
        if max_bytes is not None and len(data) > max_bytes:
            raise _too_large_decompressed(len(data), max_bytes, enc or "identity")
        return data
    pieces = _decoder(enc, data)
    if pieces is None:
        raise ClickHouseError(UNKNOWN_COMPRESSION_METHOD, f"Unknown HTTP compression method: {encoding}")
    out = io.BytesIO()
    try:
        for piece in pieces:
            out.write(piece)
            if max_bytes is not None and out.tell() > max_bytes:
                raise _too_large_decompressed(out.tell(), max_bytes, enc)
    except ClickHouseError:
        raise
    except Exception as exc:  # any codec error means the client sent something we cannot read
        raise ClickHouseError(CANNOT_DECOMPRESS, f"Cannot decompress request body ({enc}): {exc}") from exc
    return out.getvalue()


def _too_large_decompressed(size: int, limit: int, enc: str) -> ClickHouseError:
    return ClickHouseError(
        QUERY_IS_TOO_LARGE,
        f"Request body ({enc}) decompresses to more than {limit} bytes (at least {size}): "
        f"over max_decompressed_bytes of this server",
    )


def choose_response_encoding(accept_encoding: str) -> str | None:
    """Pick a response encoding from ``Accept-Encoding``.

    ClickHouse prefers zstd, br, lz4, gzip, deflate. This endpoint serves loopback clients, where CPU matters
    more than bytes, so it puts lz4 first (about 8x cheaper than zstd level 3 on a 100 MB Native result);
    clients decode whatever ``Content-Encoding`` says, so the choice is invisible to them.
    """
    offered = {part.split(";")[0].strip().lower() for part in accept_encoding.split(",")}
    for enc in ("lz4", "zstd", "br", "gzip", "deflate"):
        if enc in offered and (enc != "br" or _brotli() is not None):
            return enc
    return None


def compress_body(data: bytes | memoryview, encoding: str, level: int) -> bytes:
    """Compress a response body with one of the encodings :func:`choose_response_encoding` returns."""
    if encoding == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=min(max(level, 1), 22)).compress(data)
    if encoding == "lz4":
        import lz4.frame

        return bytes(lz4.frame.compress(data))
    if encoding == "gzip":
        comp = zlib.compressobj(min(max(level, 0), 9), zlib.DEFLATED, 31)
        return comp.compress(data) + comp.flush()
    if encoding == "deflate":
        return zlib.compress(data, min(max(level, 0), 9))
    brotli = _brotli()
    if encoding == "br" and brotli is not None:
        return bytes(brotli.compress(bytes(data)))
    raise ValueError(f"unsupported encoding {encoding}")


# ----------------------------------------------------------------------------------------------------
# The engine: chDB connections, sessions, per-request settings
# ----------------------------------------------------------------------------------------------------
def _quote_literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _quote_ident(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def _setting_name(name: str) -> str:
    if not _SETTING_NAME_RE.match(name):
        raise ClickHouseError(BAD_ARGUMENTS, f"Invalid setting name: {name!r}")
    return name


@dataclass
class QueryRequest:
    """Everything the engine needs from one HTTP request."""

    query_param: str | None = None
    body: bytes = b""
    settings: dict[str, str] = field(default_factory=dict)
    query_params: dict[str, str] = field(default_factory=dict)
    database: str | None = None
    default_format: str | None = None
    session_id: str | None = None
    session_timeout_s: float = DEFAULT_SESSION_TIMEOUT_S
    session_check: bool = False
    close_session: bool = False
    readonly: bool = False


@dataclass
class QueryResult:
    """The outcome of one statement: body bytes (kept alive by ``keepalive``) and summary counters."""

    body: bytes | memoryview
    output_format: str | None
    summary: dict[str, str]
    keepalive: Any = None


class _Handle:
    """One chDB connection plus what this server layered on top of it (request settings, database)."""

    __slots__ = ("conn", "lock", "applied", "saved", "base_db", "cur_db", "last_used", "timeout_s", "sid")

    def __init__(self, conn: Any, default_db: str, sid: str | None = None) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.applied: dict[str, str] = {}
        self.saved: dict[str, tuple[str, bool]] = {}
        self.base_db = default_db
        self.cur_db = default_db
        self.last_used = time.monotonic()
        self.timeout_s: float = DEFAULT_SESSION_TIMEOUT_S
        self.sid = sid

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # closing is best effort
            logger.debug("error closing chDB connection", exc_info=True)


class ChdbEngine:
    """Single owner of a chDB data directory; runs statements for the HTTP layer.

    chDB allows many connections to the one engine a process hosts, each with its own settings, current
    database and temporary tables, and runs them concurrently (it releases the GIL). Requests without a
    ``session_id`` borrow a connection from a small pool; each ClickHouse session gets a connection of its
    own. URL settings are applied with ``SET`` before the statement and, when a later request on the same
    connection does not carry them, restored to their previous value, so nothing leaks between requests.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        pool_size: int = 4,
        max_sessions: int = 256,
        limits: QueryLimits | None = None,
    ) -> None:
        self.limits = limits or QueryLimits()
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._acquire_dir_lock()
        try:
            import chdb  # heavy import, deferred so importing this module stays cheap
        except BaseException:
            self._release_dir_lock()
            raise
        self._chdb = chdb
        self._insert_dir = self.data_dir / ".inserts"  # request bodies of INSERTs, one file per insert
        self._insert_dir.mkdir(exist_ok=True)
        self.pool_size = pool_size
        self.max_sessions = max_sessions
        self._pool: list[_Handle] = []
        self._sessions: dict[str, _Handle] = {}
        self._mutex = threading.Lock()
        self._idle = threading.Condition(self._mutex)
        self._inflight = 0
        self._closing = False
        self._last_reap = 0.0
        try:
            self._anchor = self._chdb.connect(str(self.data_dir))
            row = self._anchor.query("SELECT version(), timezone(), currentDatabase()", "TabSeparated")
            self.version, self.timezone, self.default_db = row.bytes().decode().rstrip("\n").split("\t")
            fmts = self._anchor.query("SELECT name, is_input, is_output FROM system.formats", "JSONEachRow")
            funcs = self._anchor.query("SELECT name FROM system.table_functions", "TabSeparated")
        except Exception:
            self._release_dir_lock()
            raise
        self.input_formats: dict[str, str] = {}
        self.output_formats: dict[str, str] = {}
        for line in fmts.bytes().splitlines():
            rec = json.loads(line)
            if rec["is_input"]:
                self.input_formats[rec["name"].lower()] = rec["name"]
            if rec["is_output"]:
                self.output_formats[rec["name"].lower()] = rec["name"]
        self.readonly_forbidden = (
            frozenset(funcs.bytes().decode().lower().split()) | {"file", "url"}
        ) - _READONLY_TABLE_FUNCTIONS
        logger.info("chDB %s opened at %s (timezone %s)", self.version, self.data_dir, self.timezone)

    # -- data directory ownership ------------------------------------------------------------------
    def _acquire_dir_lock(self) -> IO[str]:
        fh = open(self.data_dir / ".chserver.lock", "a+")  # noqa: SIM115 - held for the engine's lifetime
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.close()
            raise RuntimeError(f"data directory {self.data_dir} is already owned by another process") from exc
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        return fh

    def _release_dir_lock(self) -> None:
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        finally:
            self._lock_file.close()

    # -- connections ---------------------------------------------------------------------------------
    def _open(self, sid: str | None = None) -> _Handle:
        conn = self._chdb.connect(str(self.data_dir))
        try:  # the server-side defaults every request starts from (restored after per-request settings)
            conn.query(
                "SET " + ", ".join(f"{k} = {v}" for k, v in self.limits.defaults.items()), "TabSeparated"
            )
        except BaseException:
            conn.close()
            raise
        return _Handle(conn, self.default_db, sid)

    def _acquire(self, req: QueryRequest) -> _Handle:
        with self._mutex:
            if self._closing:
                raise ClickHouseError(ABORTED, "Server is shutting down")
            self._inflight += 1
        try:
            if req.session_id is None:
                with self._mutex:
                    handle = self._pool.pop() if self._pool else None
                if handle is None:
                    handle = self._open()
                handle.lock.acquire()
                return handle
            return self._acquire_session(req)
        except BaseException:
            self._done()
            raise

    def _acquire_session(self, req: QueryRequest) -> _Handle:
        assert req.session_id is not None
        sid = req.session_id
        with self._mutex:
            self._reap_locked()
            handle = self._sessions.get(sid)
            if handle is None:
                if req.session_check:
                    raise ClickHouseError(SESSION_NOT_FOUND, f"Session {sid} not found")
                if len(self._sessions) >= self.max_sessions:
                    self._evict_one_locked()
                handle = self._open(sid)
                self._sessions[sid] = handle
            if not handle.lock.acquire(blocking=False):
                raise ClickHouseError(SESSION_IS_LOCKED, f"Session {sid} is locked by a concurrent client")
            handle.timeout_s = req.session_timeout_s
            return handle

    def _release(self, handle: _Handle, *, discard: bool, close_session: bool) -> None:
        handle.last_used = time.monotonic()
        handle.lock.release()
        to_close: _Handle | None = None
        with self._mutex:
            if handle.sid is None:
                if discard or self._closing or len(self._pool) >= self.pool_size:
                    to_close = handle
                else:
                    self._pool.append(handle)
            elif close_session and self._sessions.get(handle.sid) is handle:
                del self._sessions[handle.sid]
                to_close = handle
        if to_close is not None:
            to_close.close()
        self._done()

    def _done(self) -> None:
        with self._mutex:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.notify_all()

    def _reap_locked(self) -> None:
        now = time.monotonic()
        if now - self._last_reap < 1.0:
            return
        self._last_reap = now
        for sid, handle in list(self._sessions.items()):
            if now - handle.last_used > handle.timeout_s and handle.lock.acquire(blocking=False):
                del self._sessions[sid]
                handle.lock.release()
                handle.close()
                logger.debug("session %s expired", sid)

    def _evict_one_locked(self) -> None:
        idle = sorted(self._sessions.items(), key=lambda kv: kv[1].last_used)
        for sid, handle in idle:
            if handle.lock.acquire(blocking=False):
                del self._sessions[sid]
                handle.lock.release()
                handle.close()
                logger.info("session %s evicted (max %d sessions)", sid, self.max_sessions)
                return
        raise ClickHouseError(TOO_MANY_SIMULTANEOUS_QUERIES, f"Too many sessions ({self.max_sessions})")

    @property
    def session_count(self) -> int:
        """Number of open ClickHouse sessions."""
        with self._mutex:
            return len(self._sessions)

    # -- settings overlay ----------------------------------------------------------------------------
    def _snapshot(self, handle: _Handle, names: list[str]) -> None:
        in_list = ", ".join(_quote_literal(n) for n in names)
        res = handle.conn.query(
            f"SELECT name, value, changed FROM system.settings WHERE name IN ({in_list})", "JSONEachRow"
        )
        for line in res.bytes().splitlines():
            rec = json.loads(line)
            handle.saved[rec["name"]] = (rec["value"], bool(rec["changed"]))
        for name in names:
            handle.saved.setdefault(name, ("", False))

    @staticmethod
    def _restore_expr(name: str, saved: tuple[str, bool]) -> str:
        value, changed = saved
        if not changed:
            return f"{name} = DEFAULT"
        literal = value if len(value) >= 2 and value[0] == value[-1] == "'" else _quote_literal(value)
        return f"{name} = {literal}"

    def _reset_overlay(self, handle: _Handle) -> None:
        """Undo every request-level setting on this connection (individually, best effort)."""
        for name in list(handle.applied):
            try:
                handle.conn.query(f"SET {self._restore_expr(name, handle.saved[name])}", "TabSeparated")
            except RuntimeError:
                logger.debug("could not restore setting %s", name, exc_info=True)
        handle.applied.clear()
        handle.saved.clear()

    def _prepare(self, handle: _Handle, settings: Mapping[str, str], database: str | None) -> None:
        target_db = database or handle.base_db
        if target_db != handle.cur_db:
            try:
                handle.conn.query(f"USE {_quote_ident(target_db)}", "TabSeparated")
            except RuntimeError as exc:
                raise ClickHouseError.from_engine(exc) from None
            handle.cur_db = target_db
        stale = [n for n in handle.applied if n not in settings]
        new = {_setting_name(k): v for k, v in settings.items() if handle.applied.get(k) != v}
        if not new and not stale:
            return
        try:
            missing = [n for n in new if n not in handle.saved]
            if missing:
                self._snapshot(handle, missing)
            changes = [self._restore_expr(n, handle.saved[n]) for n in stale]
            changes += [f"{k} = {_quote_literal(v)}" for k, v in new.items()]
            handle.conn.query("SET " + ", ".join(changes), "TabSeparated")
        except RuntimeError as exc:
            for name in new:
                handle.applied[name] = "\0"  # state unknown: make the reset below restore it
                handle.saved.setdefault(name, ("", False))
            self._reset_overlay(handle)
            raise ClickHouseError.from_engine(exc) from None
        for name in stale:
            del handle.applied[name]
            del handle.saved[name]
        handle.applied.update(new)

    # -- execution -----------------------------------------------------------------------------------
    def execute(self, req: QueryRequest) -> QueryResult:
        """Run the statement of one request; raises :class:`ClickHouseError` on failure."""
        stmt = parse_statement(req.query_param, req.body, self.input_formats, self.output_formats)
        settings = dict(req.settings)
        readonly = req.readonly or settings.pop("readonly", "0") not in ("0", "")
        if readonly and stmt.kind not in _READ_ONLY_KINDS:
            raise ClickHouseError(
                READONLY,
                "Cannot execute query in readonly mode. For queries over HTTP, method GET implies readonly. "
                "You should use method POST for modifying queries",
            )
        if readonly and (why := readonly_violation(stmt.sql, self.readonly_forbidden)):
            raise ClickHouseError(READONLY, f"Cannot execute query in readonly mode: {why}")
        for name, value in settings.items():
            self.limits.check(name, value)
        for name, value in setting_assignments(stmt.sql, self.limits.maxima):
            self.limits.check(name, value)
        changes_state = stmt.kind in ("SET", "USE") or stmt.temporary
        handle = self._acquire(req)
        discard = False
        try:
            if stmt.kind == "SET":
                self._reset_overlay(handle)
                if req.database and req.database != handle.cur_db:
                    self._prepare(handle, {}, req.database)
            else:
                self._prepare(handle, settings, req.database)
            result = self._run(handle, stmt, req)
            if stmt.kind == "USE":
                row = handle.conn.query("SELECT currentDatabase()", "TabSeparated")
                handle.cur_db = handle.base_db = row.bytes().decode().strip()
            discard = changes_state and handle.sid is None
            return result
        except BaseException:
            discard = handle.sid is None and changes_state
            raise
        finally:
            self._release(handle, discard=discard, close_session=req.close_session)

    def _run(self, handle: _Handle, stmt: Statement, req: QueryRequest) -> QueryResult:
        started = time.perf_counter_ns()
        if stmt.insert_format is not None:
            if stmt.data or stmt.inputs:
                return self._insert_from_file(handle, stmt, started)
            try:
                inserter = handle.conn.send_insert(stmt.sql, stmt.insert_format)
                done = inserter.finish()
            except RuntimeError as exc:
                raise ClickHouseError.from_engine(exc) from None
            rows, nbytes = str(done.rows_written), str(done.bytes_written)
            elapsed = time.perf_counter_ns() - started
            summary = _summary(rows, nbytes, rows, nbytes, elapsed, result_rows=rows, result_bytes=nbytes)
            return QueryResult(b"", None, summary)
        fmt = stmt.output_format or req.default_format or DEFAULT_FORMAT
        try:
            res = handle.conn.query(stmt.sql, fmt, params=req.query_params or None)
        except RuntimeError as exc:
            self._drain(handle)
            raise ClickHouseError.from_engine(exc) from None
        wrapper = res.get_memview() if res.size() else None
        body: bytes | memoryview = wrapper.view() if wrapper is not None else b""
        elapsed = time.perf_counter_ns() - started
        produces = stmt.output_format is not None or stmt.kind in _RESULT_KINDS
        summary = _summary(
            str(res.rows_read()),
            str(res.bytes_read()),
            str(res.rows_written()),
            str(res.bytes_written()),
            elapsed,
            result_bytes=str(len(body)),
        )
        return QueryResult(body, fmt if produces else None, summary, keepalive=(res, wrapper))

    @staticmethod
    def _drain(handle: _Handle) -> None:
        """After a failed query (e.g. ``TIMEOUT_EXCEEDED``), chDB hands the partial output of that query to
        the connection's next query: run a throw-away query so that the client's next one starts clean."""
        try:
            handle.conn.query("SELECT 1", "TabSeparated")
        except RuntimeError:
            logger.debug("drain query failed", exc_info=True)

    def _insert_from_file(self, handle: _Handle, stmt: Statement, started: int) -> QueryResult:
        """``INSERT ... FORMAT X <data>`` as ``INSERT ... SELECT * FROM file(<data>, X)``.

        chDB's streaming insert (``send_insert``, chDB 4.4) reports success for an insert that the table
        rejects after parsing (a ``CHECK`` constraint, an exception in a materialized view): nothing is
        written and no error is raised. ``INSERT ... SELECT`` fails as on a server. The target's structure
        is used for the data (``use_structure_from_insertion_table_in_table_functions``), so the columns,
        their order and defaults mean what they mean for ``INSERT ... FORMAT X``.
        """
        fd, path = tempfile.mkstemp(prefix="insert-", dir=self._insert_dir)
        source = f"file({_quote_literal(path)}, {_quote_literal(stmt.insert_format or '')}"
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(stmt.data)
            if stmt.inputs:  # INSERT ... SELECT ... FROM input('<structure>'): file(<data>, X, '<structure>')
                raw = stmt.sql.encode()
                for start, end in reversed(stmt.inputs):
                    raw = raw[:start] + f"{source}, ".encode() + raw[end:]
                sql = raw.decode()
            else:
                sql = f"{stmt.sql.rstrip()} SELECT * FROM {source})"
            try:
                res = handle.conn.query(sql, "TabSeparated")
            except RuntimeError as exc:
                raise ClickHouseError.from_engine(exc) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        rows, nbytes = str(res.rows_written()), str(res.bytes_written())
        elapsed = time.perf_counter_ns() - started
        return QueryResult(
            b"", None, _summary(rows, nbytes, rows, nbytes, elapsed, result_rows=rows, result_bytes=nbytes)
        )

    def close(self, timeout_s: float = 30.0) -> None:
        """Refuse new statements, wait for running ones (up to ``timeout_s``), close every connection."""
        with self._mutex:
            self._closing = True
            deadline = time.monotonic() + timeout_s
            while self._inflight > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    logger.warning("closing chDB with %d statement(s) still running", self._inflight)
                    break
                self._idle.wait(remaining)
            handles = self._pool + list(self._sessions.values())
            self._pool, self._sessions = [], {}
        for handle in handles:
            handle.close()
        try:
            self._anchor.close()
        finally:
            self._release_dir_lock()
        logger.info("chDB at %s closed", self.data_dir)


def _summary(
    read_rows: str,
    read_bytes: str,
    written_rows: str,
    written_bytes: str,
    ns: int,
    *,
    result_rows: str | None = None,
    result_bytes: str,
) -> dict[str, str]:
    """``X-ClickHouse-Summary`` (string values, as ClickHouse sends them); chDB does not count the rows of
    a SELECT's result, so ``result_rows`` is left out there rather than reported wrong."""
    summary = {
        "read_rows": read_rows,
        "read_bytes": read_bytes,
        "written_rows": written_rows,
        "written_bytes": written_bytes,
        "total_rows_to_read": read_rows,
        "result_bytes": result_bytes,
        "elapsed_ns": str(ns),
    }
    if result_rows is not None:
        summary["result_rows"] = result_rows
    return summary


# ----------------------------------------------------------------------------------------------------
# HTTP layer
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    """A user this endpoint accepts: the one with full rights (ClickHouse's ``default`` user, typically)
    or the read-only one."""

    user: str
    password: str

    def matches(self, user: str, password: str) -> bool:
        """True when ``user``/``password`` are these (compared in constant time)."""
        ok_user = hmac.compare_digest(user.encode(), self.user.encode())
        ok_pass = hmac.compare_digest(password.encode(), self.password.encode())
        return ok_user and ok_pass


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("1", "true", "yes", "on")


_PASSWORD_RE = re.compile(r"((?:^|[?&\s])password=)[^&\s]*", re.IGNORECASE)
_CONTENT_LENGTH_RE = re.compile(r"[0-9]{1,19}")


class _TimedReader(io.RawIOBase):
    """The socket's read side with ClickHouse's timeouts: waiting for a request's first byte may take the
    keep-alive timeout; from then on, its line and headers must be complete within the receive timeout
    (a client dripping a byte at a time cannot keep a worker); each read of the body may wait that long."""

    def __init__(self, raw: Any, sock: socket.socket, keep_alive_s: float, receive_s: float) -> None:
        super().__init__()
        self._raw, self._sock = raw, sock
        self.keep_alive_s, self.receive_s = keep_alive_s, receive_s
        self._phase = "idle"
        self._head_deadline = 0.0

    def readable(self) -> bool:
        """Always: this is a reader."""
        return True

    def await_request(self) -> None:
        """The next read waits for the first byte of a new request."""
        self._phase = "idle"

    def reading_body(self) -> None:
        """The request head is in; reads of the body wait ``receive_s`` each."""
        self._phase = "body"

    def readinto(self, buffer: Any) -> int | None:
        """Read with the timeout of the current phase (raises ``TimeoutError``)."""
        if self._phase == "idle":
            timeout = self.keep_alive_s
        elif self._phase == "head":
            timeout = self._head_deadline - time.monotonic()
            if timeout <= 0:
                raise TimeoutError("request line and headers not received in time")
        else:
            timeout = self.receive_s
        self._sock.settimeout(timeout)
        n = self._raw.readinto(buffer)
        if self._phase == "idle" and n:
            self._phase = "head"
            self._head_deadline = time.monotonic() + self.receive_s
        return int(n) if n is not None else None

    def close(self) -> None:
        """Close the underlying socket reader too."""
        if not self.closed:
            self._raw.close()
        super().close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "clickpulse-chserver"
    rbufsize = 0  # setup() wraps the raw socket reader in _TimedReader and buffers that

    def version_string(self) -> str:
        """The ``Server`` response header."""
        return self.server_version

    server: _HTTPServer
    _timing = ""
    _reader: _TimedReader

    # ------------------------------------------------------------------ plumbing
    def setup(self) -> None:
        """Timed reads (see :class:`_TimedReader`); Nagle off: headers and body go out as separate writes,
        which would otherwise wait ~40 ms for the client's delayed ACK on every request."""
        super().setup()
        opts = self.server.options
        self._reader = _TimedReader(
            self.rfile, self.connection, opts.keep_alive_timeout_ms / 1000, opts.receive_timeout_ms / 1000
        )
        self.rfile = io.BufferedReader(self._reader, 65536)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle_one_request(self) -> None:
        """One request; the wait for it is bounded by the keep-alive timeout, its head by the receive one."""
        self._reader.await_request()
        super().handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        """Debug log of each request line, with any ``password=`` parameter masked."""
        logger.debug("%s %s", self.address_string(), _PASSWORD_RE.sub(r"\1***", format % args))

    def handle_expect_100(self) -> bool:
        """Refuse a bad request before inviting its body (``Expect: 100-continue``)."""
        try:
            self._check_request()
        except ClickHouseError as err:
            self._send_error(err)
            return False
        return super().handle_expect_100()

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch()

    def _send(self, status: int, body: bytes | memoryview, headers: Mapping[str, str]) -> None:
        self.connection.settimeout(self.server.options.receive_timeout_ms / 1000)
        self.send_response(status)
        self.send_header("X-ClickHouse-Server-Display-Name", self.server.display_name)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        if self.server.stopping.is_set():
            self.close_connection = True
        self.send_header("Connection", "close" if self.close_connection else "Keep-Alive")
        if not self.close_connection:
            self.send_header("Keep-Alive", f"timeout={self.server.options.keep_alive_timeout_ms // 1000}")
        self.end_headers()
        if self.command != "HEAD" and len(body):
            self.wfile.write(body)

    def _send_error(self, err: ClickHouseError, extra: Mapping[str, str] | None = None) -> None:
        body = (err.text(self.server.engine.version) + "\n").encode()
        headers = {"Content-Type": "text/plain; charset=UTF-8", "X-ClickHouse-Exception-Code": str(err.code)}
        if err.code == REQUIRED_PASSWORD:
            headers["WWW-Authenticate"] = 'Basic realm="ClickHouse server HTTP API"'
        headers.update(extra or {})
        self._send(err.http_status, body, headers)

    # ------------------------------------------------------------------ request checks
    def _check_request(self) -> int | None:
        """Refuse, before anything is read or run: a ``Host`` or ``Origin`` outside the allowlist (DNS
        rebinding, cross-site requests from a browser), ambiguous framing, a declared body over the cap.
        Returns the declared body length, ``None`` for a chunked body."""
        try:
            self._check_host_and_origin()
            return self._body_length()
        except ClickHouseError:
            self.close_connection = True  # the body, if any, is not read
            raise

    def _check_host_and_origin(self) -> None:
        allowed = self.server.allowed_hosts
        hosts = self.headers.get_all("Host") or []
        if len(hosts) > 1:
            raise ClickHouseError(BAD_ARGUMENTS, "More than one Host header", status=400)
        if hosts and not allowed.allows_host(_host_of(hosts[0])):
            raise ClickHouseError(
                ACCESS_DENIED,
                f"Host {hosts[0].strip()!r} is not allowed (allowed_hosts of this server); use a loopback "
                "address or add the name to CLICKPULSE_CHSERVER_ALLOWED_HOSTS",
            )
        origin = self.headers.get("Origin")
        if origin is not None:
            parts = urlsplit(origin.strip())
            if parts.scheme not in ("http", "https") or not allowed.allows_host(parts.hostname or ""):
                raise ClickHouseError(
                    ACCESS_DENIED, f"Requests from origin {origin.strip()!r} are not allowed"
                )
        if self.headers.get("Sec-Fetch-Site", "").strip().lower() == "cross-site":
            raise ClickHouseError(ACCESS_DENIED, "Cross-site requests from a browser are not allowed")

    def _body_length(self) -> int | None:
        lengths = self.headers.get_all("Content-Length") or []
        encodings = self.headers.get_all("Transfer-Encoding") or []
        if lengths and encodings:
            raise ClickHouseError(
                BAD_ARGUMENTS,
                "Both Transfer-Encoding and Content-Length: ambiguous request framing",
                status=400,
            )
        if encodings:
            if len(encodings) > 1 or encodings[0].strip().lower() != "chunked":
                raise ClickHouseError(
                    BAD_ARGUMENTS, f"Unsupported Transfer-Encoding: {', '.join(encodings)}", status=400
                )
            return None
        if not lengths:
            return 0
        if len(lengths) > 1:
            raise ClickHouseError(BAD_ARGUMENTS, "More than one Content-Length header", status=400)
        if not _CONTENT_LENGTH_RE.fullmatch(lengths[0].strip()):
            raise ClickHouseError(BAD_ARGUMENTS, f"Invalid Content-Length: {lengths[0]!r}", status=400)
        length = int(lengths[0])
        limit = self.server.options.max_body_bytes
        if length > limit:
            raise ClickHouseError(
                QUERY_IS_TOO_LARGE,
                f"Request body of {length} bytes is larger than max_body_bytes ({limit}) of this server",
            )
        return length

    def _read_body(self, length: int | None) -> bytes:
        self._reader.reading_body()
        try:
            return self._read_framed(length)
        except TimeoutError:
            self.close_connection = True
            raise ClickHouseError(
                SOCKET_TIMEOUT, "Timeout exceeded while reading the request body (receive_timeout_ms)"
            ) from None

    def _read_framed(self, length: int | None) -> bytes:
        limit = self.server.options.max_body_bytes
        if length is None:
            return self._read_chunked(limit)
        data = self.rfile.read(length) if length > 0 else b""
        if len(data) != length:
            self.close_connection = True
            raise ClickHouseError(BAD_ARGUMENTS, "Truncated request body")
        return data

    def _read_chunked(self, limit: int) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(65537)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                size = -1
            if size < 0:
                self.close_connection = True
                raise ClickHouseError(BAD_ARGUMENTS, "Malformed chunked request body")
            if size == 0:
                for _ in range(100):  # trailers
                    if self.rfile.readline(65537) in (b"\r\n", b"\n", b""):
                        break
                break
            total += size
            if total > limit:
                self.close_connection = True
                raise ClickHouseError(
                    QUERY_IS_TOO_LARGE,
                    f"Chunked request body is larger than max_body_bytes ({limit}) of this server",
                )
            chunk = self.rfile.read(size)
            if len(chunk) != size:
                self.close_connection = True
                raise ClickHouseError(BAD_ARGUMENTS, "Truncated chunked request body")
            chunks.append(chunk)
            self.rfile.readline(3)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    # ------------------------------------------------------------------ auth
    def _authenticate(self, params: Mapping[str, str]) -> bool:
        """Check the request's credentials; True when it runs as the read-only user."""
        expected = self.server.credentials
        readonly = self.server.readonly_credentials
        if expected is None and readonly is None:
            return False
        hdr_user = self.headers.get("X-ClickHouse-User", "")
        hdr_key = self.headers.get("X-ClickHouse-Key", "")
        auth = self.headers.get("Authorization", "")
        in_params = "user" in params or "password" in params
        if hdr_user or hdr_key:
            if auth or in_params:
                raise ClickHouseError(
                    AUTHENTICATION_FAILED,
                    "Invalid authentication: it is not allowed to use X-ClickHouse HTTP headers and other "
                    "authentication methods simultaneously",
                )
            user, password = hdr_user or "default", hdr_key
        elif auth:
            if in_params:
                raise ClickHouseError(
                    AUTHENTICATION_FAILED,
                    "Invalid authentication: it is not allowed to use Authorization HTTP header and "
                    "authentication via parameters simultaneously",
                )
            scheme, _, info = auth.partition(" ")
            if scheme.lower() != "basic":
                raise ClickHouseError(
                    AUTHENTICATION_FAILED,
                    f"Invalid authentication: '{scheme}' HTTP Authorization scheme is not supported",
                )
            try:
                user, _, password = base64.b64decode(info.strip(), validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise ClickHouseError(
                    AUTHENTICATION_FAILED, "Invalid authentication: malformed Basic credentials"
                ) from None
        elif in_params:
            user, password = params.get("user", "default"), params.get("password", "")
        elif expected is None:
            return False  # no credentials sent, and only the read-only user needs them
        else:
            raise ClickHouseError(
                REQUIRED_PASSWORD,
                "Authentication required: send a user and password (HTTP basic auth, X-ClickHouse-User/"
                "X-ClickHouse-Key headers or user/password parameters)",
            )
        if readonly is not None and hmac.compare_digest(user.encode(), readonly.user.encode()):
            ok, as_readonly = readonly.matches(user, password), True
        else:  # without credentials of its own, the endpoint takes any other user as the full one
            ok, as_readonly = expected is None or expected.matches(user, password), False
        if not ok:
            raise ClickHouseError(
                AUTHENTICATION_FAILED,
                f"{user}: Authentication failed: password is incorrect, or there is no user with such name.",
            )
        return as_readonly

    # ------------------------------------------------------------------ requests
    def _dispatch(self) -> None:
        started = time.perf_counter()
        try:
            length = self._check_request()
        except ClickHouseError as err:
            logger.info("refused %s request: %s", self.command, err.message)
            self._send_error(err)
            return
        if self.command != "POST" and length != 0:
            self.close_connection = True  # a body on GET/HEAD is not read: do not parse it as a request
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        if path in ("/ping", "/replicas_status") or (
            path == "/" and self.command != "POST" and not url.query
        ):
            if self.command == "POST":
                try:
                    self._read_body(length)
                except ClickHouseError as err:
                    self._send_error(err)
                    return
            self._send(200, b"Ok.\n", {"Content-Type": "text/html; charset=UTF-8"})
            return
        if path not in ("/", "/query"):
            self.close_connection = True
            msg = f"There is no handle {url.path}\n\nUse / or /ping for health checks.\n".encode()
            self._send(404, msg, {"Content-Type": "text/plain; charset=UTF-8"})
            return
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        query_id = params.get("query_id") or self.headers.get("X-ClickHouse-Query-Id") or str(uuid.uuid4())
        ids = {"X-ClickHouse-Query-Id": query_id, "X-ClickHouse-Timezone": self.server.engine.timezone}
        try:
            try:
                as_readonly = self._authenticate(params)
            except ClickHouseError:
                self.close_connection = True  # the body was not read
                raise
            result, encoding = self._query(params, length, readonly=as_readonly)
        except ClickHouseError as err:
            logger.info("query %s failed: %s", query_id, err.text(self.server.engine.version))
            self._send_error(err, ids)
            return
        except Exception:
            logger.exception("query %s: internal error", query_id)
            self._send_error(ClickHouseError(STD_EXCEPTION, "Internal error in the embedded endpoint"), ids)
            return
        headers = {
            **ids,
            "X-ClickHouse-Summary": json.dumps(result.summary, separators=(",", ":")),
        }
        fmt = result.output_format
        if fmt is not None:
            headers["X-ClickHouse-Format"] = fmt
            headers["Content-Type"] = _CONTENT_TYPES.get(fmt.lower(), "text/plain; charset=UTF-8")
        else:
            headers["Content-Type"] = "text/plain; charset=UTF-8"
        body: bytes | memoryview = result.body
        if encoding and len(body):
            level = int(params.get("http_zlib_compression_level") or 3)
            body = compress_body(body, encoding, level)
            headers["Content-Encoding"] = encoding
        self._send(200, body, headers)
        logger.debug(
            "query %s ok: %s, sent %d B, total %.1f ms",
            query_id,
            self._timing,
            len(body),
            (time.perf_counter() - started) * 1000,
        )

    def _query(
        self, params: dict[str, str], length: int | None, *, readonly: bool = False
    ) -> tuple[QueryResult, str | None]:
        req = QueryRequest(readonly=readonly or self.command in ("GET", "HEAD"))
        t0 = time.perf_counter()
        body = self._read_body(length) if self.command == "POST" else b""
        self._timing = f"read {len(body)} B in {(time.perf_counter() - t0) * 1000:.1f} ms"
        if _truthy(params.get("decompress")) or _truthy(params.get("compress")):
            raise ClickHouseError(
                NOT_IMPLEMENTED,
                "ClickHouse-native block compression (compress/decompress=1) is not supported",
            )
        ctype = self.headers.get("Content-Type", "")
        if ctype.lower().startswith("multipart/form-data"):
            params = {**params, **self._form_fields(ctype, body)}
            body = b""
        else:
            body = decompress_body(
                body, self.headers.get("Content-Encoding", ""), self.server.options.max_decompressed_bytes
            )
        req.query_param = params.get("query")
        req.body = body
        req.database = self.headers.get("X-ClickHouse-Database") or params.get("database") or None
        req.default_format = self.headers.get("X-ClickHouse-Format") or params.get("default_format") or None
        if req.default_format:
            req.default_format = self.server.engine.output_formats.get(
                req.default_format.lower(), req.default_format
            )
        req.session_id = params.get("session_id") or None
        if req.session_id is not None:
            raw_timeout = params.get("session_timeout")
            if raw_timeout:
                if not raw_timeout.isdigit():
                    raise ClickHouseError(
                        INVALID_SESSION_TIMEOUT, f"Invalid session timeout: '{raw_timeout}'"
                    )
                if int(raw_timeout) > MAX_SESSION_TIMEOUT_S:
                    raise ClickHouseError(
                        INVALID_SESSION_TIMEOUT,
                        f"Session timeout '{raw_timeout}' is larger than max_session_timeout: "
                        f"{MAX_SESSION_TIMEOUT_S}",
                    )
                req.session_timeout_s = int(raw_timeout)
            req.session_check = _truthy(params.get("session_check"))
            req.close_session = _truthy(params.get("close_session"))
        for key, value in params.items():
            if key.startswith("param_"):
                req.query_params[key[len("param_") :]] = value
            elif (
                key
                and key not in _RESERVED_PARAMS
                and key not in _TRANSPORT_SETTINGS
                and not key.startswith("http_")
            ):
                req.settings[key] = value
        t0 = time.perf_counter()
        result = self.server.engine.execute(req)
        self._timing += f", executed in {(time.perf_counter() - t0) * 1000:.1f} ms"
        encoding = None
        if params.get("enable_http_compression", "1").strip().lower() not in ("0", "false"):
            encoding = choose_response_encoding(self.headers.get("Accept-Encoding", ""))
        return result, encoding

    @staticmethod
    def _form_fields(ctype: str, body: bytes) -> dict[str, str]:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + ctype.encode("latin-1") + b"\r\n\r\n" + body
        )
        fields: dict[str, str] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if not isinstance(name, str):
                continue
            if part.get_filename() is not None and name != "query" and not name.startswith("param_"):
                raise ClickHouseError(
                    NOT_IMPLEMENTED, "External data (multipart file parts) is not supported"
                )
            payload = part.get_payload(decode=True)
            fields[name] = payload.decode() if isinstance(payload, bytes) else str(part.get_payload())
        return fields


def _host_of(header: str) -> str:
    """The host of a ``Host`` header value (``name``, ``name:port``, ``[v6]:port``), without brackets."""
    value = header.strip()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class _HTTPServer(ThreadingHTTPServer):
    """One thread per connection, as ClickHouse's HTTP server, at most ``max_connections`` of them."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(
        self,
        address: tuple[str, int],
        engine: ChdbEngine,
        credentials: Credentials | None,
        display_name: str,
        options: ChServerSettings,
        readonly_credentials: Credentials | None = None,
    ) -> None:
        self.engine = engine
        self.credentials = credentials
        self.readonly_credentials = readonly_credentials
        self.display_name = display_name
        self.options = options
        self.allowed_hosts = Allowlist.parse(options.allowed_hosts.split(","))
        self.stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(options.max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection in a thread of its own, or answer 503 when all slots are taken."""
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """The connection's thread; frees its slot at the end."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        err = ClickHouseError(
            TOO_MANY_SIMULTANEOUS_QUERIES,
            f"Too many connections (max_connections {self.options.max_connections} of this server)",
        )
        body = (err.text(self.engine.version) + "\n").encode()
        head = (
            f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=UTF-8\r\n"
            f"X-ClickHouse-Exception-Code: {err.code}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        try:
            request.settimeout(0.5)
            request.sendall(head + body)
        except OSError:
            pass
        logger.warning(
            "refused a connection: %d connections open (max_connections)", self.options.max_connections
        )
        self.shutdown_request(request)


class ChServer:
    """The endpoint: a :class:`ChdbEngine` behind a threaded HTTP server.

    Use :meth:`start` / :meth:`stop` to run it in the background (tests), or :meth:`serve_forever` in the
    foreground. :meth:`stop` stops accepting, waits for running statements, closes chDB.
    """

    def __init__(
        self,
        host: str,
        port: int,
        data_dir: str | Path,
        *,
        credentials: Credentials | None = None,
        display_name: str | None = None,
        options: ChServerSettings | None = None,
        readonly_credentials: Credentials | None = None,
    ) -> None:
        options = options or ChServerSettings()
        if credentials is not None and readonly_credentials is not None:
            if credentials.user == readonly_credentials.user:
                raise ValueError("the read-only user must not be the user with full rights")
        self.engine = ChdbEngine(data_dir, limits=QueryLimits.from_settings(options))
        try:
            self.httpd = _HTTPServer(
                (host, port),
                self.engine,
                credentials,
                display_name or socket.gethostname(),
                options,
                readonly_credentials,
            )
        except BaseException:
            self.engine.close()
            raise
        self._thread: threading.Thread | None = None
        self._stopped = False

    @property
    def port(self) -> int:
        """The bound TCP port (useful with port 0)."""
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        """``http://host:port`` of this endpoint."""
        host = self.httpd.server_address[0]
        return f"http://{host if isinstance(host, str) else host.decode()}:{self.port}"

    def serve_forever(self) -> None:
        """Serve requests in the calling thread until :meth:`stop` is called from another thread."""
        logger.info("ClickHouse HTTP endpoint listening on %s (data dir %s)", self.url, self.engine.data_dir)
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self) -> ChServer:
        """Serve in a background thread; returns ``self``."""
        self._thread = threading.Thread(target=self.serve_forever, name="chserver", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """True while the background serving thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop accepting connections, finish running statements, close the chDB engine. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.httpd.stopping.set()
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout_s)
        self.httpd.server_close()
        self.engine.close(timeout_s)


def serve(
    host: str,
    port: int,
    data_dir: str | Path,
    *,
    user: str | None = None,
    password: str | None = None,
    display_name: str | None = None,
    options: ChServerSettings | None = None,
    readonly: Credentials | None = None,
) -> ChServer:
    """Start the endpoint in a background thread of this process and return it (call ``.stop()``).

    ``user``/``password``: when either is given, requests must authenticate as that user (``user``
    defaults to ``default``, ``password`` to empty). ``readonly``: a user whose requests are read-only.
    ``options``: limits (default: the defaults).
    """
    creds = None
    if user is not None or password is not None:
        creds = Credentials(user or "default", password or "")
    return ChServer(
        host,
        port,
        data_dir,
        credentials=creds,
        display_name=display_name,
        options=options,
        readonly_credentials=readonly,
    ).start()


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m devstack.chserver",
        description="Serve a chDB data directory on ClickHouse's HTTP interface (its single owner).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8123, help="TCP port (default 8123; 0 picks a free port)")
    p.add_argument("--data-dir", required=True, help="chDB data directory (created if missing)")
    p.add_argument("--log-file", help="append logs to this file instead of stderr")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    p.add_argument("--user", help="require this user (default: no authentication)")
    p.add_argument("--password-env", help="name of the environment variable holding the password")
    p.add_argument("--readonly-user", help="a user whose requests are read-only (default: none)")
    p.add_argument(
        "--readonly-password-env",
        help="name of the environment variable holding the read-only user's password",
    )
    p.add_argument("--port-file", help="write the bound port to this file once listening")
    p.add_argument("--display-name", help="X-ClickHouse-Server-Display-Name (default: host name)")
    limits = p.add_argument_group("limits (default: the CLICKPULSE_CHSERVER_* variable, else as documented)")
    fields = ChServerSettings.model_fields
    for flag in (
        "--max-body-bytes",
        "--max-decompressed-bytes",
        "--max-execution-time-ms",
        "--max-execution-time-limit-ms",
        "--max-result-bytes",
        "--max-result-bytes-limit",
        "--max-connections",
        "--keep-alive-timeout-ms",
        "--receive-timeout-ms",
    ):
        name = flag[2:].replace("-", "_")
        info = fields[name]
        limits.add_argument(flag, dest=name, type=int, help=f"{info.alias} (default {info.default})")
    info = fields["allowed_hosts"]
    limits.add_argument("--allowed-hosts", help=f"{info.alias} (default {info.default})")
    return p


def _setup_logging(log_file: str | None, level: str) -> None:
    handler: logging.Handler = (
        logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level.upper())


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code (0 after a clean SIGTERM/SIGINT shutdown)."""
    args = _parser().parse_args(argv)
    _setup_logging(args.log_file, args.log_level)
    creds: Credentials | None = None
    if args.password_env:
        password = os.environ.get(args.password_env)
        if password is None:
            logger.error("environment variable %s (--password-env) is not set", args.password_env)
            return 2
        creds = Credentials(args.user or "default", password)
    elif args.user:
        creds = Credentials(args.user, "")
    readonly: Credentials | None = None
    if args.readonly_user:
        ro_password = os.environ.get(args.readonly_password_env) if args.readonly_password_env else ""
        if ro_password is None:
            logger.error(
                "environment variable %s (--readonly-password-env) is not set", args.readonly_password_env
            )
            return 2
        readonly = Credentials(args.readonly_user, ro_password)
    try:
        options = ChServerSettings.from_env(process_environment(), vars(args))
    except ValueError as exc:
        logger.error("invalid limits: %s", exc)
        return 2
    try:
        server = ChServer(
            args.host,
            args.port,
            args.data_dir,
            credentials=creds,
            display_name=args.display_name,
            options=options,
            readonly_credentials=readonly,
        )
    except (OSError, RuntimeError, ValueError) as exc:
        logger.error("cannot start: %s", exc)
        return 1
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    previous: dict[signal.Signals, Callable[..., Any] | int | None] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, _on_signal)
    try:
        server.start()
        if args.port_file:
            Path(args.port_file).write_text(f"{server.port}\n")
        while not stop.wait(0.5):
            if not server.running:
                logger.error("HTTP server thread died")
                break
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("stopped")
    return 0 if stop.is_set() else 1


if __name__ == "__main__":
    sys.exit(main())
