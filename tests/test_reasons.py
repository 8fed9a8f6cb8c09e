"""The wire reason codes are total: every code has a status, a message, a place in the
OpenAPI ``Error`` schema, a row in docs/protocol.md §7 and a course in the silo; every
foreign error the ingest pipeline can meet translates into one."""

from __future__ import annotations

import re
from http import HTTPStatus
from pathlib import Path

import pytest

from coordinator.errors import InternalFault
from coordinator.openapi import build_spec
from coordinator.rejections import TRANSLATION, translate
from coordinator.strategies import StrategyError, StrategyReason
from privacy.errors import PrivacyError
from privacy.errors import Reason as PrivacyReason
from privacy.reasons import Reason, known
from silo_node.daemon import ON_REJECTION, OnRejection, on_rejection

PROTOCOL = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


@pytest.mark.parametrize("reason", list(Reason))
def test_every_code_has_an_error_status_and_a_message(reason: Reason) -> None:
    assert reason.status in {s.value for s in HTTPStatus} and reason.status >= 400
    assert reason.message.strip() and reason.message != reason.value
    assert re.fullmatch(r"[a-z][a-z0-9_]*", reason.value)


def test_the_openapi_error_schema_lists_every_code() -> None:
    error = build_spec([])["components"]["schemas"]["Error"]
    assert error["properties"]["reason"]["enum"] == [r.value for r in Reason]


def _protocol_table() -> list[tuple[str, int]]:
    """The rows of protocol.md's reason-code table, in order."""
    text = PROTOCOL.read_text(encoding="utf-8")
    section = text.split("## 7. Errors and reason codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_0-9]+)` \| (\d{3}) \|", section, flags=re.MULTILINE)
    return [(code, int(status)) for code, status in rows]


def test_the_protocol_table_is_the_enum() -> None:
    table = _protocol_table()
    assert len(table) > 10  # the parse found the table, not nothing
    assert table == [(r.value, r.status) for r in Reason]


def test_the_silo_classifies_every_code() -> None:
    assert set(ON_REJECTION) == set(Reason)
    assert on_rejection("revoked") is OnRejection.FATAL
    assert on_rejection("budget_exceeded") is OnRejection.BUDGET
    assert on_rejection("stale") is OnRejection.NEXT_ROUND
    assert on_rejection("http_403") is OnRejection.NEXT_ROUND  # not the coordinator's answer
    assert known("stale") is Reason.STALE and known("http_403") is None


def test_the_silo_guide_lists_the_daemons_course_for_every_code() -> None:
    text = (PROTOCOL.parent / "silo.md").read_text(encoding="utf-8")
    heads = {"stop, exit 1": OnRejection.FATAL, "stop, exit 0": OnRejection.BUDGET, "next round": OnRejection.NEXT_ROUND}
    documented = {}
    for item in re.findall(r"^- \*\*(.+?)\*\*(.*?)(?=^- |^\n)", text, flags=re.MULTILINE | re.DOTALL):
        head, body = item
        if head in heads:
            documented[heads[head]] = set(re.findall(r"`([a-z_]+)`", body))
    assert set(documented) == set(OnRejection)
    for course, codes in documented.items():
        assert codes == {r.value for r, c in ON_REJECTION.items() if c is course}, course


@pytest.mark.parametrize("foreign", [*PrivacyReason, *StrategyReason])
def test_every_foreign_error_translates(foreign: PrivacyReason | StrategyReason) -> None:
    assert foreign in TRANSLATION
    exc = PrivacyError(foreign, "x") if isinstance(foreign, PrivacyReason) else StrategyError(foreign, "x")
    refusal = translate(exc)
    assert isinstance(refusal.reason, Reason) and refusal.detail == "x"
    assert 400 <= refusal.reason.status < 500  # a recorded refusal, never a fault


def test_internal_faults_share_one_root() -> None:
    from coordinator.audit import AuditError
    from coordinator.db import DatabaseError
    from coordinator.model_store import StorageCorrupted

    for fault in (AuditError, DatabaseError, StorageCorrupted):
        assert issubclass(fault, InternalFault)
