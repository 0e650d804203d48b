"""Connecting to ClickHouse: the embedded endpoint (``devstack.chserver``) or a real server, same code.

Everything in the project (loader, migrations, ``clickpulse query``) connects with :func:`client_from_url`
and a ``CLICKHOUSE_URL`` such as ``http://127.0.0.1:8123`` or ``https://user:secret@ch.example:8443/db``.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client

logger = logging.getLogger(__name__)

_DEFAULT_PORTS = {"http": 8123, "https": 8443}


def _split(url: str) -> tuple[str, str, int, str | None, str | None, str | None, dict[str, str]]:
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"ClickHouse URL must start with http:// or https://, got {redact_url(url)!r}")
    if not parts.hostname:
        raise ValueError(f"ClickHouse URL has no host: {redact_url(url)!r}")
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise ValueError(f"ClickHouse URL has an invalid port: {redact_url(url)!r}") from exc
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    database = unquote(parts.path.strip("/")) or None
    return scheme, parts.hostname, port, user, password, database, dict(parse_qsl(parts.query))


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and error messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def client_from_url(url: str, *, database: str | None = None, **kwargs: Any) -> Client:
    """A ``clickhouse-connect`` client for ``http(s)://[user[:password]@]host[:port][/database][?setting=v]``.

    Works the same against the embedded endpoint and a real ClickHouse server. ``database`` overrides the
    URL path; query-string parameters become ClickHouse settings (merged under ``settings=``); every other
    keyword goes to :func:`clickhouse_connect.get_client` and wins over what the URL says (``username``,
    ``password``, ``compress``, ...). The port defaults to 8123 (http) / 8443 (https), the user to
    ``default``. Credentials in the URL are percent-decoded.
    """
    scheme, host, port, user, password, url_db, url_settings = _split(url)
    settings = {**url_settings, **(kwargs.pop("settings", None) or {})}
    options: dict[str, Any] = {
        "interface": scheme,
        "host": host,
        "port": port,
        "username": user if user is not None else "default",
        "password": password or "",
        "database": database or url_db,
    }
    if settings:
        options["settings"] = settings
    options.update(kwargs)
    logger.debug("connecting to ClickHouse at %s", redact_url(url))
    return clickhouse_connect.get_client(**options)


def wait_healthy(url: str, timeout_s: float) -> None:
    """Poll ``GET /ping`` on the server of ``url`` until it answers ``Ok.``; raise ``TimeoutError`` after
    ``timeout_s`` seconds. ``/ping`` needs no credentials, on the embedded endpoint as on ClickHouse."""
    scheme, host, port, *_ = _split(url)
    host_part = f"[{host}]" if ":" in host else host
    ping = f"{scheme}://{host_part}:{port}/ping"
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    last_error = "no answer"
    while True:
        try:
            with urllib.request.urlopen(ping, timeout=max(0.5, min(5.0, timeout_s))) as resp:  # noqa: S310
                body = resp.read()
                if resp.status == 200 and body.strip() == b"Ok.":
                    return
                last_error = f"HTTP {resp.status}: {body[:100]!r}"
        except (urllib.error.URLError, OSError) as exc:
            last_error = str(exc)
        if time.monotonic() + delay > deadline:
            raise TimeoutError(
                f"ClickHouse at {redact_url(url)} not healthy after {timeout_s:g}s: {last_error}"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
