"""The embedded ClickHouse endpoint (``python -m devstack.chserver``) against real clients.

Starts the server as a subprocess on a free loopback port (once without and once with authentication) and
drives it with clickhouse-connect (default settings: compression on, sessions on), urllib and curl.
"""

from __future__ import annotations

import base64
import bz2
import collections
import gzip
import json
import lzma
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import lz4.frame
import pyarrow as pa
import pytest
import zstandard
from clickhouse_connect.driver.exceptions import DatabaseError
from clickhouse_connect.driver.summary import QuerySummary

from connectors.clickhouse import client_from_url, redact_url, wait_healthy
from devstack.chserver import ClickHouseError, parse_statement

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret:with@odd/chars"
RO_PASSWORD = "r3ad-only"


@dataclass
class Endpoint:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log_file: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(tmp: Path, *extra: str, env: dict[str, str] | None = None) -> Endpoint:
    port = _free_port()
    log_file = tmp / "chserver.log"
    cmd = [sys.executable, "-m", "devstack.chserver", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--data-dir", str(tmp / "data"), "--log-file", str(log_file), *extra]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 60)
    except TimeoutError:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"server did not start: {err.decode()[-2000:]}") from None
    return Endpoint(url, port, proc, log_file)


def _stop(ep: Endpoint) -> None:
    if ep.proc.poll() is None:
        ep.proc.send_signal(signal.SIGTERM)
    try:
        rc = ep.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        ep.proc.kill()
        ep.proc.wait(timeout=10)
        raise AssertionError("server did not stop within 30s of SIGTERM") from None
    assert rc == 0, f"server exited with {rc}: {ep.log_file.read_text()[-2000:]}"
    assert "chDB at" in ep.log_file.read_text() and "closed" in ep.log_file.read_text()


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    ep = _start(tmp_path_factory.mktemp("chserver"))
    yield ep
    _stop(ep)


LIMITS = (
    "--max-body-bytes", "2000000", "--max-decompressed-bytes", "1000000",
    "--max-execution-time-ms", "1000", "--max-execution-time-limit-ms", "3000",
    "--max-result-bytes", "1000000", "--max-result-bytes-limit", "4000000",
    "--keep-alive-timeout-ms", "1500", "--receive-timeout-ms", "1500", "--max-connections", "40",
    "--allowed-hosts", "localhost,127.0.0.0/8,::1,ch.internal",
)  # fmt: skip


@pytest.fixture(scope="module")
def limits_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    """An endpoint with small limits (flags of ``python -m devstack.chserver``)."""
    ep = _start(tmp_path_factory.mktemp("chserver_limits"), *LIMITS)
    yield ep
    _stop(ep)


@pytest.fixture(scope="module")
def auth_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    ep = _start(
        tmp_path_factory.mktemp("chserver_auth"),
        "--user",
        "loader",
        "--password-env",
        "CHSERVER_TEST_PASSWORD",
        "--readonly-user",
        "bi",
        "--readonly-password-env",
        "CHSERVER_TEST_RO_PASSWORD",
        env={"CHSERVER_TEST_PASSWORD": PASSWORD, "CHSERVER_TEST_RO_PASSWORD": RO_PASSWORD},
    )
    yield ep
    _stop(ep)


