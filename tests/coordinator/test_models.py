"""Tables, types and constraints, and the transaction helpers of coordinator.db,
on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from coordinator.db import DatabaseError, DbReason, lock_federation, make_engine, transaction
from coordinator.models import (
    ApiToken,
    EnrolmentToken,
    Federation,
    ModelVersion,
    PrivacyCharge,
    Role,
    Silo,
    SiloStatus,
    Update,
    UpdateStatus,
)

T0 = datetime(2026, 11, 21, 10, 0, 0, 123456, tzinfo=UTC)
SCHEMA = [{"name": "fc.weight", "shape": [2, 3], "dtype": "F32"}]


def _federation(**kw: object) -> Federation:
    fields: dict[str, object] = dict(
        id=1, name="demo", task_name="csv", task_options={"features": 3},
        schema=SCHEMA, schema_digest="a" * 64, settings={"strategy": "fedasync", "alpha": 0.6},
        created_at=T0,
    )
    return Federation(**{**fields, **kw})


def _silo(**kw: object) -> Silo:
    fields: dict[str, object] = dict(
        id="s1", federation_id=1, name="hospital-a", status=SiloStatus.ACTIVE,
        signing_key=bytes(range(32)), hpke_key=bytes(32), epsilon_cap=8.0, delta=1e-5,
        created_at=T0,
    )
    return Silo(**{**fields, **kw})


def _update(**kw: object) -> Update:
    fields: dict[str, object] = dict(
        id="u1", silo_id="s1", federation_id=1, base_version=0,
        header={"update_id": "u1", "dp": {"sigma": 1.1}}, header_bytes=b'{"h":1}',
        signature=b"\x00" * 64, envelope_digest="b" * 64, payload_digest="c" * 64,
        size=3_000_000_000, num_samples=100, status=UpdateStatus.ACCEPTED,
        received_at=T0, decided_at=T0,
    )
    return Update(**{**fields, **kw})


def test_full_graph_round_trips(migrated_engine: sa.Engine) -> None:
    cet = timezone(timedelta(hours=1))
    with transaction(migrated_engine) as s:
        # Added children first: the flush must order inserts by foreign keys.
        s.add_all([
            PrivacyCharge(
                silo_id="s1", update_id="u1", noise_multiplier=1.1, sample_rate=0.01,
                steps=100, max_grad_norm=1.0, delta=1e-5, epsilon_after=0.75,
                epsilon_claimed=0.74, accountant="rdp", created_at=T0,
            ),
            ModelVersion(
                federation_id=1, version=1, digest="d" * 64, size=24, blob=b"\x01" * 24,
                parent_version=0, produced_by_update="u1", created_at=T0,
                metrics={"s1": {"accuracy": 0.9}},
            ),
            _update(receipt=None),
            EnrolmentToken(id="t1", silo_id="s1", token_hash="e" * 64, created_at=T0,
                           expires_at=T0 + timedelta(days=1)),
            _silo(enrolled_at=datetime(2026, 11, 21, 12, 0, tzinfo=cet)),
            ApiToken(id="k1", name="ops", role=Role.ADMIN, token_hash="f" * 64, created_at=T0),
            _federation(),
        ])

    with transaction(migrated_engine) as s:
        fed = s.get(Federation, 1)
        assert fed is not None
        assert fed.schema == SCHEMA and fed.settings["alpha"] == 0.6
        assert fed.current_version == 0
        silo = s.get(Silo, "s1")
        assert silo is not None
        assert silo.signing_key == bytes(range(32))
        # Aware datetimes come back in UTC, the same instant.
        assert silo.enrolled_at == datetime(2026, 11, 21, 11, 0, tzinfo=UTC)
        assert silo.enrolled_at.tzinfo == UTC
        assert silo.created_at == T0  # microseconds kept
        upd = s.get(Update, "u1")
        assert upd is not None
        assert upd.header["dp"] == {"sigma": 1.1} and upd.size == 3_000_000_000
        mv = s.get(ModelVersion, (1, 1))
        assert mv is not None
        assert mv.metrics == {"s1": {"accuracy": 0.9}} and mv.blob == b"\x01" * 24
        charge = s.scalars(sa.select(PrivacyCharge)).one()
        assert (charge.id, charge.update_id) == (1, "u1")
        # An absent receipt is SQL NULL, not the JSON literal null.
        assert s.scalar(sa.select(sa.func.count()).where(Update.receipt.is_(None))) == 1


def test_naive_datetimes_are_refused(migrated_engine: sa.Engine) -> None:
    with pytest.raises(sa.exc.StatementError, match="naive datetime"):
        with transaction(migrated_engine) as s:
            s.add(_federation(created_at=datetime(2026, 11, 21, 10, 0)))


@pytest.mark.parametrize(
    "bad",
    [
        [_federation(), _silo(status="deleted")],                       # check constraint
        [_silo(federation_id=7)],                                       # foreign key
        [_federation(), _silo(), _silo(id="s2")],                       # unique name
        [_federation(), ApiToken(id="k", name="x", role="root", token_hash="0" * 64)],
    ],
    ids=["status", "foreign-key", "unique-name", "role"],
)
def test_constraints_are_enforced(migrated_engine: sa.Engine, bad: list[object]) -> None:
    with pytest.raises(sa.exc.IntegrityError):
        with transaction(migrated_engine) as s:
            for obj in bad:
                s.add(obj)
                s.flush()


def test_a_failed_transaction_leaves_nothing(migrated_engine: sa.Engine) -> None:
    with pytest.raises(RuntimeError):
        with transaction(migrated_engine) as s:
            s.add(_federation())
            s.flush()
            raise RuntimeError("boom")
    with transaction(migrated_engine) as s:
        assert s.get(Federation, 1) is None


def test_read_only_transaction_refuses_writes(migrated_engine: sa.Engine) -> None:
    with pytest.raises(sa.exc.DBAPIError, match="read-?only"):
        with transaction(migrated_engine, read_only=True) as s:
            s.add(_federation())
    # The pooled connection is writable again afterwards.
    with transaction(migrated_engine) as s:
        s.add(_federation())
    with transaction(migrated_engine, read_only=True) as s:
        assert s.get(Federation, 1) is not None


def test_sqlite_reader_is_not_queued_behind_a_writer(sqlite_url: str) -> None:
    from coordinator.db import upgrade

    upgrade(sqlite_url)
    # A short busy timeout: were the reader queued, it would fail, not hang.
    engine = make_engine(sqlite_url, connect_args={"timeout": 0.2})
    try:
        with transaction(engine) as writer:
            writer.add(_federation())
            writer.flush()  # holds the write lock from here to commit
            with transaction(engine, read_only=True) as reader:
                assert reader.get(Federation, 1) is None  # the last committed snapshot
            with pytest.raises(sa.exc.OperationalError, match="locked"):
                with transaction(engine) as second_writer:
                    second_writer.get(Federation, 1)
    finally:
        engine.dispose()


def test_lock_federation(migrated_engine: sa.Engine) -> None:
    with pytest.raises(DatabaseError) as err, transaction(migrated_engine) as s:
        lock_federation(s)
    assert err.value.reason == DbReason.FEDERATION_MISSING

    with transaction(migrated_engine) as s:
        s.add(_federation())

    # Read-modify-write of current_version under the lock from several threads:
    # no increment may be lost (the fold's exactly-once property).
    threads, rounds = 4, 10
    barrier = threading.Barrier(threads)
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            for _ in range(rounds):
                with transaction(migrated_engine) as s:
                    fed = lock_federation(s)
                    fed.current_version = fed.current_version + 1
        except BaseException as exc:  # reported below
            failures.append(exc)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert failures == []
    with transaction(migrated_engine) as s:
        fed = s.get(Federation, 1)
        assert fed is not None and fed.current_version == threads * rounds


def test_make_engine_refuses_other_databases() -> None:
    with pytest.raises(DatabaseError) as err:
        make_engine("mysql://localhost/x")
    assert err.value.reason == DbReason.UNSUPPORTED_DATABASE
