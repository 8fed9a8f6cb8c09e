"""The model store: version blobs on SQLite and PostgreSQL, their digests, signed
releases and retention.

Model weights are stored as safetensors blobs with their SHA-256 digest
(``model_versions``); a pruned version keeps its metadata and loses its blob. The
coordinator never runs model code while serving: it handles named tensors only.

Blobs can be hundreds of megabytes, so they never go through the driver whole: a
driver that returns a whole blob keeps copies of its own (SQLite reads through a
private buffer; psycopg holds the bytea's hex text and its decoded bytes), two to five
times the blob's size at the peak. Blobs are read in slices instead -- SQLite's
incremental blob I/O, PostgreSQL's ``substring()`` of an uncompressed (``STORAGE
EXTERNAL``) value, which fetches only the TOAST chunks it needs -- either into one
buffer (:func:`read_blob`, for a fold) or straight to a client
(:func:`open_release`). Metadata queries never name the blob column in an expression
SQLite would evaluate (``blob IS NOT NULL`` reads the whole blob there; ``length(blob)``
does not).

A version is immutable once written, and its digest was computed from the bytes it was
written from. :class:`coordinator.weights_cache.ModelCache` keeps the decoded weights
of a few recent versions (it reads them through :func:`read_blob`; :func:`write_version`
hands it each new version once committed), and :class:`ReleaseCache` their signed
release statements, both keyed by ``(version, digest)``. Several processes may fold
into one database, so a cached entry is reused only after the digest has been read
back from the version's row. A fold decodes a blob only after re-checking its digest;
a pull is served with the stored digest (the silo verifies the bytes against it before
loading anything).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import torch
from sqlalchemy import delete, event, func, literal_column, select, update
from sqlalchemy.orm import Session, SessionTransaction

from privacy import codec
from privacy.envelope import canonical_json, release_statement, utc_timestamp
from privacy.keys import Identity

from . import audit
from .errors import ApiError, InternalFault, Reason
from .models import Federation, ModelVersion, OptimizerState

__all__ = [
    "ACTION_VERSION_CREATED",
    "ACTION_VERSIONS_PRUNED",
    "Release",
    "ReleaseCache",
    "ReleaseStream",
    "SignedRelease",
    "StorageCorrupted",
    "VersionState",
    "open_release",
    "prune",
    "read_blob",
    "record_metrics",
    "release",
    "version_state",
    "write_version",
]

ACTION_VERSION_CREATED = "version_created"
ACTION_VERSIONS_PRUNED = "versions_pruned"

Tensors = dict[str, torch.Tensor]


class StorageCorrupted(InternalFault):
    """A stored blob does not match its recorded digest (disk or database damage).

    Never a client's fault: it surfaces as a 500 and in the logs.
    """


# --------------------------------------------------------------------------- versions


def write_version(
    session: Session,
    fed: Federation,
    *,
    tensors: Mapping[str, torch.Tensor],
    parent: int | None,
    produced_by: str | None,
    now: datetime,
    actor: str = "system",
    details: Mapping[str, Any] | None = None,
    blob: bytes | memoryview | None = None,
    cached: Callable[[int, str, Tensors], None] | None = None,
) -> tuple[ModelVersion, audit.AuditEvent]:
    """Store ``tensors`` as version ``fed.current_version + 1`` (0 for the first), make it
    current, and append the ``version_created`` entry. Call with the federation locked.

    ``blob``, when given, is ``tensors`` already encoded (e.g. a fold that wrote its
    result into a :class:`privacy.codec.Layout` buffer); it is stored as is.
    ``cached`` (the weights cache's ``put``) is called with ``(version, digest,
    tensors)`` once the transaction commits -- never if it, or a savepoint the version
    was written in, rolls back -- so the next fold finds in memory what is stored.
    """
    version = 0 if parent is None else fed.current_version + 1
    if blob is None:
        blob = codec.encode(tensors)
    streamed = _is_sqlite(session) and len(blob) >= _STREAM_MIN
    row = ModelVersion(
        federation_id=fed.id,
        version=version,
        digest=codec.digest(blob),
        size=len(blob),
        blob=func.zeroblob(len(blob)) if streamed else blob,
        parent_version=parent,
        produced_by_update=produced_by,
        created_at=now,
        metrics={},
    )
    session.add(row)
    fed.current_version = version
    session.flush()
    if streamed:
        _write_sqlite_blob(session, fed.id, version, blob)
    if cached is not None:
        digest, held = row.digest, dict(tensors)
        after_commit(session, lambda: cached(version, digest, held))
    event = audit.append(
        session,
        actor=actor,
        action=ACTION_VERSION_CREATED,
        subject=f"version:{version}",
        details={
            "version": version,
            "parent_version": parent,
            "digest": row.digest,
            "size": row.size,
            "produced_by_update": produced_by,
            **(details or {}),
        },
        now=now,
    )
    return row, event


def after_commit(session: Session, action: Callable[[], None]) -> None:
    """Run ``action`` once, when what ``session`` has written so far is committed.

    Not when a savepoint is released (SQLAlchemy's ``after_commit`` fires then too:
    nothing is durable yet), and never once a rollback undid the write: of the whole
    transaction or of a savepoint that holds it. The caller holds whatever lock orders
    the commits, so ``action`` runs before the next writer's transaction begins.
    """
    written_in: SessionTransaction | None = session.get_nested_transaction() or session.get_transaction()
    enclosing = []
    while written_in is not None:
        enclosing.append(written_in)
        written_in = written_in.parent
    state = {"done": False}

    def rolled_back(_session: Session, transaction: SessionTransaction) -> None:
        if any(transaction is t for t in enclosing):
            state["done"] = True

    def committed(committing: Session) -> None:
        if state["done"] or committing.in_nested_transaction():
            return
        state["done"] = True
        action()

    event.listen(session, "after_soft_rollback", rolled_back)
    event.listen(session, "after_commit", committed)


@dataclass(frozen=True)
class VersionState:
    """A version's metadata without its weights."""

    version: int
    digest: str
    retained: bool  # False once retention pruned the blob


