"""The triggers job's Flink state formats, pinned byte for byte.

``triggers-user-state-v1`` holds ``dump_state`` text and ``triggers-rule-records-v1`` holds
``encode_rule_record`` text; savepoints depend on both, so any change here is a breaking change that
belongs in CHANGELOG.md (and a new ``"v"``).
"""

from __future__ import annotations

import pytest

from udfs.rules import (
    CountState,
    GroupState,
    ReturningState,
    RuleRecord,
    SequenceState,
    UserState,
    decode_rule_record,
    dump_state,
    encode_rule_record,
    load_state,
)

pytestmark = pytest.mark.unit

STATE = UserState(
    user_key="u-1",
    rules={
        "deal_promo": CountState(
            "0123456789abcdef",
            {
                '["LAS-DEC"]': GroupState(hits=((1000, "m1"), (2000, "m2")), max_ts=2000),
                '["NYC"]': GroupState(hits=(), max_ts=500, last_fired_ms=400),
            },
        ),
        "cart_abandoned": SequenceState("fedcba9876543210", 3000, "m3", None),
        "returning_visitor": ReturningState("00ff00ff00ff00ff", 4000, 100),
    },
)
STATE_BYTES = (
    b'{"v":1,"u":"u-1","r":{"deal_promo":["c","0123456789abcdef",'
    b'{"[\\"LAS-DEC\\"]":[2000,null,[[1000,"m1"],[2000,"m2"]]],"[\\"NYC\\"]":[500,400,[]]}],'
    b'"cart_abandoned":["s","fedcba9876543210",3000,"m3",null],'
    b'"returning_visitor":["r","00ff00ff00ff00ff",4000,100]}}'
)


def test_user_state_bytes_are_pinned() -> None:
    assert dump_state(STATE) == STATE_BYTES
    assert load_state(STATE_BYTES) == STATE
    assert dump_state(UserState()) == b""


@pytest.mark.parametrize(
    ("record", "text"),
    [
        (
            RuleRecord(3, 42, b'{"when": {"returning_after": "7d"}}'),
            '[3,42,"{\\"when\\": {\\"returning_after\\": \\"7d\\"}}"]',
        ),
        (RuleRecord(0, 7, None), "[0,7,null]"),
    ],
)
def test_rule_record_text_is_pinned(record: RuleRecord, text: str) -> None:
    assert encode_rule_record(record) == text
    assert decode_rule_record(text) == record
    assert decode_rule_record(text.encode()) == record
