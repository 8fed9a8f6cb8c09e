"""The federation: its row, its model versions, signed releases and retention.

Model weights are stored as safetensors blobs with their SHA-256 digest
(``model_versions``); a pruned version keeps its metadata and loses its blob. The
coordinator never runs model code while serving: it handles named tensors only.

:class:`ModelCache` keeps the decoded weights of a few recent versions in-process,
keyed by ``(version, digest)``. Several processes may fold into one database, so a
cached entry is reused only after the digest has been read back from the version's
row; a blob is decoded only after its digest has been checked.

Blobs can be hundreds of megabytes, so they are read in slices into one buffer
(:func:`read_blob`): a driver that returns a whole blob keeps copies of its own
(SQLite reads through a private buffer; psycopg holds the bytea's hex text and its
decoded bytes), two to five times the blob's size at the peak. Metadata queries never
name the blob column in an expression SQLite would evaluate (``blob IS NOT NULL``
reads the whole blob there; ``length(blob)`` does not).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import torch
from sqlalchemy import LargeBinary, func, literal_column, select, update
from sqlalchemy.orm import Session

from privacy import codec
from privacy.envelope import release_statement, utc_timestamp
from privacy.keys import Identity

from . import audit
from .errors import ApiError, InternalFault, Reason
from .models import Federation, ModelVersion
from .strategies import StrategySettings

__all__ = [
    "ACTION_FEDERATION_CREATED",
    "ACTION_VERSION_CREATED",
    "ACTION_VERSIONS_PRUNED",
    "ModelCache",
    "current_version",
    "Release",
    "StorageCorrupted",
    "VersionState",
    "init_federation",
    "prune",
    "record_metrics",
    "release",
    "settings_of",
    "version_state",
    "write_version",
]

ACTION_FEDERATION_CREATED = "federation_created"
ACTION_VERSION_CREATED = "version_created"
ACTION_VERSIONS_PRUNED = "versions_pruned"

Tensors = dict[str, torch.Tensor]


class StorageCorrupted(InternalFault):
    """A stored blob does not match its recorded digest (disk or database damage).

    Never a client's fault: it surfaces as a 500 and in the logs.
    """


def current_version(session: Session, federation_id: int = 1) -> int:
    """The federation's current model version (raises if the federation does not exist)."""
    return int(session.execute(select(Federation.current_version).where(Federation.id == federation_id)).scalar_one())


def settings_of(fed: Federation) -> StrategySettings:
    """The federation's strategy settings as a validated object."""
    return StrategySettings.from_stored(fed.settings)


# --------------------------------------------------------------------------- creation


def init_federation(
    session: Session,
    *,
    name: str,
    task: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor],
    settings: StrategySettings,
    now: datetime,
    federation_id: int = 1,
    actor: str = "system",
) -> ModelVersion:
    """Create the federation row and model version 0 from ``weights``; audit both.

    ``task`` is the task spec ``{"name", "options"}`` handed to silos at enrolment.
    The schema (names, shapes, dtypes in the model's order) is fixed here for good.
    """
    schema = codec.Schema.of(weights)
    fed = Federation(
        id=federation_id,
        name=name,
        task_name=task["name"],
        task_options=dict(task.get("options") or {}),
        schema=schema.to_json(),
        schema_digest=schema.digest,
        settings=settings.to_dict(),
        current_version=0,
        created_at=now,
    )
    session.add(fed)
    session.flush()
    audit.append(
        session,
        actor=actor,
        action=ACTION_FEDERATION_CREATED,
        subject=f"federation:{federation_id}",
        details={
            "name": name,
            "task": {"name": fed.task_name, "options": fed.task_options},
            "schema_digest": schema.digest,
            "tensors": len(schema.tensors),
            "parameters": schema.numel(),
            "settings": fed.settings,
        },
        now=now,
    )
    row, _ = write_version(session, fed, tensors=dict(weights), parent=None, produced_by=None, now=now, actor=actor)
    return row


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
) -> tuple[ModelVersion, audit.AuditEvent]:
    """Store ``tensors`` as version ``fed.current_version + 1`` (0 for the first), make it
    current, and append the ``version_created`` entry. Call with the federation locked.

    ``blob``, when given, is ``tensors`` already encoded (e.g. a fold that wrote its
    result into a :class:`privacy.codec.Layout` buffer); it is stored as is.
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


@dataclass(frozen=True)
class VersionState:
    """A version's metadata without its weights."""

    version: int
    digest: str
    retained: bool  # False once retention pruned the blob