def version_state(session: Session, federation_id: int, version: int) -> VersionState | None:
    """Whether ``version`` exists and still has its weights -- without loading them."""
    row = session.execute(select(ModelVersion.digest, _blob_length()).where(*_where(federation_id, version))).one_or_none()
    return None if row is None else VersionState(version, row[0], row[1] is not None)


def record_metrics(session: Session, federation_id: int, version: int, silo_id: str, metrics: Mapping) -> None:
    """Keep the figures a silo reported about ``version`` (its local validation split)."""
    if not metrics:
        return
    where = _where(federation_id, version)
    current = session.scalar(select(ModelVersion.metrics).where(*where))  # not the blob
    session.execute(update(ModelVersion).where(*where).values(metrics={**(current or {}), silo_id: dict(metrics)}))


# --------------------------------------------------------------------------- blob I/O

#: Bytes per slice when a blob moves between the database and memory.
_BLOB_SLICE = 4 << 20
#: Bytes per chunk of a blob streamed to a client: what each concurrent pull holds.
_STREAM_CHUNK = 1 << 20
#: From this size on, SQLite gets a blob as zeros plus incremental writes instead of a
#: bound parameter: pysqlite keeps a bound value alive in its statement cache (one
#: copy per pooled connection, until that statement runs again). Smaller blobs are
#: bound: zeros-then-data writes every page twice.
_STREAM_MIN = 64 << 20


_PG_SLICE = "SELECT substring(blob FROM %s FOR %s) FROM model_versions WHERE federation_id = %s AND version = %s"


def _blob_length():
    # length() of a blob is read from its record header on SQLite (and from the TOAST
    # pointer on PostgreSQL); "blob IS NOT NULL" would make SQLite read every page.
    return func.length(ModelVersion.blob)


def _is_sqlite(session: Session) -> bool:
    return session.get_bind().dialect.name == "sqlite"


def _where(federation_id: int, version: int) -> tuple:
    return (ModelVersion.federation_id == federation_id, ModelVersion.version == version)


def _sqlite_connection(session: Session):
    # The sqlite3 connection under the session's transaction: incremental blob I/O
    # runs inside that same transaction (and sees its snapshot).
    return session.connection().connection.driver_connection


def _write_sqlite_blob(session: Session, federation_id: int, version: int, blob: bytes | bytearray | memoryview) -> None:
    rowid = session.scalar(select(literal_column("rowid")).select_from(ModelVersion).where(*_where(federation_id, version)))
    view = memoryview(blob)
    with _sqlite_connection(session).blobopen("model_versions", "blob", rowid) as out:
        for start in range(0, len(view), _BLOB_SLICE):
            out.write(view[start : start + _BLOB_SLICE])


