"""Engines, sessions, transactions and schema migrations for the coordinator.

Two databases are supported (DESIGN.md, "Storage and scale"):

* **SQLite** (``sqlite:///path/to/coordinator.db``), the embedded default. Every
  connection gets WAL journaling (readers never block the writer), a 30 s busy
  timeout and foreign keys ON. pysqlite's own transaction handling is switched off
  and every transaction opens with ``BEGIN IMMEDIATE`` (SQLAlchemy's documented
  recipe, "Enabling Non-Legacy SQLite Transactional Modes"): a writer takes the
  database's write lock *up front*, so concurrent writers -- threads or processes --
  queue on the busy timeout instead of failing with "database is locked" when a
  deferred read lock would have to be upgraded. Read-only transactions
  (``transaction(..., read_only=True)``) use a plain deferred ``BEGIN`` instead and
  read a WAL snapshot without queueing behind writers.
* **PostgreSQL** through psycopg 3 (``postgresql+psycopg://``; a bare
  ``postgresql://`` URL is mapped to it), with ``pool_pre_ping``. Several
  coordinator processes may share one database; the fold serializes on the
  federation row (:func:`lock_federation`) and audit appends on the audit head.

The schema changes only through Alembic (package ``migrations``), run
programmatically by :func:`upgrade` and :func:`downgrade` -- no ``alembic.ini`` in
the working directory is needed; the one shipped inside the package is used.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.orm import Session, sessionmaker

from coordinator.errors import InternalFault, StorageUnavailable
from coordinator.models import Federation

__all__ = [
    "DatabaseError",
    "DatabaseUnavailable",
    "DbReason",
    "WriteHealth",
    "SQLITE_BUSY_TIMEOUT_S",
    "current_revision",
    "downgrade",
    "head_revision",
    "lock_federation",
    "make_engine",
    "session_factory",
    "transaction",
    "upgrade",
]

#: How long a SQLite connection waits for another writer before giving up
#: (override with ``make_engine(url, connect_args={"timeout": seconds})``).
SQLITE_BUSY_TIMEOUT_S = 30.0

# Execution option that marks a connection as read-only (see ``transaction``).
_READ_ONLY = "fedsilo_read_only"

# Key of the PostgreSQL advisory lock held while migrating, so that coordinator
# processes starting together run the migrations once, one after the other.
_MIGRATION_LOCK_KEY = 0x66656473696C6F  # "fedsilo"


class DbReason(StrEnum):
    FEDERATION_MISSING = "federation_missing"
    UNSUPPORTED_DATABASE = "unsupported_database"
    UNAVAILABLE = "unavailable"


class DatabaseError(InternalFault):
    """A database-layer condition the caller must handle; ``reason`` is stable."""

    def __init__(self, reason: DbReason, message: str = "") -> None:
        self.reason = DbReason(reason)
        self.message = message or self.reason.value.replace("_", " ")
        super().__init__(self.message)


class DatabaseUnavailable(DatabaseError, StorageUnavailable):
    """The database cannot be reached or cannot write (disk full, I/O error, shut down).

    A passing condition of the coordinator's storage, not a bug and not the client's
    doing: answered as ``503 unavailable`` with ``Retry-After``. Raised in place of the
    driver's error by the engine's ``handle_error`` hook (:func:`_map_fault`), so code
    above the database layer sees one exception whatever the backend.
    """

    def __init__(self, message: str) -> None:
        DatabaseError.__init__(self, DbReason.UNAVAILABLE, message)


#: SQLite's answers when it cannot write or read its file (sqlite3 result codes
#: SQLITE_FULL, SQLITE_IOERR, SQLITE_CANTOPEN, SQLITE_READONLY), as the driver words them.
_SQLITE_UNAVAILABLE = ("database or disk is full", "disk i/o error", "unable to open database",
                       "attempt to write a readonly database")
#: PostgreSQL SQLSTATE classes that mean "not now" rather than "wrong": 08 connection
#: exception, 53 insufficient resources (53100 disk_full), 57P0x operator intervention.
_PG_UNAVAILABLE = ("08", "53", "57P")


def _map_fault(context: Any) -> Exception | None:
    """The engine's ``handle_error`` hook: storage faults become DatabaseUnavailable."""
    original = context.original_exception
    if context.connection is not None and context.connection.get_execution_options().get(_READ_ONLY):
        return None  # a write inside a read-only transaction (query_only) is a bug, not the disk
    sqlstate = getattr(original, "sqlstate", None) or ""
    text_ = str(original).lower()
    # No connection yet and an OperationalError: the server did not let us in (refused,
    # unreachable, starting up); a ProgrammingError there would be a bad URL, a bug.
    refused = context.connection is None and isinstance(context.sqlalchemy_exception, sa_exc.OperationalError)
    if (context.is_disconnect or refused or sqlstate.startswith(_PG_UNAVAILABLE)
            or any(m in text_ for m in _SQLITE_UNAVAILABLE)):
        return DatabaseUnavailable(f"{type(original).__name__}: {str(original).strip()[:200]}")
    return None


