"""README's faults table from a recorded run (``devstack.faultreport``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from devstack import faultreport

pytestmark = pytest.mark.unit

CHAOS = {
    "date": "2026-12-06T03:36:06+00:00", "raw_records": 80000, "rate_achieved": 1991,
    "duplicates_in_input": 2400, "malformed_in_input": 1600, "jobs": ["pipeline", "dispatch", "load"],
    "restarts": [{"service": "kafka", "seconds": 13.1, "at_record": 12000}], "unique_valid": 76000,
    "sessions": 10739, "actions_fired": 2397, "webhook_requests": 2397, "records_lost": 0,
    "records_duplicated": 0, "sessions_lost": 0, "sessions_extra": 0, "session_versions_published_twice": 0,
    "actions_lost": 0, "actions_dead_lettered": 0, "webhooks_wrongly_signed": 0,
    "identity_differs_from_truth": 0, "late_unexpected": 3,
}  # fmt: skip


def test_rows_per_family_from_the_run_with_failures_and_unknown_modules() -> None:
    run = {
        "date": "2026-12-06T03:40:00+00:00",
        "tests": {
            "tests/integration/test_loader.py::test_topic_recreated": {
                "outcome": "passed",
                "duration_s": 3.0,
            },
            "tests/integration/test_loader.py::test_crash_while_bisecting": {
                "outcome": "failed",
                "duration_s": 2,
            },
            "tests/unit/test_secret_env.py::test_x[A]": {"outcome": "passed", "duration_s": 0.1},
            "tests/integration/test_new_things.py::test_y": {"outcome": "passed", "duration_s": 1},
            "tests/integration/test_chaos.py::test_z": {"outcome": "passed", "duration_s": 200},
        },
    }
    table = faultreport.render(run, CHAOS)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "1 / 2 (**1 failed**)" in rows["loader"]
    assert "1 / 1" in rows["webhook signing and verification"]
    assert "not in this run" in rows["dispatch backpressure"]  # its tests are not merged yet
    assert "1 / 1" in rows["test_new_things"]  # a fault module no family names gets its own row
    assert "80,000 simulated raw records at 1,991/s" in rows["chaos: services restarted under load"]
    assert "kafka (13.1 s)" in rows["chaos: services restarted under load"]
    assert "records lost **0**, duplicated **0**" in table and "wrongly signed **0**" in table
    assert "on-time events turned late: 3" in table


def test_write_replaces_only_the_marked_section(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\nbefore\n{faultreport.START}\nold table\n{faultreport.END}\nafter\n")
    faultreport.write_chaos_summary(CHAOS, tmp_path)
    assert faultreport.main(["--write", "--dir", str(tmp_path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\nbefore\n") and text.endswith(f"{faultreport.END}\nafter\n")
    assert "old table" not in text and "records lost **0**" in text
    assert faultreport.main(["--dir", str(tmp_path / "none")]) == 1  # nothing recorded: says so