def _slices(session: Session, federation_id: int, version: int, step: int) -> tuple[int, Iterator[bytes]] | None:
    """The size of ``version``'s blob and an iterator over it in slices of ``step``
    bytes, read within ``session``'s transaction; None if it does not exist or was
    pruned. On PostgreSQL a slice may come back short if the blob was pruned after
    the size was read (unless the transaction is a snapshot): callers check lengths.
    """
    where = _where(federation_id, version)
    if _is_sqlite(session):
        found = session.execute(
            select(literal_column("rowid"), _blob_length()).select_from(ModelVersion).where(*where)
        ).one_or_none()
        if found is None or found[1] is None:
            return None
        rowid, size = found
        handle = _sqlite_connection(session).blobopen("model_versions", "blob", rowid, readonly=True)

        def sqlite_slices() -> Iterator[bytes]:
            with handle:
                for _ in range(0, size, step):
                    yield handle.read(step)

        return size, sqlite_slices()
    size = session.scalar(select(_blob_length()).where(*where))
    if size is None:
        return None

    def pg_slices() -> Iterator[bytes]:
        # A binary-format cursor: psycopg otherwise receives a bytea as hex text (twice
        # its size) and decodes it, for every slice.
        with session.connection().connection.driver_connection.cursor(binary=True) as cur:
            for start in range(0, size, step):
                cur.execute(_PG_SLICE, (start + 1, step, federation_id, version))
                row = cur.fetchone()
                yield b"" if row is None or row[0] is None else row[0]

    return size, pg_slices()


def read_blob(session: Session, federation_id: int, version: int) -> memoryview | None:
    """The stored weights of ``version`` (None if it does not exist or was pruned).

    Read in slices into one buffer, so the peak is the blob itself, not two or three
    copies of it (see the module docstring).
    """
    found = _slices(session, federation_id, version, _BLOB_SLICE)
    if found is None:
        return None
    size, slices = found
    buf = codec.empty_buffer(size)
    start = 0
    for chunk in slices:
        if len(chunk) != min(_BLOB_SLICE, size - start):
            return None  # pruned meanwhile
        buf[start : start + len(chunk)] = chunk
        start += len(chunk)
    return buf


# --------------------------------------------------------------------------- releases


@dataclass(frozen=True)
class SignedRelease:
    """The coordinator's signed ``model_release`` statement about one version's bytes."""

    version: int
    digest: str
    size: int
    statement: bytes
    signature: bytes


