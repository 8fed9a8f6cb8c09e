"""Alembic migrations: up, down, up again, agreement with the models, the audit
table's append-only triggers, concurrent start-up, the packaged alembic.ini."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

import migrations
from coordinator import audit
from coordinator.db import (
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    transaction,
    upgrade,
)
from coordinator.models import Base

APP_TABLES = {
    "federations", "model_versions", "silos", "enrolment_tokens", "updates",
    "privacy_charges", "audit_events", "audit_head", "api_tokens", "fedbuff_buffers", "fedbuff_slices", "optimizer_states",
    "calibration_cache", "calibration_means",
    "merkle_nodes", "checkpoints", "cosignatures", "log_witnesses", "witness_cosignatures",
}
T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
INI = Path(migrations.__file__).parent / "alembic.ini"


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) is None
        upgrade(db_url)
        assert current_revision(engine) == head_revision() == "0009"
        assert APP_TABLES <= _tables(engine)
        with transaction(engine) as s:
            assert audit.get_head(s) == (0, audit.GENESIS_HASH)

        downgrade(db_url, "base")
        assert current_revision(engine) is None
        assert _tables(engine) == {"alembic_version"}
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                fn = conn.exec_driver_sql(
                    "SELECT count(*) FROM pg_proc WHERE proname = 'audit_events_append_only'"
                ).scalar_one()
            assert fn == 0

        upgrade(db_url)
        upgrade(db_url)  # at head: nothing to do
        assert current_revision(engine) == "0009"
        with transaction(engine) as s:
            assert audit.get_head(s) == (0, audit.GENESIS_HASH)
    finally:
        engine.dispose()


def test_models_match_migrations(migrated_engine: sa.Engine) -> None:
    with migrated_engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []


def _one_event(engine: sa.Engine) -> None:
    with transaction(engine) as s:
        audit.append(s, actor="system", action="test", subject="x", details={}, now=T0)


def test_audit_rows_refuse_update_and_delete(migrated_engine: sa.Engine) -> None:
    _one_event(migrated_engine)
    statements = ["UPDATE audit_events SET actor = 'mallory'", "DELETE FROM audit_events"]
    if migrated_engine.dialect.name == "postgresql":
        statements.append("TRUNCATE audit_events")
    for sql in statements:
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            with migrated_engine.begin() as conn:
                conn.exec_driver_sql(sql)
    with transaction(migrated_engine) as s:
        rows = s.execute(sa.text("SELECT seq, actor FROM audit_events")).all()
        assert [tuple(r) for r in rows] == [(1, "system")]
        assert audit.verify(s).ok


def test_concurrent_upgrades_from_several_processes(db_url: str) -> None:
    # Coordinator processes that start together must each find the schema at head.
    # Each process imports, says it is ready, and waits for the go, so the
    # migrations really overlap.
    code = (
        "import sys; from coordinator.db import upgrade; print('ready', flush=True); "
        "sys.stdin.readline(); upgrade(sys.argv[1])"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, db_url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(3)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) == "0009"
        with transaction(engine) as s:
            assert audit.get_head(s) == (0, audit.GENESIS_HASH)
    finally:
        engine.dispose()


def test_packaged_alembic_ini_works_from_any_directory(sqlite_url: str, tmp_path: Path) -> None:
    # The alembic command line with the ini shipped inside the package, run from
    # an unrelated directory, takes the URL from the environment.
    env = {**os.environ, "FEDSILO_DATABASE_URL": sqlite_url}
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(INI), "upgrade", "head"],
        cwd=cwd, env=env, check=True, capture_output=True,
    )
    engine = make_engine(sqlite_url)
    try:
        assert current_revision(engine) == "0009"
    finally:
        engine.dispose()


@pytest.mark.parametrize("url", ["sqlite:///unused.db", "postgresql+psycopg://u@nowhere/db"])
def test_offline_sql_script(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # `alembic upgrade head --sql` renders the DDL without a database, triggers included.
    monkeypatch.setenv("FEDSILO_DATABASE_URL", url)
    out = io.StringIO()
    command.upgrade(Config(str(INI), output_buffer=out), "head", sql=True)
    script = out.getvalue()
    assert "CREATE TABLE audit_events" in script
    assert "audit_events is append-only" in script
    assert "INSERT INTO audit_head" in script


def test_sqlite_keeps_the_model_blob_last_and_its_rows(sqlite_url: str) -> None:
    # Migration 0002: SQLite keeps a zeroblob lazy only in a row's last column, so
    # large versions are written without SQLite's own model-sized copies. Existing
    # rows survive the table's rebuild, blobs included.
    upgrade(sqlite_url, "0001")
    engine = make_engine(sqlite_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO federations (id, name, task_name, task_options, schema, schema_digest, settings, "
                "current_version, buffer_count, buffer_updates, created_at) VALUES "
                "(1, 'f', 't', '{}', '{}', 'd', '{}', 0, 0, '[]', '2026-11-21 10:00:00')"
            )
            conn.exec_driver_sql(
                "INSERT INTO model_versions (federation_id, version, digest, size, blob, created_at, metrics) "
                "VALUES (1, 0, 'd', 3, x'010203', '2026-11-21 10:00:00', '{}')"
            )
        upgrade(sqlite_url)
        columns = [c["name"] for c in sa.inspect(engine).get_columns("model_versions")]
        assert columns[-1] == "blob"
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT version, size, blob FROM model_versions").one() == (0, 3, b"\x01\x02\x03")
        downgrade(sqlite_url, "0001")
        assert [c["name"] for c in sa.inspect(engine).get_columns("model_versions")][4] == "blob"
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgres_stores_model_blobs_uncompressed_out_of_line(postgres_url: str) -> None:
    # Migration 0003: no pglz attempt on every fold, and slice reads fetch only the
    # TOAST chunks they need. Downgrading restores PostgreSQL's default.
    def storage() -> dict[str, str]:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT c.relname || '.' || a.attname, a.attstorage FROM pg_attribute a "
                "JOIN pg_class c ON c.oid = a.attrelid "
                "WHERE (c.relname, a.attname) IN (('model_versions', 'blob'), ('federations', 'buffer_blob'))"
            ).all()
        return dict(rows)

    upgrade(postgres_url, "0003")
    engine = make_engine(postgres_url)
    try:
        assert storage() == {"model_versions.blob": "e", "federations.buffer_blob": "e"}
        downgrade(postgres_url, "0002")
        assert storage() == {"model_versions.blob": "x", "federations.buffer_blob": "x"}
    finally:
        engine.dispose()


def test_a_fedbuff_buffer_in_progress_moves_to_its_own_tables_and_back(db_url: str) -> None:
    # Migration 0004: the buffer leaves the federation row; a sum in progress (two
    # updates buffered) is carried over exactly, and back on downgrade.
    import json

    import torch
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from coordinator import buffers

    schema = [{"name": "w", "shape": [3, 700_000], "dtype": "float32"}, {"name": "b", "shape": [3], "dtype": "float32"}]
    g = torch.Generator().manual_seed(0)
    total = {"w": torch.randn(3, 700_000, generator=g), "b": torch.randn(3, generator=g)}
    upgrade(db_url, "0003")
    engine = make_engine(db_url)
    try:
        fed = sa.table("federations", sa.column("id"), sa.column("name"), sa.column("task_name"),
                       sa.column("task_options", sa.JSON()), sa.column("schema", sa.JSON()),
                       sa.column("schema_digest"), sa.column("settings", sa.JSON()), sa.column("current_version"),
                       sa.column("buffer_blob", sa.LargeBinary()), sa.column("buffer_count"),
                       sa.column("buffer_updates", sa.JSON()), sa.column("created_at", sa.DateTime(timezone=True)))
        with engine.begin() as conn:
            conn.execute(fed.insert().values(id=1, name="f", task_name="t", task_options={}, schema=schema,
                                             schema_digest="d", settings={}, current_version=0,
                                             buffer_blob=st_save(total), buffer_count=2, buffer_updates=["u1", "u2"],
                                             created_at=T0))
        upgrade(db_url)
        assert {"buffer_blob", "buffer_count", "buffer_updates"}.isdisjoint(
            c["name"] for c in sa.inspect(engine).get_columns("federations"))
        with transaction(engine) as s:
            assert buffers.state(s, 1) == buffers.BufferState(2, ("u1", "u2"))
            assert buffers.count(s, 1) == 2
            from coordinator.models import FedBuffSlice

            rows = s.execute(sa.select(FedBuffSlice.tensor, FedBuffSlice.start, FedBuffSlice.data)
                             .order_by(FedBuffSlice.tensor, FedBuffSlice.start)).all()
        assert [(t, start) for t, start, _ in rows] == [(0, 0), (0, 1 << 20), (0, 2 << 20), (1, 0)]
        flat_w = torch.cat([torch.frombuffer(bytearray(d), dtype=torch.float32) for t, _, d in rows if t == 0])
        assert torch.equal(flat_w, total["w"].reshape(-1))
        downgrade(db_url, "0003")
        with engine.connect() as conn:
            blob, count, updates = conn.execute(
                sa.select(fed.c.buffer_blob, fed.c.buffer_count, fed.c.buffer_updates)).one()
        back = st_load(bytes(blob))
        assert count == 2 and (json.loads(updates) if isinstance(updates, str) else updates) == ["u1", "u2"]
        assert all(torch.equal(back[k], total[k]) for k in total)
    finally:
        engine.dispose()