def version_state(session: Session, federation_id: int, version: int) -> VersionState | None:
    """Whether ``version`` exists and still has its weights -- without loading them."""
    row = session.execute(
        select(ModelVersion.digest, _blob_length()).where(
            ModelVersion.federation_id == federation_id, ModelVersion.version == version
        )
    ).one_or_none()
    return None if row is None else VersionState(version, row[0], row[1] is not None)


# --------------------------------------------------------------------------- blob I/O

#: Bytes per slice when a blob moves between the database and memory.
_BLOB_SLICE = 4 << 20
#: From this size on, SQLite gets a blob as zeros plus incremental writes instead of a
#: bound parameter: pysqlite keeps a bound value alive in its statement cache (one
#: copy per pooled connection, until that statement runs again). Smaller blobs are
#: bound: zeros-then-data writes every page twice.
_STREAM_MIN = 64 << 20


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
    # runs inside that same transaction.
    return session.connection().connection.driver_connection


def _write_sqlite_blob(session: Session, federation_id: int, version: int, blob: bytes | bytearray | memoryview) -> None:
    rowid = session.scalar(select(literal_column("rowid")).select_from(ModelVersion).where(*_where(federation_id, version)))
    view = memoryview(blob)
    with _sqlite_connection(session).blobopen("model_versions", "blob", rowid) as out:
        for start in range(0, len(view), _BLOB_SLICE):
            out.write(view[start : start + _BLOB_SLICE])


def read_blob(session: Session, federation_id: int, version: int) -> memoryview | None:
    """The stored weights of ``version`` (None if it does not exist or was pruned).

    Read in slices into one buffer, so the peak is the blob itself, not two or three
    copies of it (see the module docstring).
    """
    where = _where(federation_id, version)
    if _is_sqlite(session):
        found = session.execute(
            select(literal_column("rowid"), _blob_length()).select_from(ModelVersion).where(*where)
        ).one_or_none()
        if found is None or found[1] is None:
            return None
        rowid, size = found
        buf = codec.empty_buffer(size)
        with _sqlite_connection(session).blobopen("model_versions", "blob", rowid, readonly=True) as src:
            for start in range(0, size, _BLOB_SLICE):
                chunk = src.read(_BLOB_SLICE)
                buf[start : start + len(chunk)] = chunk
        return buf
    size = session.scalar(select(_blob_length()).where(*where))
    if size is None:
        return None
    buf = codec.empty_buffer(size)
    for start in range(0, size, _BLOB_SLICE):
        # substring() of an uncompressed TOASTed value fetches only the chunks it needs.
        chunk = session.scalar(
            select(func.substring(ModelVersion.blob, start + 1, _BLOB_SLICE, type_=LargeBinary)).where(*where)
        )
        if chunk is None or len(chunk) != min(_BLOB_SLICE, size - start):
            return None  # pruned meanwhile
        buf[start : start + len(chunk)] = chunk
    return buf


def record_metrics(session: Session, federation_id: int, version: int, silo_id: str, metrics: Mapping) -> None:
    """Keep the figures a silo reported about ``version`` (its local validation split)."""
    if not metrics:
        return
    where = (ModelVersion.federation_id == federation_id, ModelVersion.version == version)
    current = session.scalar(select(ModelVersion.metrics).where(*where))  # not the blob
    session.execute(update(ModelVersion).where(*where).values(metrics={**(current or {}), silo_id: dict(metrics)}))


# --------------------------------------------------------------------------- releases


@dataclass(frozen=True)
class Release:
    """A model version's bytes and the coordinator's signed statement about them."""

    version: int
    digest: str
    blob: bytes
    statement: bytes
    signature: bytes


def release(session: Session, identity: Identity, fed: Federation, version: int | None = None) -> Release:
    """The current (or a given, retained) version, signed for silos to verify before loading.

    Raises ApiError ``unknown_version`` for a version that never existed or was pruned.
    """
    v = fed.current_version if version is None else version
    row = session.get(ModelVersion, (fed.id, v))
    if row is None or row.blob is None:
        raise ApiError(Reason.UNKNOWN_VERSION, f"model version {v} does not exist or its weights were pruned")
    blob = bytes(row.blob)
    if codec.digest(blob) != row.digest:
        raise StorageCorrupted(f"stored weights of version {v} do not match their digest")
    statement, signature = release_statement(
        federation=fed.name,
        version=v,
        blob=blob,
        schema_digest=fed.schema_digest,
        created_at=utc_timestamp(row.created_at),
        signer=identity.signing,
    )
    return Release(v, row.digest, blob, statement, signature)