class ReleaseCache:
    """Signed release statements of recent versions, keyed by ``(version, digest,
    secure-aggregation setting)``.

    A statement names the federation, the version, its digest and size, the schema and
    the version's creation time -- all fixed once the version is written -- and the
    federation's secure-aggregation setting when it is signed, which an operator may
    change under a version: so it is signed once per process, version and setting.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[int, str, bytes | None], SignedRelease] = OrderedDict()
        self._lock = threading.Lock()

    def signed(self, identity: Identity, *, federation: str, schema_digest: str, version: int, digest: str,
               size: int, created_at: datetime, secure_aggregation: Mapping | None = None) -> SignedRelease:
        key = (version, digest, None if secure_aggregation is None else canonical_json(secure_aggregation))
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit
        statement, signature = release_statement(
            federation=federation, version=version, digest=digest, size=size, schema_digest=schema_digest,
            created_at=utc_timestamp(created_at), signer=identity.signing, secure_aggregation=secure_aggregation,
        )
        out = SignedRelease(version, digest, size, statement, signature)
        with self._lock:
            self._entries[key] = out
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return out


@dataclass(frozen=True)
class _VersionRow:
    """What a release needs of a version and its federation, without the blob."""

    federation: str
    schema_digest: str
    current_version: int
    digest: str
    size: int | None  # None once pruned
    created_at: datetime
    secure_aggregation: dict | None  # the federation's setting now (signed into the release)


def _version_row(session: Session, federation_id: int, version: int | None) -> _VersionRow:
    """The metadata of ``version`` (None: the current one). Raises ApiError
    ``unknown_version`` for a version that does not exist (yet)."""
    fed = session.execute(
        select(Federation.name, Federation.schema_digest, Federation.current_version, Federation.settings)
        .where(Federation.id == federation_id)
    ).one()  # named columns: never the FedBuff buffer
    v = fed.current_version if version is None else version
    if v > fed.current_version:
        raise ApiError(Reason.UNKNOWN_VERSION, f"model version {v} does not exist yet")
    row = session.execute(
        select(ModelVersion.digest, _blob_length(), ModelVersion.created_at).where(*_where(federation_id, v))
    ).one_or_none()
    if row is None or row[1] is None:
        raise ApiError(Reason.UNKNOWN_VERSION, f"model version {v} does not exist or its weights were pruned")
    return _VersionRow(fed.name, fed.schema_digest, v, row[0], row[1], row[2],
                       (fed.settings or {}).get("secure_aggregation"))


class ReleaseStream:
    """A version's signed release and its bytes, read from one database snapshot.

    Iterate for the bytes (chunks of at most 1 MiB), then :meth:`close` (idempotent)
    to end the snapshot. The snapshot is why a pull that has started always delivers
    the whole version, even if retention prunes it meanwhile: the prune commits, the
    snapshot keeps seeing the blob until the stream ends.
    """

    def __init__(self, release: SignedRelease, chunks: Iterator[bytes], stack: ExitStack) -> None:
        self.release = release
        self._chunks = chunks
        self._stack = stack
        self._sent = 0

    def read(self) -> bytes:
        """The next chunk, or b"" at the end."""
        chunk = next(self._chunks, b"")
        self._sent += len(chunk)
        if not chunk and self._sent != self.release.size:
            raise StorageCorrupted(f"version {self.release.version} ended after {self._sent} of "
                                   f"{self.release.size} bytes")
        return chunk

    def close(self) -> None:
        self._stack.close()


def open_release(
    snapshot: Callable[[], AbstractContextManager[Session]],
    identity: Identity,
    releases: ReleaseCache,
    federation_id: int,
    version: int | None = None,
) -> ReleaseStream:
    """Open the current (or a given, retained) version for streaming to a silo.

    ``snapshot`` opens a read-only transaction that sees one state of the database
    throughout (``Coordinator.read``). The release is signed over the stored digest
    (cached per version and digest); nothing is hashed here. Raises ApiError
    ``unknown_version`` for a version that never existed, does not exist yet or was
    pruned before the snapshot began.
    """
    stack = ExitStack()
    try:
        session = stack.enter_context(snapshot())
        row = _version_row(session, federation_id, version)
        signed = releases.signed(identity, federation=row.federation, schema_digest=row.schema_digest,
                                 version=row.current_version, digest=row.digest, size=row.size,
                                 created_at=row.created_at, secure_aggregation=row.secure_aggregation)
        found = _slices(session, federation_id, row.current_version, _STREAM_CHUNK)
        if found is None:  # cannot happen within one snapshot; checked all the same
            raise ApiError(Reason.UNKNOWN_VERSION, f"model version {row.current_version} was pruned")
        return ReleaseStream(signed, found[1], stack)
    except BaseException:
        stack.close()
        raise


@dataclass(frozen=True)
class Release:
    """A model version's bytes and the coordinator's signed statement about them."""

    version: int
    digest: str
    blob: bytes | memoryview
    statement: bytes
    signature: bytes


def release(session: Session, identity: Identity, releases: ReleaseCache, federation_id: int,
            version: int | None = None) -> Release:
    """The current (or a given, retained) version whole, its digest re-checked, and
    signed: an operator's download (the silo API streams instead, see
    :func:`open_release`).

    Raises ApiError ``unknown_version`` for a version that never existed or was pruned.
    """
    row = _version_row(session, federation_id, version)
    blob = read_blob(session, federation_id, row.current_version)
    if blob is None:
        raise ApiError(Reason.UNKNOWN_VERSION, f"model version {row.current_version} was pruned")
    if codec.digest(blob) != row.digest:
        raise StorageCorrupted(f"stored weights of version {row.current_version} do not match their digest")
    signed = releases.signed(identity, federation=row.federation, schema_digest=row.schema_digest,
                             version=row.current_version, digest=row.digest, size=row.size,
                             created_at=row.created_at, secure_aggregation=row.secure_aggregation)
    return Release(signed.version, signed.digest, blob, signed.statement, signed.signature)


# --------------------------------------------------------------------------- retention


def prune(
    session: Session, fed: Federation, *, retain: int, max_staleness: int, now: datetime
) -> list[int]:
    """Drop the blobs of versions outside the retention window; keep their metadata.

    ``retain`` 0 keeps everything. Otherwise the newest ``max(retain, max_staleness + 1)``
    versions keep their weights, so every base version an update may still name within
    the staleness bound stays loadable. Audited when something was pruned. A pull
    already streaming a pruned version finishes from its snapshot (:func:`open_release`).
    """
    if retain <= 0:
        return []
    keep = max(retain, max_staleness + 1)
    cutoff = fed.current_version - keep + 1
    if cutoff <= 0:
        return []
    where = (
        ModelVersion.federation_id == fed.id,
        ModelVersion.version < cutoff,
        _blob_length().is_not(None),
    )
    versions = list(session.scalars(select(ModelVersion.version).where(*where).order_by(ModelVersion.version)))
    if not versions:
        return []
    session.execute(update(ModelVersion).where(*where).values(blob=None))
    # FedOpt's moments of those versions go with their weights (coordinator/optimizer_state.py).
    session.execute(delete(OptimizerState).where(OptimizerState.federation_id == fed.id,
                                                 OptimizerState.version.in_(versions)))
    audit.append(
        session,
        actor="system",
        action=ACTION_VERSIONS_PRUNED,
        subject=f"federation:{fed.id}",
        details={"versions": versions, "kept_from": cutoff, "retain": retain},
        now=now,
    )
    return versions
