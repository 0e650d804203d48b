"""The collector's HTTP server (aiohttp): Segment's tracking endpoints, CORS, the tracking script.

Routes: ``POST /v1/track|page|identify|alias|batch`` (see :mod:`connectors.collector.protocol`),
``OPTIONS`` on each (CORS preflight), ``GET /v1/clickpulse.js`` (the first-party tracking script),
``GET /ping`` (liveness and readiness: 200 while the process serves) and ``GET /health`` (503 while Kafka
does not acknowledge, for monitoring; JSON with the request counters).

Answers: 200 ``{"success": true}`` once Kafka acknowledged every event of the request; 400 invalid
input, 401 bad or missing write key, 413 over a size limit, 415 unknown ``Content-Encoding``, 503 with
``Retry-After`` when Kafka did not acknowledge in time. Every refusal has a JSON body
``{"success": false, "code": ..., "message": ...}`` and is counted by its code.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

import orjson
from aiohttp import web

from connectors.collector import protocol
from connectors.collector.protocol import Limits, RequestError
from connectors.collector.settings import CollectorSettings
from connectors.collector.sink import KafkaSink, Unavailable

log = logging.getLogger(__name__)

#: Headers a browser may send on a cross-origin POST (``Access-Control-Allow-Headers``).
CORS_HEADERS = "Authorization, Content-Type, Content-Encoding"
CORS_MAX_AGE_S = 86400
SCRIPT_PATH = "/v1/clickpulse.js"
#: Server options: aiohttp must not decompress bodies itself (it would do so without a cap);
#: :func:`connectors.collector.protocol.decode_body` does it, bounded.
SERVER_OPTIONS: dict[str, Any] = {"auto_decompress": False}


class Publisher(Protocol):
    """What the handlers publish to (:class:`connectors.collector.sink.KafkaSink`, or a fake in tests)."""

    async def publish(self, records: list[protocol.RawRecord], timestamp_ms: int) -> None:  # noqa: D102
        ...

    def connected(self) -> bool:  # noqa: D102
        ...


@dataclass
class Collector:
    """The request handling of one collector process."""

    settings: CollectorSettings
    sink: KafkaSink | Publisher

    def __post_init__(self) -> None:
        """Parse the settings once."""
        self.keys = self.settings.write_keys()
        self.proxies = self.settings.proxy_networks()
        self.origins = self.settings.origins()
        self.limits = Limits(max_event_bytes=self.settings.max_event_bytes)
        self.retry_after = str(math.ceil(self.settings.retry_after_ms / 1000))
        self.counters: Counter[str] = Counter()
        self.pending = 0
        self._script: bytes | None = None

    # -- CORS -----------------------------------------------------------------------------------
    def cors(self, request: web.Request) -> dict[str, str]:
        """CORS headers for ``request``'s ``Origin`` (none when the origin is not allowed).

        No credentials mode: the write key travels in ``Authorization`` or the body, never in cookies, so
        ``*`` is enough for any origin (``Authorization`` is allowed by naming it, not by a wildcard).
        """
        origin = request.headers.get("Origin")
        if not origin:
            return {}
        if "*" in self.origins:
            return {"Access-Control-Allow-Origin": "*"}
        if origin in self.origins:
            return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        return {}

    async def preflight(self, request: web.Request) -> web.Response:
        """``OPTIONS``: the CORS preflight of a cross-origin POST (204; without CORS headers for an origin
        that is not allowed, which the browser then refuses)."""
        headers = self.cors(request)
        if headers:
            headers.update(
                {
                    "Access-Control-Allow-Methods": "POST, OPTIONS",
                    "Access-Control-Allow-Headers": CORS_HEADERS,
                    "Access-Control-Max-Age": str(CORS_MAX_AGE_S),
                }
            )
        self.counters["preflight"] += 1
        return web.Response(status=204, headers=headers)

    # -- answers --------------------------------------------------------------------------------
    def _json(self, request: web.Request, status: int, body: dict[str, Any], code: str) -> web.Response:
        self.counters[f"{status} {code}"] += 1
        headers = self.cors(request)
        if status == 503:
            headers["Retry-After"] = self.retry_after
        return web.Response(
            status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
        )

    def _refuse(self, request: web.Request, err: RequestError) -> web.Response:
        log.debug("collector: %d %s: %s", err.status, err.code, err.reason)
        return self._json(request, err.status, err.body(), err.code)

    # -- events ---------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.Response:
        """``POST /v1/<endpoint>``."""
        endpoint = request.match_info["endpoint"]
        received_at_ms = time.time_ns() // 1_000_000
        header_key = protocol.basic_user(request.headers.get("Authorization"))
        if request.headers.get("Authorization") and not protocol.key_allowed(header_key, self.keys):
            return self._refuse(request, RequestError(401, "unauthorized", "invalid write key"))
        try:
            raw = await self._read(request)
            body = protocol.decode_body(
                raw, request.headers.get("Content-Encoding", ""), self.settings.max_batch_bytes
            )
            doc = protocol.parse_json(body)
            if header_key is None:
                key = protocol.body_write_key(doc) or request.query.get("writeKey")
                if not protocol.key_allowed(key, self.keys):
                    raise RequestError(401, "unauthorized", "missing or invalid write key")
            peer = protocol.client_ip(request.remote, request.headers.get("X-Forwarded-For"), self.proxies)
            records = protocol.request_records(
                endpoint, doc, received_at_ms=received_at_ms, ip=peer, limits=self.limits
            )
        except RequestError as err:
            return self._refuse(request, err)
        if self.pending >= self.settings.max_pending_requests:
            return self._json(
                request,
                503,
                {"success": False, "code": "busy", "message": "too many requests waiting"},
                "busy",
            )
        self.pending += 1
        try:
            await self.sink.publish(records, received_at_ms)
        except Unavailable as e:
            log.warning("collector: 503 for %d events: %s", len(records), e)
            return self._json(request, 503, {"success": False, "code": "unavailable", "message": str(e)},
                              "unavailable")  # fmt: skip
        finally:
            self.pending -= 1
        self.counters["events"] += len(records)
        return self._json(request, 200, {"success": True}, "ok")

    async def _read(self, request: web.Request) -> bytes:
        limit = self.settings.max_batch_bytes
        if request.content_length is not None and request.content_length > limit:
            raise RequestError(413, "too_large", f"body is {request.content_length} bytes, limit is {limit}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, "too_large", f"body exceeds {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    # -- the rest -------------------------------------------------------------------------------
    async def script(self, request: web.Request) -> web.Response:
        """``GET /v1/clickpulse.js``: the tracking script."""
        if self._script is None:
            self._script = (
                resources.files("connectors.collector").joinpath("static", "clickpulse.js").read_bytes()
            )
        return web.Response(
            body=self._script,
            content_type="application/javascript",
            charset="utf-8",
            headers={"Cache-Control": "public, max-age=300", "Access-Control-Allow-Origin": "*"},
        )

    async def ping(self, request: web.Request) -> web.Response:
        """``GET /ping``: liveness."""
        return web.Response(text="Ok.\n")

    async def health(self, request: web.Request) -> web.Response:
        """``GET /health``: 503 from a request Kafka did not acknowledge until one it did, else 200; the
        counters. Not a readiness probe: a replica taken out of service would never see Kafka recover."""
        ok = self.sink.connected()
        body = {"kafka": ok, "pending": self.pending, "counters": dict(self.counters)}
        return web.Response(
            status=200 if ok else 503, body=orjson.dumps(body), content_type="application/json"
        )

    def app(self) -> web.Application:
        """The aiohttp application."""
        # the body is read by _read with its own cap; client_max_size only guards aiohttp's own readers
        app = web.Application(client_max_size=self.settings.max_batch_bytes)
        app.router.add_post("/v1/{endpoint:track|page|identify|alias|batch}", self.handle)
        app.router.add_route("OPTIONS", "/v1/{endpoint:track|page|identify|alias|batch}", self.preflight)
        app.router.add_get(SCRIPT_PATH, self.script)
        app.router.add_get("/ping", self.ping)
        app.router.add_get("/health", self.health)
        return app


async def serve(collector: Collector, *, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled (with :data:`SERVER_OPTIONS`); ``ready`` is set once the port is bound."""
    runner = web.AppRunner(collector.app(), access_log=None, **SERVER_OPTIONS)
    await runner.setup()
    site = web.TCPSite(runner, collector.settings.host, collector.settings.port)
    await site.start()
    log.info("collector listening on http://%s:%d", collector.settings.host, collector.settings.port)
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