class WriteHealth:
    """Whether this process's last write to the database failed as unavailable.

    ``/healthz`` reports ``degraded`` from a DatabaseUnavailable until a transaction
    commits again -- or until ``hold_seconds`` pass without another failure, since a
    coordinator nobody writes to would otherwise never learn the disk has space again.
    """

    def __init__(self, hold_seconds: float = 60.0, clock: Any = None) -> None:
        import time

        self._clock = clock or time.monotonic
        self.hold_seconds = hold_seconds
        self._failed_at: float | None = None
        self.detail = ""

    def watch(self, engine: Engine) -> None:
        event.listen(engine, "handle_error", self._on_error)
        event.listen(engine, "commit", self._on_commit)

    def _on_error(self, context: Any) -> None:
        fault = _map_fault(context)
        if fault is not None:
            self._failed_at, self.detail = self._clock(), fault.message

    def _on_commit(self, conn: Any) -> None:
        opts = conn.get_execution_options()
        if not (opts.get(_READ_ONLY) or opts.get("postgresql_readonly")):  # a read proves nothing
            self._failed_at = None

    @property
    def degraded(self) -> bool:
        return self._failed_at is not None and self._clock() - self._failed_at < self.hold_seconds


def _normalize_url(url: str | URL) -> URL:
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    if u.get_backend_name() not in ("sqlite", "postgresql"):
        raise DatabaseError(DbReason.UNSUPPORTED_DATABASE, f"unsupported database URL {u!r}")
    return u


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """Create an engine for a SQLite or PostgreSQL URL, configured as described above.

    Extra keyword arguments go to :func:`sqlalchemy.create_engine`.
    """
    u = _normalize_url(url)
    if u.get_backend_name() == "sqlite":
        engine = _sqlite_engine(u, **kwargs)
    else:
        kwargs.setdefault("pool_pre_ping", True)
        engine = create_engine(u, **kwargs)
    event.listen(engine, "handle_error", _map_fault)
    return engine


