"""Storage faults are mapped at the database boundary to DatabaseUnavailable (503).

Real databases: a SQLite file opened read-only (a write fails as SQLite does on a full
or read-only disk), and a PostgreSQL address where nothing listens. The full-disk case
over HTTP is tests/integration/test_disk_full.py.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from coordinator.db import DatabaseUnavailable, WriteHealth, make_engine
from coordinator.errors import StorageUnavailable


def test_a_sqlite_write_that_cannot_land_is_unavailable_and_marks_health(tmp_path):
    path = tmp_path / "db.sqlite"
    writer = make_engine(f"sqlite:///{path}")
    with writer.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER PRIMARY KEY)"))
    writer.dispose()
    engine = make_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    health = WriteHealth()
    health.watch(engine)
    with pytest.raises(DatabaseUnavailable) as info, engine.begin() as conn:
        conn.execute(text("INSERT INTO t VALUES (1)"))
    assert isinstance(info.value, StorageUnavailable) and "readonly" in info.value.message
    assert health.degraded and "readonly" in health.detail
    engine.dispose()


def test_a_constraint_violation_is_not_a_storage_fault(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER PRIMARY KEY)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(text("INSERT INTO t VALUES (1)"))
    engine.dispose()


def test_a_postgresql_server_that_does_not_answer_is_unavailable():
    engine = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/none", connect_args={"connect_timeout": 2})
    with pytest.raises(DatabaseUnavailable), engine.connect():
        pass
    engine.dispose()


def test_health_recovers_on_a_committed_write_or_after_the_hold(tmp_path):
    now = [0.0]
    health = WriteHealth(hold_seconds=60, clock=lambda: now[0])
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    health.watch(engine)
    health._failed_at, health.detail = 0.0, "disk full"
    assert health.degraded
    now[0] = 61.0
    assert not health.degraded  # nothing wrote for a while: no longer claimed
    health._failed_at = 61.0
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    assert not health.degraded  # a write committed: the disk takes writes again
    engine.dispose()
