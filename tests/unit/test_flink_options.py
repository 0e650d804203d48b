"""``CLICKPULSE_FLINK_OPTIONS``: Flink configuration clickpulse has no setting for, passed through."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from connectors.flink import FlinkSettings, parse_flink_options

pytestmark = pytest.mark.unit


def test_entries_split_on_semicolons_and_newlines_and_keep_equals_signs_in_values() -> None:
    text = (
        " state.backend.rocksdb.compaction.style = UNIVERSAL ;\n"
        "env.java.opts.taskmanager=-Da=b -Dc=d\n\n;"
        "state.backend.rocksdb.thread.num=2"
    )
    assert parse_flink_options(text) == {
        "state.backend.rocksdb.compaction.style": "UNIVERSAL",
        "env.java.opts.taskmanager": "-Da=b -Dc=d",
        "state.backend.rocksdb.thread.num": "2",
    }
    assert parse_flink_options("") == {}
    assert parse_flink_options(" ; \n ") == {}


@pytest.mark.parametrize("bad", ["state.backend.rocksdb.compaction.style", "=UNIVERSAL", "a=1;b"])
def test_an_entry_without_a_key_and_value_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="key=value"):
        parse_flink_options(bad)
    with pytest.raises(ValidationError, match="key=value"):
        FlinkSettings.from_env({"CLICKPULSE_FLINK_OPTIONS": bad})


def test_the_settings_hand_the_options_over_as_a_mapping() -> None:
    s = FlinkSettings.from_env({"CLICKPULSE_FLINK_OPTIONS": "state.backend.rocksdb.thread.num=4"})
    assert s.extra_options() == {"state.backend.rocksdb.thread.num": "4"}
    assert FlinkSettings.from_env({}).extra_options() == {}