def _sqlite_engine(u: URL, **kwargs: Any) -> Engine:
    connect_args = dict(kwargs.pop("connect_args", {}))
    connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_S)
    engine = create_engine(u, connect_args=connect_args, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Autocommit at the driver: pysqlite must not emit BEGIN itself (nor COMMIT
        # before DDL); the "begin" hook below does, with the lock mode we want.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            # The busy timeout is already set (sqlite3.connect(timeout=...)), so
            # switching to WAL waits for a lock rather than failing.
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA foreign_keys = ON")
            # fsync at every commit: with WAL, NORMAL may lose the last commits on
            # power loss, and a receipt must never outlive the row it refers to.
            cur.execute("PRAGMA synchronous = FULL")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        read_only = bool(conn.get_execution_options().get(_READ_ONLY))
        # A deferred BEGIN reads a WAL snapshot without waiting for writers;
        # query_only makes a write attempt inside it fail instead of upgrading.
        # (query_only first: the previous user of a pooled connection may have set it.)
        conn.exec_driver_sql(f"PRAGMA query_only = {int(read_only)}")
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory bound to ``engine``.

    Objects stay usable after commit (``expire_on_commit=False``): a service can
    return the rows it wrote, e.g. the audit event a receipt refers to.
    """
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def transaction(
    bind: Engine | sessionmaker[Session], *, read_only: bool = False
) -> Iterator[Session]:
    """Yield a Session inside one transaction: commit on success, roll back on error.

    ``read_only=True`` is for long reads (exports, verification, listings): on
    SQLite it begins a deferred transaction that reads a snapshot without taking
    the write lock, so it does not hold up ingestion; on PostgreSQL the
    transaction is ``READ ONLY, REPEATABLE READ``: one snapshot for all its
    statements, as on SQLite (a model streamed in slices stays whole even if it is
    pruned meanwhile). Writing inside it fails.
    """
    factory = bind if isinstance(bind, sessionmaker) else session_factory(bind)
    with factory() as session, session.begin():
        if read_only:
            if session.get_bind().dialect.name == "postgresql":
                opts: dict[str, Any] = {"postgresql_readonly": True, "isolation_level": "REPEATABLE READ"}
            else:
                opts = {_READ_ONLY: True}
            # Acquire the connection now, so the options apply before BEGIN.
            session.connection(execution_options=opts)
        yield session


def lock_federation(session: Session, federation_id: int = 1) -> Federation:
    """Lock and return the federation row for the rest of the caller's transaction.

    PostgreSQL: ``SELECT ... FOR UPDATE``, so concurrent folds -- in any process --
    take turns and each sees the version the previous one wrote. SQLite: the
    ``BEGIN IMMEDIATE`` that opened the (write) transaction already holds the
    database's write lock, so this is a plain select. The row is re-read from the
    database even if the session had loaded it before the lock.
    """
    stmt = (
        select(Federation)
        .where(Federation.id == federation_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    fed = session.execute(stmt).scalar_one_or_none()
    if fed is None:
        raise DatabaseError(
            DbReason.FEDERATION_MISSING, f"federation {federation_id} does not exist"
        )
    return fed


# ---------------------------------------------------------------- migrations

# Alembic is imported lazily: the silo side imports nothing of it, and a running
# coordinator needs it only at start-up.

def _alembic_config(connection: Connection | None = None) -> Any:
    from alembic.config import Config

    import migrations

    pkg_dir = Path(migrations.__file__).resolve().parent
    cfg = Config(str(pkg_dir / "alembic.ini"))
    # Absolute path to the installed package: no assumption about the cwd.
    cfg.set_main_option("script_location", str(pkg_dir))
    if connection is not None:
        # env.py uses this connection (and its transaction) instead of a URL, so
        # the URL never goes through ConfigParser interpolation.
        cfg.attributes["connection"] = connection
    return cfg


# One migration at a time per process: Alembic's command API keeps module-level
# state (alembic.context / alembic.op proxies) that is not thread-safe.
_alembic_mutex = threading.Lock()


def _run_alembic(url: str | URL, fn_name: str, rev: str) -> None:
    from alembic import command

    engine = make_engine(url)
    try:
        with _alembic_mutex, engine.begin() as conn:
            # The whole migration is one transaction (both databases have
            # transactional DDL). On SQLite it began with BEGIN IMMEDIATE, so a
            # second process waits for the first and then finds the schema at
            # head; on PostgreSQL an advisory lock does the same.
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
            getattr(command, fn_name)(_alembic_config(conn), rev)
    finally:
        engine.dispose()


def upgrade(url: str | URL, rev: str = "head") -> None:
    """Migrate the database at ``url`` up to ``rev`` (default: the newest schema).

    Safe to call from several processes at once and idempotent at head.
    """
    _run_alembic(url, "upgrade", rev)


def downgrade(url: str | URL, rev: str = "base") -> None:
    """Migrate the database at ``url`` down to ``rev`` (``"base"`` drops everything)."""
    _run_alembic(url, "downgrade", rev)


def head_revision() -> str:
    """The newest revision shipped with this package."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships 0001
        raise DatabaseError(DbReason.UNSUPPORTED_DATABASE, "no migrations found")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None if it was never migrated.

    The coordinator compares it with :func:`head_revision` at start-up and refuses
    to serve from an outdated schema.
    """
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        conn = conn.execution_options(**{_READ_ONLY: True})
        return MigrationContext.configure(conn).get_current_revision()