# --------------------------------------------------------------------------- weights cache


class ModelCache:
    """Decoded weights of recent versions, shared by the threads of one process.

    Entries are keyed by ``(version, digest)`` and are read-only by convention: folds
    never modify their inputs in place, so a cached dict can be handed to several
    threads at once. At most ``capacity`` versions and ``max_bytes`` of tensors are
    kept, but always at least one. The *oldest version* goes first, not the least
    recently used: a fold needs the current version and, for a stale update, a base a
    few versions back, so the newest versions are the ones worth keeping (with LRU,
    the bases of earlier folds push out the ones the next folds need). A miss costs a
    blob read, a digest and a decode under the fold lock.
    """

    def __init__(self, capacity: int = 8, max_bytes: int = 1 << 30) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._entries: dict[tuple[int, str], Tensors] = {}
        self._sizes: dict[tuple[int, str], int] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def weights(self, session: Session, federation_id: int, version: int) -> Tensors | None:
        """The weights of ``version``, or None if it does not exist or was pruned.

        Reads the digest from the database first (another process may have folded
        since), then reuses the cached tensors or loads, checks and decodes the blob.
        """
        state = version_state(session, federation_id, version)
        if state is None or not state.retained:
            return None
        key = (version, state.digest)
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None:
                self.hits += 1
                return cached
            self.misses += 1
        loaded = self._load(session, federation_id, version, key[1])
        if loaded is None:
            return None
        tensors, _ = loaded
        self.put(version, key[1], tensors)
        return tensors

    def checkout(self, session: Session, federation_id: int, version: int) -> tuple[Tensors, memoryview | None] | None:
        """Like :meth:`weights`, for a fold that will write a new version.

        On a miss the version is loaded but *not* cached, and returned with the buffer
        its tensors are views of: the caller owns both and may write the new version
        over them (one model-sized buffer less at the peak). On a hit the buffer is
        None and the tensors are shared, read-only.
        """
        state = version_state(session, federation_id, version)
        if state is None or not state.retained:
            return None
        with self._lock:
            cached = self._entries.get((version, state.digest))
            if cached is not None:
                self.hits += 1
                return cached, None
            self.misses += 1
        loaded = self._load(session, federation_id, version, state.digest)
        return None if loaded is None else loaded

    def _load(self, session: Session, federation_id: int, version: int,
              digest: str) -> tuple[Tensors, memoryview | None] | None:
        blob = read_blob(session, federation_id, version)
        if blob is None:
            return None  # pruned between the two reads
        if codec.digest(blob) != digest:
            raise StorageCorrupted(f"stored weights of version {version} do not match their digest")
        return _decode_stored(session, federation_id, blob)

    def put(self, version: int, digest: str, tensors: Tensors) -> None:
        key = (version, digest)
        with self._lock:
            self._entries[key] = tensors
            self._sizes[key] = sum(t.numel() * t.element_size() for t in tensors.values())
            while len(self._entries) > 1 and (
                len(self._entries) > self.capacity or sum(self._sizes.values()) > self.max_bytes
            ):
                oldest = min(self._entries)  # (version, digest): the lowest version
                del self._entries[oldest], self._sizes[oldest]


def _decode_stored(session: Session, federation_id: int, blob: memoryview) -> tuple[Tensors, memoryview | None]:
    """Tensors of a stored, digest-checked blob, and the buffer they are views of.

    Views when the blob has the schema's layout (every blob ``safetensors.save`` or a
    fold writes), else a regular decode (no buffer).
    """
    schema_json = session.scalar(select(Federation.schema).where(Federation.id == federation_id))
    layout = codec.Schema.from_json(schema_json).layout()
    if layout.matches(blob):
        return layout.views(blob), blob
    return codec.decode(bytes(blob)), None


# --------------------------------------------------------------------------- retention


def prune(
    session: Session, fed: Federation, *, retain: int, max_staleness: int, now: datetime
) -> list[int]:
    """Drop the blobs of versions outside the retention window; keep their metadata.

    ``retain`` 0 keeps everything. Otherwise the newest ``max(retain, max_staleness + 1)``
    versions keep their weights, so every base version an update may still name within
    the staleness bound stays loadable. Audited when something was pruned.
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
    audit.append(
        session,
        actor="system",
        action=ACTION_VERSIONS_PRUNED,
        subject=f"federation:{fed.id}",
        details={"versions": versions, "kept_from": cutoff, "retain": retain},
        now=now,
    )
    return versions