def _http(
    url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) without raising on HTTP errors."""
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _q(endpoint: Endpoint, sql: str, **params: str) -> str:
    return f"{endpoint.url}/?" + urllib.parse.urlencode({"query": sql, **params})


# ------------------------------------------------------------------------------------------ plain HTTP
def test_ping_root_and_get_query(endpoint: Endpoint) -> None:
    assert _http(f"{endpoint.url}/ping")[2] == b"Ok.\n"
    assert _http(f"{endpoint.url}/")[2] == b"Ok.\n"
    status, headers, body = _http(f"{endpoint.url}/?query=SELECT%201")
    assert (status, body) == (200, b"1\n")
    assert headers["X-ClickHouse-Format"] == "TabSeparated"
    assert headers["X-ClickHouse-Timezone"] in ("UTC", "Etc/UTC")
    assert headers["X-ClickHouse-Query-Id"]
    assert headers["X-ClickHouse-Server-Display-Name"]
    assert json.loads(headers["X-ClickHouse-Summary"])["read_rows"] == "1"
    # query in the POST body, and the query parameter + body joined with a newline like ClickHouse does
    assert _http(f"{endpoint.url}/", data=b"SELECT 1 + 1")[2] == b"2\n"
    assert _http(_q(endpoint, "SELECT"), data=b"40 + 2 AS x FORMAT JSONEachRow")[2] == b'{"x":42}\n'
    # settings and query parameters in the URL apply to that request only
    got = _http(
        _q(endpoint, "SELECT getSetting('max_block_size'), {n:UInt8}", max_block_size="777", param_n="5")
    )
    assert got[2] == b"777\t5\n"
    assert _http(_q(endpoint, "SELECT getSetting('max_block_size') = 777"))[2] == b"0\n"
    # GET implies readonly, as on ClickHouse
    status, headers, body = _http(_q(endpoint, "CREATE TABLE nope_ro (a UInt8) ENGINE = Memory"))
    assert status != 200 and headers["X-ClickHouse-Exception-Code"] == "164"
    assert _http(f"{endpoint.url}/nowhere")[0] == 404


def test_curl_binary(endpoint: Endpoint) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed")
    out = subprocess.run([curl, "-sS", f"{endpoint.url}/?query=SELECT%201"], capture_output=True, timeout=30)
    assert out.returncode == 0 and out.stdout == b"1\n"
    out = subprocess.run(
        [curl, "-sS", "--compressed", "--data-binary", "SELECT number FROM numbers(3)", f"{endpoint.url}/"],
        capture_output=True,
        timeout=30,
    )
    assert out.stdout == b"0\n1\n2\n"


def test_http_compression_both_ways(endpoint: Endpoint) -> None:
    status, headers, body = _http(
        _q(endpoint, "SELECT count() FROM numbers(1000)"), headers={"Accept-Encoding": "gzip, zstd"}
    )
    assert headers["Content-Encoding"] == "zstd"
    assert zstandard.ZstdDecompressor().decompressobj().decompress(body) == b"1000\n"
    status, headers, body = _http(
        _q(endpoint, "SELECT 7", enable_http_compression="0"), headers={"Accept-Encoding": "gzip"}
    )
    assert "Content-Encoding" not in headers and body == b"7\n"
    status, _, body = _http(
        f"{endpoint.url}/", data=gzip.compress(b"SELECT 'gz'"), headers={"Content-Encoding": "gzip"}
    )
    assert (status, body) == (200, b"gz\n")


# ---------------------------------------------------------------------------------- clickhouse-connect
def test_rollup_mv_from_insert_arrow_matches_python(endpoint: Endpoint) -> None:
    client = client_from_url(endpoint.url)  # default settings: compression and sessions on
    assert client.compression  # the client negotiated response compression
    client.command("CREATE DATABASE IF NOT EXISTS rollup_test")
    db = client_from_url(endpoint.url + "/rollup_test")
    db.command(
        "CREATE TABLE events (ts DateTime, user_id String, event LowCardinality(String)) "
        "ENGINE = MergeTree ORDER BY (event, ts)"
    )
    db.command(
        "CREATE TABLE per_minute (minute DateTime, event LowCardinality(String), "
        "events AggregateFunction(count), users AggregateFunction(uniqExact, String)) "
        "ENGINE = AggregatingMergeTree ORDER BY (minute, event)"
    )
    db.command(
        "CREATE MATERIALIZED VIEW per_minute_mv TO per_minute AS "
        "SELECT toStartOfMinute(ts) AS minute, event, countState() AS events, "
        "uniqExactState(user_id) AS users FROM events GROUP BY minute, event"
    )
    rng = random.Random(7)
    n = 100_000
    t0 = datetime(2026, 11, 22, 20, 0, tzinfo=UTC)
    ts = [t0 + timedelta(seconds=rng.randrange(3600)) for _ in range(n)]
    users = [f"u{rng.randrange(5000)}" for _ in range(n)]
    names = [
        rng.choice(["Page Viewed", "Product Viewed", "Product Added", "Order Completed"]) for _ in range(n)
    ]
    table = pa.table(
        {
            "ts": pa.array(ts, pa.timestamp("s", tz="UTC")),
            "user_id": pa.array(users),
            "event": pa.array(names),
        }
    )
    started = time.perf_counter()
    summary = db.insert_arrow("events", table)
    elapsed = time.perf_counter() - started
    print(f"insert_arrow: {n} rows in {elapsed:.3f}s = {n / elapsed:,.0f} rows/s (compression on)")
    assert summary.written_rows >= n

    expected_count: collections.Counter[tuple[datetime, str]] = collections.Counter()
    expected_users: dict[tuple[datetime, str], set[str]] = collections.defaultdict(set)
    for t, u, e in zip(ts, users, names, strict=True):
        key = (t.replace(second=0, tzinfo=None), e)
        expected_count[key] += 1
        expected_users[key].add(u)
    rows = db.query(
        "SELECT minute, event, countMerge(events), uniqExactMerge(users) "
        "FROM per_minute GROUP BY minute, event"
    ).result_rows
    got = {(m, e): (c, u) for m, e, c, u in rows}
    assert got == {k: (expected_count[k], len(expected_users[k])) for k in expected_count}

    arrow = db.query_arrow("SELECT event, count() AS c FROM events GROUP BY event ORDER BY event")
    assert arrow.column_names == ["event", "c"]
    assert dict(zip(arrow["event"].to_pylist(), arrow["c"].to_pylist(), strict=True)) == dict(
        collections.Counter(names)
    )


def test_command_insert_native_and_query(endpoint: Endpoint) -> None:
    client = client_from_url(endpoint.url)
    assert client.command("SELECT 40 + 2") == 42
    assert isinstance(
        client.command(
            "CREATE TABLE native_t (id UInt32, name String, tag LowCardinality(String), at DateTime) "
            "ENGINE = MergeTree ORDER BY id"
        ),
        QuerySummary,
    )
    rows = [[i, f"name-{i}", f"tag{i % 3}", datetime(2026, 1, 1, 0, 0, i % 60)] for i in range(1000)]
    summary = client.insert("native_t", rows, column_names=["id", "name", "tag", "at"])
    assert summary.written_rows == 1000
    assert client.command("SELECT count() FROM native_t") == 1000
    back = client.query("SELECT id, name, tag, at FROM native_t ORDER BY id").result_rows
    assert [list(r) for r in back] == rows
    df = client.query_df("SELECT id FROM native_t WHERE id < 3 ORDER BY id")
    assert df["id"].tolist() == [0, 1, 2]
    # bind parameters too long for the URL travel as multipart/form-data
    assert client.query("SELECT length({p:String})", parameters={"p": "x" * 20_000}).result_rows == [
        (20_000,)
    ]


def test_session_settings_persist_and_url_settings_do_not_leak(endpoint: Endpoint) -> None:
    a = client_from_url(endpoint.url)
    b = client_from_url(endpoint.url)
    a.command("SET max_block_size = 1234")
    a.command("CREATE TEMPORARY TABLE tmp_a (x UInt8)")
    assert a.command("SELECT getSetting('max_block_size')") == 1234
    assert a.command("SELECT getSetting('max_block_size')", settings={"max_block_size": 777}) == 777
    assert a.command("SELECT getSetting('max_block_size')") == 1234  # back to the session's value
    assert b.command("SELECT getSetting('max_block_size')") != 1234  # other session untouched
    assert a.command("EXISTS TEMPORARY TABLE tmp_a") == 1
    assert b.command("EXISTS TEMPORARY TABLE tmp_a") == 0


def test_concurrent_clients(endpoint: Endpoint) -> None:
    setup = client_from_url(endpoint.url)
    setup.command(
        "CREATE TABLE conc (writer UInt8, seq UInt32, v UInt64) ENGINE = MergeTree ORDER BY (writer, seq)"
    )
    errors: list[BaseException] = []
    batches, per_batch = 8, 5_000

    def work(writer: int) -> None:
        try:
            c = client_from_url(endpoint.url)
            for b in range(batches):
                seq = pa.array(range(b * per_batch, (b + 1) * per_batch), pa.uint32())
                tbl = pa.table(
                    {
                        "writer": pa.array([writer] * per_batch, pa.uint8()),
                        "seq": seq,
                        "v": pa.compute.cast(seq, pa.uint64()),
                    }
                )
                c.insert_arrow("conc", tbl)
                got = c.query(
                    "SELECT count(), sum(v) FROM conc WHERE writer = {w:UInt8}", parameters={"w": writer}
                )
                n = (b + 1) * per_batch
                assert got.result_rows[0] == (n, n * (n - 1) // 2)
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert setup.command("SELECT count() FROM conc") == 2 * batches * per_batch


def test_errors_are_clickhouse_errors_and_server_survives(endpoint: Endpoint) -> None:
    client = client_from_url(endpoint.url)
    with pytest.raises(DatabaseError) as info:
        client.query("SELECT * FROM no_such_table")
    assert "Code: 60" in str(info.value) and "UNKNOWN_TABLE" in str(info.value)
    with pytest.raises(DatabaseError, match="SYNTAX_ERROR"):
        client.command("SELEKT 1")

    status, headers, body = _http(f"{endpoint.url}/", data=b"SELEKT 1")
    assert status == 400 and headers["X-ClickHouse-Exception-Code"] == "62"
    assert body.startswith(b"Code: 62. DB::Exception: ") and b"(SYNTAX_ERROR)" in body
    status, headers, body = _http(f"{endpoint.url}/", data=b"SELECT * FROM no_such_table")
    assert status == 404 and headers["X-ClickHouse-Exception-Code"] == "60"
    status, headers, _ = _http(f"{endpoint.url}/", data=b"SELECT 1; SELECT 2")
    assert status != 200 and headers["X-ClickHouse-Exception-Code"] == "62"
    # a failed insert leaves the connection usable
    status, _, _ = _http(_q(endpoint, "INSERT INTO no_such_table FORMAT CSV"), data=b"1,2\n")
    assert status == 404
    assert _http(_q(endpoint, "SELECT 1"))[2] == b"1\n"
    assert client.command("SELECT 1") == 1


def test_insert_deduplication_token(endpoint: Endpoint) -> None:
    client = client_from_url(endpoint.url)
    client.command(
        "CREATE TABLE dedup (k UInt32) ENGINE = MergeTree ORDER BY k "
        "SETTINGS non_replicated_deduplication_window = 100"
    )

    def batch(start: int) -> pa.Table:
        return pa.table({"k": pa.array(range(start, start + 1000), pa.uint32())})

    client.insert_arrow("dedup", batch(0), settings={"insert_deduplication_token": "load-p0-o0"})
    client.insert_arrow("dedup", batch(0), settings={"insert_deduplication_token": "load-p0-o0"})  # a retry
    assert client.command("SELECT count() FROM dedup") == 1000
    client.insert_arrow("dedup", batch(1000), settings={"insert_deduplication_token": "load-p0-o1"})
    assert client.command("SELECT count() FROM dedup") == 2000
    # the token must not stick to later inserts of the same session
    client.insert_arrow("dedup", batch(2000))
    client.insert_arrow("dedup", batch(3000))
    assert client.command("SELECT count() FROM dedup") == 4000


def test_insert_select_from_input(endpoint: Endpoint) -> None:
    """``INSERT ... SELECT ... FROM input('<structure>') FORMAT X`` with the data in the body, as on a
    server (the loader's JSONEachRow path): transformed on the way in, deduplicated by token, and a
    ``throwIf`` in the SELECT refuses the whole insert."""
    client = client_from_url(endpoint.url)
    client.command(
        "CREATE TABLE from_input (k UInt32, name String) ENGINE = MergeTree ORDER BY k "
        "SETTINGS non_replicated_deduplication_window = 100"
    )
    sql = (
        "INSERT INTO from_input (k, name) SELECT k * 10, upper(name) FROM input('k UInt32, name String') "
        "WHERE throwIf(name = 'bad', 'a bad row') = 0 FORMAT JSONEachRow"
    )
    body = b'{"k": 1, "name": "a"}\n{"k": 2, "name": "b", "extra": [1]}'
    settings = {"input_format_skip_unknown_fields": 1, "insert_deduplication_token": "tok-1"}
    client.command(sql, data=body, settings=settings)
    client.command(sql, data=body, settings=settings)  # a retry: dropped
    assert client.query("SELECT k, name FROM from_input ORDER BY k").result_rows == [(10, "A"), (20, "B")]
    with pytest.raises(DatabaseError) as info:
        client.command(sql, data=b'{"k": 3, "name": "c"}\n{"k": 4, "name": "bad"}', settings=settings)
    assert info.value.code == 395  # FUNCTION_THROW_IF_VALUE_IS_NON_ZERO
    assert client.command("SELECT count() FROM from_input") == 2


@pytest.mark.fault
def test_rejected_insert_is_an_error(endpoint: Endpoint) -> None:
    """A row the table rejects after parsing (CHECK constraint, an exception in a materialized view) fails
    the insert with ClickHouse's code, as on a server; a rejected block is not written. chDB's streaming
    insert reported success here and dropped the rows silently."""
    client = client_from_url(endpoint.url)
    client.command(
        "CREATE TABLE checked (k UInt32, kind String, CONSTRAINT known_kind CHECK kind IN ('a', 'b')) "
        "ENGINE = MergeTree ORDER BY k"
    )
    rows = pa.table({"k": pa.array([1, 2, 3], pa.uint32()), "kind": pa.array(["a", "bogus", "b"])})
    with pytest.raises(DatabaseError) as info:
        client.insert_arrow("checked", rows)
    assert info.value.code == 469 and "known_kind" in str(info.value)  # VIOLATED_CONSTRAINT
    with pytest.raises(DatabaseError, match="VIOLATED_CONSTRAINT"):
        client.insert("checked", [[4, "bogus"]], column_names=["k", "kind"])  # Native format
    status, headers, _ = _http(_q(endpoint, "INSERT INTO checked FORMAT CSV"), data=b"5,bogus\n")
    assert status == 500 and headers["X-ClickHouse-Exception-Code"] == "469"
    assert client.command("SELECT count() FROM checked") == 0

    # an exception in a materialized view fails the insert too (the source keeps the block, as on a server)
    client.command("CREATE TABLE src (k UInt32) ENGINE = MergeTree ORDER BY k")
    client.command("CREATE TABLE dst (k UInt32) ENGINE = MergeTree ORDER BY k")
    client.command(
        "CREATE MATERIALIZED VIEW src_mv TO dst AS SELECT k + throwIf(k = 7, 'seven') AS k FROM src"
    )
    with pytest.raises(DatabaseError, match="while pushing to view") as info:
        client.insert_arrow("src", pa.table({"k": pa.array([6, 7], pa.uint32())}))
    assert info.value.name == "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO"
    assert client.command("SELECT count() FROM dst") == 0
    client.insert_arrow("checked", rows.filter(pa.array([True, False, True])))
    assert client.command("SELECT count() FROM checked") == 2


# ------------------------------------------------------------------------------------------------ auth
def test_auth_off_accepts_anyone(endpoint: Endpoint) -> None:
    assert _http(_q(endpoint, "SELECT 1"))[0] == 200


def test_auth_on(auth_endpoint: Endpoint) -> None:
    ep = auth_endpoint
    assert _http(f"{ep.url}/ping")[2] == b"Ok.\n"  # health checks need no credentials
    status, headers, _ = _http(_q(ep, "SELECT 1"))
    assert status == 401 and headers["X-ClickHouse-Exception-Code"] == "194"
    status, headers, body = _http(_q(ep, "SELECT 1", user="loader", password="wrong"))
    assert (
        status == 403 and headers["X-ClickHouse-Exception-Code"] == "516" and b"AUTHENTICATION_FAILED" in body
    )

    assert _http(_q(ep, "SELECT 1", user="loader", password=PASSWORD))[2] == b"1\n"
    assert (
        _http(_q(ep, "SELECT 2"), headers={"X-ClickHouse-User": "loader", "X-ClickHouse-Key": PASSWORD})[2]
        == b"2\n"
    )
    basic = base64.b64encode(f"loader:{PASSWORD}".encode()).decode()
    assert _http(_q(ep, "SELECT 3"), headers={"Authorization": f"Basic {basic}"})[2] == b"3\n"

    quoted = urllib.parse.quote(PASSWORD, safe="")
    url = f"http://loader:{quoted}@127.0.0.1:{ep.port}"
    assert "***" in redact_url(url) and quoted not in redact_url(url)
    assert client_from_url(url).command("SELECT 4") == 4
    with pytest.raises(DatabaseError, match="516"):
        client_from_url(f"http://loader:nope@127.0.0.1:{ep.port}")


def test_readonly_user_reads_only_on_get_and_post(auth_endpoint: Endpoint) -> None:
    ep = auth_endpoint
    full = client_from_url(f"http://loader:{urllib.parse.quote(PASSWORD, safe='')}@127.0.0.1:{ep.port}")
    full.command("CREATE DATABASE IF NOT EXISTS ro_test")
    full.command("CREATE TABLE IF NOT EXISTS ro_test.t (n UInt8) ENGINE = MergeTree ORDER BY n")
    full.command("INSERT INTO ro_test.t VALUES (1)")
    ro = client_from_url(f"http://bi:{RO_PASSWORD}@127.0.0.1:{ep.port}/ro_test")
    assert ro.query("SELECT sum(n) FROM t WHERE n = {n:UInt8}", parameters={"n": 1}).result_rows == [(1,)]
    for sql in (
        "INSERT INTO t VALUES (2)",
        "CREATE TABLE t2 (n UInt8) ENGINE = Memory",
        "DROP TABLE t",
        "TRUNCATE TABLE t",
        "ALTER TABLE t DELETE WHERE 1",
        "SET max_block_size = 1",
        "SELECT * FROM file('/etc/hostname', 'LineAsString')",
    ):
        with pytest.raises(DatabaseError, match="164|READONLY"):
            ro.command(sql)
        # a POST with readonly=0 in the URL is still read-only
        status, headers, _ = _http(f"{ep.url}/?readonly=0&user=bi&password={RO_PASSWORD}", data=sql.encode())
        assert headers.get("X-ClickHouse-Exception-Code") == "164", sql
    with pytest.raises(DatabaseError, match="164|READONLY"):
        ro.insert("t", [[3]], column_names=["n"])
    status, headers, _ = _http(_q(ep, "SELECT 1", user="bi", password="wrong"))
    assert status == 403 and headers["X-ClickHouse-Exception-Code"] == "516"
    assert full.command("SELECT sum(n) FROM ro_test.t") == 1
    full.command("DROP DATABASE ro_test")


# ------------------------------------------------------------------------------------------- lifecycle
def test_data_dir_has_a_single_owner(endpoint: Endpoint) -> None:
    data_dir = endpoint.log_file.parent / "data"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "devstack.chserver",
            "--port",
            str(_free_port()),
            "--data-dir",
            str(data_dir),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 1 and b"already owned" in proc.stderr
    assert _http(_q(endpoint, "SELECT 1"))[2] == b"1\n"  # the owner is unaffected


def test_sigterm_finishes_running_query_then_exits_cleanly(tmp_path: Path) -> None:
    ep = _start(tmp_path)
    result: dict[str, object] = {}

    def slow() -> None:
        result["rows"] = (
            client_from_url(ep.url).query("SELECT sum(sleepEachRow(0.3)) FROM numbers(4)").result_rows
        )

    client_from_url(ep.url)  # connect before the signal
    worker = threading.Thread(target=slow)
    worker.start()
    time.sleep(0.4)
    ep.proc.send_signal(signal.SIGTERM)
    worker.join(30)
    assert result.get("rows") == [(0,)]
    _stop(ep)  # exit code 0, chDB closed
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{ep.url}/ping", timeout=5)


def test_wait_healthy_times_out_on_a_closed_port() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        wait_healthy(f"http://127.0.0.1:{_free_port()}", 0.5)
    assert time.monotonic() - started < 5


def test_statement_parsing() -> None:
    fmts = {
        "native": "Native",
        "arrow": "Arrow",
        "csv": "CSV",
        "json": "JSON",
        "tabseparated": "TabSeparated",
    }
    st = parse_statement("INSERT INTO t (a, `format`) FORMAT Arrow", b"\x00ARROW", fmts, fmts)
    assert (st.sql, st.insert_format, st.data) == ("INSERT INTO t (a, `format`) ", "Arrow", b"\x00ARROW")
    st = parse_statement(None, b"INSERT INTO db.t FORMAT Native\n\x01\x02\n", fmts, fmts)
    assert (st.sql, st.insert_format, st.data) == ("INSERT INTO db.t ", "Native", b"\x01\x02\n")
    st = parse_statement("INSERT INTO t VALUES", b"(1, 'FORMAT CSV;')", fmts, fmts)
    assert st.insert_format is None and st.sql == "INSERT INTO t VALUES\n(1, 'FORMAT CSV;')"
    st = parse_statement(None, b"SELECT 'a;b' AS format -- FORMAT CSV\nFROM t FORMAT JSON;", fmts, fmts)
    assert (st.kind, st.output_format) == ("SELECT", "JSON")
    assert parse_statement(None, b"CREATE TEMPORARY TABLE x (a UInt8)", fmts, fmts).temporary
    # INSERT ... SELECT ... FROM input(...) FORMAT X: the body is the data; the spans name input(
    sql = "INSERT INTO t (a) SELECT upper(a) FROM input('a String') WHERE a != 'FORMAT CSV' FORMAT CSV"
    st = parse_statement(sql, b"x\n", fmts, fmts)
    assert (st.sql, st.insert_format, st.data) == (sql[: sql.rindex("FORMAT CSV")], "CSV", b"x\n")
    assert [st.sql.encode()[a:b] for a, b in st.inputs] == [b"input("]
    st = parse_statement(None, b"INSERT INTO t SELECT 1 FORMAT CSV", fmts, fmts)  # no input(): no data
    assert st.insert_format is None and not st.inputs
    for bad in (b"", b"  -- only a comment", b"SELECT 1; SELECT 2"):
        with pytest.raises(ClickHouseError) as info:
            parse_statement(None, bad, fmts, fmts)
        assert info.value.code == 62


# ---------------------------------------------------------------------------------------- server limits
def _raw(ep: Endpoint, head: bytes, *, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``head`` (and whatever follows it) on a fresh socket; (status, whole response until close or
    the end of the first response)."""
    with socket.create_connection(("127.0.0.1", ep.port), timeout=timeout) as s:
        s.sendall(head)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
            head_end = data.find(b"\r\n\r\n")
            if head_end >= 0:
                length = next(
                    (int(line.split(b":", 1)[1]) for line in data[:head_end].split(b"\r\n")
                     if line.lower().startswith(b"content-length:")),
                    None,
                )  # fmt: skip
                if length is not None and len(data) >= head_end + 4 + length:
                    break
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    return int(data[9:12]), data


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _bombs(size: int) -> dict[str, bytes]:
    """Bodies of every request encoding that inflate to ``size`` zero bytes (16 MiB frames, concatenated)."""
    frame = 16 << 20
    zeros = b"\0" * frame
    n = max(1, size // frame)
    deflate = zlib.compressobj(9)
    deflated = deflate.compress(zeros * min(n, 4)) + deflate.flush()  # one zlib stream, up to 64 MiB
    return {
        "gzip": gzip.compress(zeros, 9) * n,
        "deflate": deflated,
        "bz2": bz2.compress(zeros, 9) * n,
        "xz": lzma.compress(zeros) * n,
        "zstd": zstandard.ZstdCompressor(level=19).compress(zeros) * n,
        "lz4": lz4.frame.compress(zeros) * min(n, 16),  # lz4 stops at ~250:1
    }


@pytest.mark.fault
def test_decompression_bombs_are_refused_with_bounded_memory(
    endpoint: Endpoint, limits_endpoint: Endpoint
) -> None:
    # the default cap (128 MiB): a few hundred bytes of bz2 that inflate to 256 MiB
    bomb = bz2.compress(b"\0" * (16 << 20), 9) * 16
    assert len(bomb) < 1000
    status, headers, body = _http(f"{endpoint.url}/", data=bomb, headers={"Content-Encoding": "bz2"})
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (413, "229"), body
    assert b"max_decompressed_bytes" in body and b"(QUERY_IS_TOO_LARGE)" in body

    # every encoding, on a server with a 1 MB cap: 413 and the server's peak memory barely moves
    ep = limits_endpoint
    before = _vm_hwm_kib(ep.proc.pid)
    for enc, data in _bombs(1 << 30).items():
        assert len(data) < 2_000_000, enc  # under max_body_bytes: the decompressed cap is what refuses it
        status, headers, body = _http(f"{ep.url}/", data=data, headers={"Content-Encoding": enc})
        assert (status, headers.get("X-ClickHouse-Exception-Code")) == (413, "229"), (enc, body)
    grown_mib = (_vm_hwm_kib(ep.proc.pid) - before) / 1024
    assert grown_mib < 100, f"peak memory grew by {grown_mib:.0f} MiB while refusing bombs"
    # bodies under the cap still work in every encoding
    small = {
        "gzip": gzip.compress(b"SELECT 'ok'"),
        "deflate": zlib.compress(b"SELECT 'ok'"),
        "bz2": bz2.compress(b"SELECT 'ok'"),
        "xz": lzma.compress(b"SELECT 'ok'"),
        "zstd": zstandard.ZstdCompressor().compress(b"SELECT 'ok'"),
        "lz4": lz4.frame.compress(b"SELECT 'ok'"),
    }
    for enc, data in small.items():
        assert _http(f"{ep.url}/", data=data, headers={"Content-Encoding": enc})[2] == b"ok\n", enc
    # a plain body over the decompressed cap is refused too
    status, _, _ = _http(f"{ep.url}/", data=b"SELECT 1 -- " + b"x" * 1_500_000)
    assert status == 413


@pytest.mark.fault
def test_declared_huge_body_and_ambiguous_framing_are_refused(
    endpoint: Endpoint, limits_endpoint: Endpoint
) -> None:
    host = f"Host: 127.0.0.1:{endpoint.port}\r\n".encode()
    started = time.monotonic()
    status, resp = _raw(endpoint, b"POST / HTTP/1.1\r\n" + host + b"Content-Length: 1000000000\r\n\r\n")
    assert status == 413 and b"max_body_bytes" in resp and b"Connection: close" in resp
    assert time.monotonic() - started < 5  # answered without waiting for the body
    expect = b"POST / HTTP/1.1\r\n" + host + b"Content-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n"
    assert _raw(endpoint, expect)[0] == 413  # no "100 Continue" for a body that would be refused

    for framing in (
        b"Transfer-Encoding: chunked\r\nContent-Length: 8\r\n",
        b"Content-Length: 8\r\nTransfer-Encoding: chunked\r\n",
        b"Content-Length: 8\r\nContent-Length: 8\r\n",
        b"Content-Length: 8\r\nContent-Length: 9\r\n",
        b"Content-Length: 8, 8\r\n",
        b"Content-Length: -8\r\n",
        b"Transfer-Encoding: gzip, chunked\r\n",
    ):
        status, resp = _raw(
            endpoint, b"POST / HTTP/1.1\r\n" + host + framing + b"\r\n8\r\nSELECT 1\r\n0\r\n\r\n"
        )
        assert status == 400 and b"Connection: close" in resp, (framing, resp)
    # chunked bodies: a chunk over the cap, a negative chunk size
    lhost = f"Host: 127.0.0.1:{limits_endpoint.port}\r\n".encode()
    chunked = b"POST / HTTP/1.1\r\n" + lhost + b"Transfer-Encoding: chunked\r\n\r\n"
    assert _raw(limits_endpoint, chunked + b"10000000\r\n")[0] == 413
    assert _raw(limits_endpoint, chunked + b"-1\r\n")[0] == 400
    assert _raw(limits_endpoint, chunked + b"8\r\nSELECT 1\r\n0\r\n\r\n")[1].endswith(b"\r\n\r\n1\n")
    assert _http(_q(endpoint, "SELECT 1"))[2] == b"1\n"  # the server is fine


@pytest.mark.fault
def test_execution_time_and_result_size_have_server_side_maxima(
    endpoint: Endpoint, limits_endpoint: Endpoint
) -> None:
    defaults = _http(_q(endpoint, "SELECT getSetting('max_execution_time'), getSetting('max_result_bytes')"))
    assert defaults[2] == b"60\t268435456\n"

    ep = limits_endpoint
    sleepy = "SELECT sleepEachRow(0.5) FROM numbers(10) SETTINGS max_block_size = 1"
    status, headers, body = _http(f"{ep.url}/", data=sleepy.encode())
    assert headers["X-ClickHouse-Exception-Code"] == "159", body  # TIMEOUT_EXCEEDED after 1 s
    for _ in range(5):  # the connections that ran it answer the next queries correctly
        assert _http(_q(ep, "SELECT 42"))[2] == b"42\n"
    status, headers, body = _http(_q(ep, "SELECT number FROM numbers(1000000)"))
    assert headers["X-ClickHouse-Exception-Code"] == "396", body  # TOO_MANY_ROWS_OR_BYTES

    # per request, up to the server's maxima, as a ClickHouse settings constraint would allow
    ok = _http(_q(ep, "SELECT number FROM numbers(300000)", max_result_bytes="3000000"))
    assert ok[0] == 200 and len(ok[2].splitlines()) == 300_000
    assert _http(f"{ep.url}/?max_execution_time=2.5", data=b"SELECT sleep(1.5)")[0] == 200
    for bad in (
        _q(ep, "SELECT 1", max_result_bytes="0"),
        _q(ep, "SELECT 1", max_result_bytes="5000000"),
        _q(ep, "SELECT 1", max_execution_time="4"),
        _q(ep, "SELECT 1 SETTINGS max_execution_time = 0"),
        _q(ep, "SELECT 1 SETTINGS max_result_bytes = '1e12'"),
    ):
        status, headers, body = _http(bad)
        assert headers["X-ClickHouse-Exception-Code"] == "452", (bad, body)  # SETTING_CONSTRAINT_VIOLATION
    client = client_from_url(ep.url)
    with pytest.raises(DatabaseError, match="452"):
        client.command("SET max_execution_time = 0")
    with pytest.raises(DatabaseError, match="452"):
        client.command("SET max_execution_time = DEFAULT")
    client.command("SET max_execution_time = 2")
    assert client.command("SELECT getSetting('max_execution_time')") == 2


@pytest.mark.fault
def test_get_is_readonly_without_files_network_or_set(endpoint: Endpoint, tmp_path: Path) -> None:
    target = tmp_path / "out.tsv"
    for sql in (
        f"SELECT number FROM numbers(3) INTO OUTFILE '{target}'",
        "SELECT * FROM file('/etc/hostname', 'LineAsString')",
        "SELECT * FROM `file`('/etc/hostname', 'LineAsString')",
        "SELECT file('/etc/hostname')",
        "SELECT * FROM url('http://127.0.0.1:1/x.csv', 'CSV', 'a String')",
        "DESCRIBE TABLE s3('http://127.0.0.1:1/b/x.csv')",
        "SELECT * FROM remote('127.0.0.1:1', system.one)",
        "SELECT * FROM executable('x.sh', 'TSV', 'a String')",
        "SET max_block_size = 1",
    ):
        status, headers, body = _http(_q(endpoint, sql))
        assert headers.get("X-ClickHouse-Exception-Code") == "164", (sql, body)  # READONLY
    assert not target.exists()
    # reading the server's own tables still works, table functions that make up data too
    assert _http(_q(endpoint, "SELECT count() FROM numbers(5)"))[2] == b"5\n"
    assert _http(_q(endpoint, "SELECT count() FROM system.one WHERE 'file(' != ''"))[2] == b"1\n"


@pytest.mark.fault
def test_foreign_host_and_origin_are_refused(endpoint: Endpoint, limits_endpoint: Endpoint) -> None:
    ep = endpoint
    for headers in (
        {"Host": "evil.example"},  # DNS rebinding: a page on evil.example resolved to 127.0.0.1
        {"Host": f"evil.example:{ep.port}"},
        {"Host": "192.168.1.10"},
        {"Origin": "http://evil.example"},  # cross-site request from a browser
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
    ):
        for url in (_q(ep, "SELECT 1"), f"{ep.url}/ping"):
            status, got, body = _http(url, headers=headers)
            assert (status, got.get("X-ClickHouse-Exception-Code")) == (403, "497"), (headers, body)
        assert (
            _http(f"{ep.url}/", data=b"CREATE TABLE csrf (a UInt8) ENGINE = Memory", headers=headers)[0]
            == 403
        )
    for headers in (
        {"Host": f"localhost:{ep.port}"},
        {"Host": "127.0.0.1"},
        {"Host": f"[::1]:{ep.port}"},
        {"Origin": f"http://localhost:{ep.port}"},
        {"Origin": "http://127.0.0.1:3000", "Sec-Fetch-Site": "same-site"},
    ):
        assert _http(_q(ep, "SELECT 1"), headers=headers)[2] == b"1\n", headers
    assert _http(_q(limits_endpoint, "SELECT 1"), headers={"Host": "ch.internal:8123"})[2] == b"1\n"
    assert _http(_q(limits_endpoint, "SELECT 1"), headers={"Host": "evil.example"})[0] == 403


def _drip(ep: Endpoint, stop: threading.Event, closed: threading.Event) -> None:
    """A slowloris client: a request head one byte every 0.2 s, never finished; sets ``closed`` when the
    server hangs up on it (or answers it)."""
    head = f"GET /?query=SELECT+1 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: {'a' * 1000}".encode()
    with socket.create_connection(("127.0.0.1", ep.port), timeout=5) as s:
        for i in range(len(head)):
            try:
                s.sendall(head[i : i + 1])
                s.setblocking(False)
                try:
                    s.recv(1024)  # b"" (closed) or a response: either way the server is done with us
                    closed.set()
                    return
                except BlockingIOError:
                    pass
                finally:
                    s.setblocking(True)
            except OSError:
                closed.set()
                return
            if stop.wait(0.2):
                return


@pytest.mark.fault
def test_idle_sockets_and_slow_clients_do_not_stop_others(
    endpoint: Endpoint, limits_endpoint: Endpoint
) -> None:
    # 500 idle connections and a byte-dripping client on the default server: a query still answers fast
    stop, closed = threading.Event(), threading.Event()
    idle: list[socket.socket] = []
    dripper = threading.Thread(target=_drip, args=(endpoint, stop, closed), daemon=True)
    try:
        for _ in range(500):
            idle.append(socket.create_connection(("127.0.0.1", endpoint.port), timeout=5))
        dripper.start()
        started = time.monotonic()
        assert _http(_q(endpoint, "SELECT 1"))[2] == b"1\n"
        assert client_from_url(endpoint.url).command("SELECT 2") == 2
        assert time.monotonic() - started < 5
    finally:
        stop.set()
        dripper.join(10)
        for s in idle:
            s.close()

    # with a 1.5 s receive timeout the dripper is cut off, and an idle socket is closed after 1.5 s
    ep = limits_endpoint
    stop, closed = threading.Event(), threading.Event()
    dripper = threading.Thread(target=_drip, args=(ep, stop, closed), daemon=True)
    started = time.monotonic()
    dripper.start()
    with socket.create_connection(("127.0.0.1", ep.port), timeout=10) as quiet:
        assert quiet.recv(1) == b""  # closed by the server (a timeout here would raise)
        assert time.monotonic() - started < 8
    assert closed.wait(10), "the slowloris client was never cut off"
    stop.set()
    dripper.join(10)
    assert time.monotonic() - started < 10
    assert _http(_q(ep, "SELECT 1"))[2] == b"1\n"


@pytest.mark.fault
def test_connections_over_max_connections_get_503(limits_endpoint: Endpoint) -> None:
    ep = limits_endpoint
    held = [socket.create_connection(("127.0.0.1", ep.port), timeout=5) for _ in range(40)]
    try:
        status, resp = _raw(ep, b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert status == 503 and b"max_connections" in resp
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 10
    while _raw(ep, b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")[0] != 200:
        assert time.monotonic() < deadline, "slots were not freed after the clients left"
        time.sleep(0.1)
