"""coordinator.logs: the two line formats, event lines, request ids (the whole run is in
tests/integration/test_logs.py)."""

from __future__ import annotations

import io
import json
import logging

import pytest

from coordinator import logs


@pytest.fixture
def lines():
    """The ``fedsilo.events`` lines written during the test, in both formats."""
    streams = {fmt: io.StringIO() for fmt in logs.FORMATS}
    handlers = []
    for fmt, stream in streams.items():
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logs.JsonFormatter() if fmt == "json" else logs.TextFormatter())
        logs.EVENTS.addHandler(handler)
        handlers.append(handler)
    level, logs.EVENTS.level = logs.EVENTS.level, logging.INFO
    yield lambda fmt: streams[fmt].getvalue().splitlines()
    for handler in handlers:
        logs.EVENTS.removeHandler(handler)
    logs.EVENTS.level = level


def test_an_audit_entry_becomes_one_line_with_its_scalars(lines):
    details = {"reason": "stale", "detail": "too old by 3", "staleness": 9, "name": "hospital-a",
               "schema": [{"name": "w"}]}
    logs.log_event({"seq": 7, "action": "update_rejected", "actor": "silo-1", "subject": "update:u1",
                    "details": json.dumps(details)})
    [record] = map(json.loads, lines("json"))
    assert record["level"] == "WARNING" and record["message"] == "update rejected"
    assert (record["audit_seq"], record["actor"], record["reason"], record["staleness"]) == (7, "silo-1", "stale", 9)
    assert record["details.name"] == "hospital-a" and "schema" not in record  # reserved name kept; nested left out
    [text] = lines("text")
    assert text.endswith('update rejected audit_seq=7 actor=silo-1 subject=update:u1 reason=stale '
                         'detail="too old by 3" staleness=9 details.name=hospital-a')
    assert text[:24].endswith("Z") and text[10] == "T"  # the timestamp leads the line


def test_events_carry_the_request_id_of_the_request_that_caused_them(lines):
    token = logs.request_id.set("abc123")
    try:
        logs.event("helper_unreachable", logging.WARNING, url="https://helper.example", level=3)
    finally:
        logs.request_id.reset(token)
    [record] = map(json.loads, lines("json"))
    assert (record["request_id"], record["action"], record["url"], record["level"]) == (
        "abc123", "helper_unreachable", "https://helper.example", "WARNING")
    assert record["details.level"] == 3  # a field may not pass for the line's own level


def test_logging_config_names_a_known_format():
    assert logs.logging_config("json")["formatters"]["fedsilo"]["()"].endswith("JsonFormatter")
    with pytest.raises(ValueError):
        logs.logging_config("xml")
