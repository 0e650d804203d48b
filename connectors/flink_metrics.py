"""Read a running job's counters from Flink's REST API and log them as one line, periodically.

Works against the local mini-cluster (the job's driver sets ``rest.port``) and a real JobManager.
User counters are the ``clickpulse.*`` metrics registered by our Python UDFs (summed over subtasks);
``duplicates`` is what the SQL ``Deduplicate`` operator read minus what it wrote.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

_DEDUP = re.compile(r"^Deduplicate\[\d+\]\.numRecords(In|Out)$")

log = logging.getLogger(__name__)


def rest_get(url: str, timeout_s: float = 5.0) -> Any:
    """The JSON document at ``url`` of Flink's REST API (raises ``OSError``/``ValueError`` on failure)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 - loopback/JobManager URL
        return json.loads(r.read())


def job_counters(rest_url: str) -> dict[str, int]:
    """Counters of the first RUNNING (or last) job: ``clickpulse.*`` sums plus dedup in/out."""
    jobs = rest_get(f"{rest_url}/jobs/overview").get("jobs", [])
    if not jobs:
        return {}
    job = next((j for j in jobs if j.get("state") == "RUNNING"), jobs[-1])
    detail = rest_get(f"{rest_url}/jobs/{job['jid']}")
    out: dict[str, int] = {}
    for v in detail.get("vertices", []):
        base = f"{rest_url}/jobs/{job['jid']}/vertices/{v['id']}/subtasks/metrics"
        names = [m["id"] for m in rest_get(base) if ".clickpulse." in m["id"] or _DEDUP.match(m["id"])]
        if not names:
            continue
        query = urllib.parse.urlencode({"get": ",".join(names), "agg": "sum"})
        for m in rest_get(f"{base}?{query}"):
            dedup = _DEDUP.match(m["id"])
            key = ("dedup_" + dedup.group(1).lower()) if dedup else m["id"].split(".clickpulse.", 1)[1]
            out[key] = out.get(key, 0) + int(float(m.get("sum", 0)))
    if "dedup_in" in out:
        out["duplicates"] = out["dedup_in"] - out["dedup_out"]
    return out


def format_line(job: str, counters: dict[str, int]) -> str:
    """``job: k=v k=v …`` with a stable order."""
    return f"{job}: " + " ".join(f"{k}={v}" for k, v in sorted(counters.items()))


class CounterLogger(threading.Thread):
    """Daemon thread logging :func:`job_counters` every ``interval_s`` until stopped."""

    def __init__(self, job: str, rest_url: str, interval_s: float = 10.0) -> None:
        """Poll ``rest_url`` for ``job``."""
        super().__init__(name=f"{job}-counters", daemon=True)
        self.job = job
        self.rest_url = rest_url
        self.interval_s = interval_s
        self.stopped = threading.Event()
        self.last: dict[str, int] = {}

    def run(self) -> None:
        """Log until :meth:`stop`."""
        while not self.stopped.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        """Fetch and log once (errors are logged at debug: the job may be starting or gone)."""
        try:
            counters = job_counters(self.rest_url)
        except (OSError, urllib.error.URLError, ValueError, KeyError) as e:
            log.debug("counters unavailable: %s", e)
            return
        if counters:
            self.last = counters
            log.info("%s", format_line(self.job, counters))

    def stop(self) -> None:
        """Stop after the current poll."""
        self.stopped.set()
