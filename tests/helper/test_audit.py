"""The helper's audit chain: gapless, and verification names the first edited entry."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import text

from helper import audit
from helper.db import make_engine, session_factory, upgrade

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def test_the_chain_verifies_and_an_edit_is_named(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    factory = session_factory(engine)
    try:
        for i in range(3):
            with factory.begin() as s:
                entry = audit.append(s, actor="test", action="opened", subject=f"buf-{i}", details={"i": i}, now=T0)
                assert entry.seq == i + 1
        with factory.begin() as s:
            assert audit.verify(s) is None
            first = s.execute(text("SELECT prev_hash FROM helper_audit WHERE seq = 1")).scalar_one()
            assert first == audit.GENESIS
            s.execute(text("UPDATE helper_audit SET details = :d WHERE seq = 2"), {"d": '{"i":7}'})
        with factory.begin() as s:
            assert audit.verify(s) == 2
            s.execute(text("DELETE FROM helper_audit WHERE seq >= 2"))
            s.execute(text("UPDATE helper_audit SET hash = :h WHERE seq = 1"), {"h": "0" * 64})
        with factory.begin() as s:
            assert audit.verify(s) == 1
    finally:
        engine.dispose()
