"""The collector's request handling on Starlette + uvicorn instead of aiohttp: only for
``bench/bench_collector.py --server starlette`` (the HTTP stack measured, same protocol code and Kafka sink).

``python -m bench.collector_starlette --port N`` (environment as for ``python -m connectors.collector``).
"""

from __future__ import annotations

import argparse
import time

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from connectors.collector import protocol
from connectors.collector.protocol import Limits, RequestError
from connectors.collector.settings import CollectorSettings
from connectors.collector.sink import KafkaSink, Unavailable
from connectors.settings import Connections, environment


def build(settings: CollectorSettings, sink: KafkaSink) -> Starlette:
    keys = settings.write_keys()
    limits = Limits(max_event_bytes=settings.max_event_bytes)

    def answer(status: int, body: dict[str, object]) -> Response:
        headers = {"Retry-After": "5"} if status == 503 else None
        return Response(
            orjson.dumps(body), status_code=status, media_type="application/json", headers=headers
        )

    async def handle(request: Request) -> Response:
        endpoint = request.path_params["endpoint"]
        received_at_ms = time.time_ns() // 1_000_000
        header_key = protocol.basic_user(request.headers.get("authorization"))
        try:
            if request.headers.get("authorization") and not protocol.key_allowed(header_key, keys):
                raise RequestError(401, "unauthorized", "invalid write key")
            raw = await request.body()
            body = protocol.decode_body(
                raw, request.headers.get("content-encoding", ""), settings.max_batch_bytes
            )
            doc = protocol.parse_json(body)
            if header_key is None and not protocol.key_allowed(protocol.body_write_key(doc), keys):
                raise RequestError(401, "unauthorized", "missing or invalid write key")
            peer = request.client.host if request.client else None
            records = protocol.request_records(
                endpoint, doc, received_at_ms=received_at_ms, ip=peer, limits=limits
            )
        except RequestError as err:
            return answer(err.status, err.body())
        try:
            await sink.publish(records, received_at_ms)
        except Unavailable as e:
            return answer(503, {"success": False, "code": "unavailable", "message": str(e)})
        return answer(200, {"success": True})

    async def ping(request: Request) -> Response:
        return Response("Ok.\n")

    return Starlette(
        routes=[
            Route("/v1/{endpoint:str}", handle, methods=["POST"]),
            Route("/ping", ping, methods=["GET"]),
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    env = environment()
    settings = CollectorSettings.from_env(env)
    conn = Connections.from_env(env)
    sink = KafkaSink(
        conn.kafka_bootstrap_servers,
        conn.topic("events.raw"),
        ack_timeout_ms=settings.ack_timeout_ms,
        security=conn.kafka_security_options(),
    )
    uvicorn.run(
        build(settings, sink), host="127.0.0.1", port=args.port, http="httptools", loop="asyncio",
        access_log=False, log_level="warning",
    )  # fmt: skip


if __name__ == "__main__":
    main()
