"""The coordinator's tables (SQLAlchemy 2 declarative).

Portable across SQLite and PostgreSQL: blobs are ``LargeBinary`` (BLOB / BYTEA),
JSON columns are ``JSON``, times are timezone-aware and stored as UTC
(:class:`UTCDateTime`), ids are strings chosen by the application.

JSON columns are not mutation-tracked: assign a new value (``fed.settings =
{**fed.settings, "alpha": 0.5}``), do not mutate the loaded one in place.

The many-to-one ``relationship()`` attributes are there chiefly so that one flush
inserts rows in foreign-key order, whatever order they were added in (e.g. the
update before the model version it produced and the charge it caused).

The schema itself changes only through Alembic (``migrations/``); a test checks
that these models and the migrations agree.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

if TYPE_CHECKING:
    from privacy.envelope import SealedUpdate, UpdateHeader

__all__ = [
    "OptimizerState",
    "ApiToken",
    "AuditEvent",
    "AuditHead",
    "Base",
    "Checkpoint",
    "Cosignature",
    "LogWitness",
    "WitnessCosignature",
    "EnrolmentToken",
    "FedBuffBuffer",
    "FedBuffSlice",
    "Federation",
    "MerkleNode",
    "ModelVersion",
    "PrivacyCharge",
    "Role",
    "Silo",
    "SiloStatus",
    "Update",
    "UpdateStatus",
    "UTCDateTime",
    "utcnow",
]

# Deterministic constraint names, so migrations can refer to them on both databases.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (default for ``created_at`` columns)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware datetime, stored as UTC, returned as aware UTC.

    Naive datetimes are refused: an ambiguous time in an audit-grade record is a bug.
    SQLite has no time zones, so the value is stored there as naive UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise TypeError(f"naive datetime {value!r}: pass a timezone-aware datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class SiloStatus(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    REVOKED = "revoked"


class UpdateStatus(StrEnum):
    ACCEPTED = "accepted"
    BUFFERED = "buffered"
    REJECTED = "rejected"


class Role(StrEnum):
    ADMIN = "admin"
    AUDITOR = "auditor"


def _in(column: str, enum: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(m.value) for m in enum)})"


# JSON where None means SQL NULL rather than the JSON literal 'null'.
_NullableJSON = JSON(none_as_null=True)
Hash = String(64)  # lowercase hex SHA-256
# 64-bit on PostgreSQL; SQLite's INTEGER is 64-bit already (and stays a rowid alias).
BigInt = BigInteger().with_variant(Integer, "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class Federation(Base):
    """The federation (one row, id 1, in practice) and the state the fold lock guards."""

    __tablename__ = "federations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    task_name: Mapped[str] = mapped_column(String(200))
    task_options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # [{"name": ..., "shape": [...], "dtype": ...}, ...] in the model's order.
    schema: Mapped[list[Any]]
    schema_digest: Mapped[str] = mapped_column(Hash)
    # Strategy settings: strategy, alpha, staleness fn and params, max_staleness,
    # buffer_k, server_lr, max_update_norm, accountant, max_update_bytes, ...
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    current_version: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class FedBuffBuffer(Base):
    """FedBuff's buffer of a federation: what its sum holds (``coordinator.buffers``)."""

    __tablename__ = "fedbuff_buffers"
    __table_args__ = (CheckConstraint("kind IN ('float', 'int')", name="kind"),)

    federation_id: Mapped[int] = mapped_column(ForeignKey("federations.id"), primary_key=True)
    slot: Mapped[int] = mapped_column(primary_key=True, autoincrement=False, default=0, server_default="0")  # 0 or 1
    kind: Mapped[str] = mapped_column(String(8), default="float")  # float sum | int sum mod 2**modulus_bits
    modulus_bits: Mapped[int | None]
    count: Mapped[int] = mapped_column(default=0)
    updates: Mapped[list[Any]] = mapped_column(default=list)  # ids summed so far, in arrival order
    #: Being opened (secure aggregation): it takes no more updates; the other slot fills.
    sealed: Mapped[bool] = mapped_column(default=False, server_default=false())


class FedBuffSlice(Base):
    """One slice of a FedBuff sum: raw elements ``[start, start + n)`` of one tensor."""

    __tablename__ = "fedbuff_slices"
    __table_args__ = (
        ForeignKeyConstraint(["federation_id", "slot"], ["fedbuff_buffers.federation_id", "fedbuff_buffers.slot"],
                             name="fk_fedbuff_slices_federation_id_fedbuff_buffers"),
    )

    federation_id: Mapped[int] = mapped_column(primary_key=True)
    slot: Mapped[int] = mapped_column(primary_key=True, autoincrement=False, default=0, server_default="0")
    tensor: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)  # index in the schema's order
    start: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=False)  # first element
    data: Mapped[bytes] = mapped_column(LargeBinary)


class ModelVersion(Base):
    """One global model version; pruned versions keep their metadata (blob NULL)."""

    __tablename__ = "model_versions"

    federation_id: Mapped[int] = mapped_column(ForeignKey("federations.id"), primary_key=True)
    version: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    digest: Mapped[str] = mapped_column(Hash)  # SHA-256 of the safetensors blob
    size: Mapped[int] = mapped_column(BigInt)
    parent_version: Mapped[int | None]
    produced_by_update: Mapped[str | None] = mapped_column(ForeignKey("updates.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Evaluation figures silos reported about this version: {silo_id: {...}}.
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Last: SQLite keeps a zeroblob lazy only in the row's last column (migration 0002).
    blob: Mapped[bytes | None] = mapped_column(LargeBinary)

    federation: Mapped[Federation] = relationship()
    update: Mapped[Update | None] = relationship()


class OptimizerState(Base):
    """FedOpt's moments after the fold that produced a version (``coordinator.optimizer_state``).

    Written in the transaction that writes the version, so a version and its moments
    exist together or not at all; dropped with the version's blob by retention.
    """

    __tablename__ = "optimizer_states"
    __table_args__ = (
        ForeignKeyConstraint(["federation_id", "version"], ["model_versions.federation_id", "model_versions.version"]),
    )

    federation_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    optimizer: Mapped[str] = mapped_column(String(16))  # fedadam | fedyogi | fedadagrad
    data: Mapped[bytes] = mapped_column(LargeBinary)  # safetensors: "m.<name>", "v.<name>"


class CalibrationCache(Base):
    """CA2FL's cache: a silo's latest update to a federation (``coordinator.update_cache``)."""

    __tablename__ = "calibration_cache"

    federation_id: Mapped[int] = mapped_column(ForeignKey("federations.id"), primary_key=True)
    silo_id: Mapped[str] = mapped_column(String(64), ForeignKey("silos.id"), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)  # safetensors: the update's delta


class CalibrationMean(Base):
    """CA2FL's ``h``: the mean of the cached updates when the filling buffer opened."""

    __tablename__ = "calibration_means"

    federation_id: Mapped[int] = mapped_column(ForeignKey("federations.id"), primary_key=True)
    silos: Mapped[int]  # how many cached updates it is the mean of
    data: Mapped[bytes] = mapped_column(LargeBinary)  # safetensors, the model's names


class Silo(Base):
    """A participating institution; its enrolled key pair is its identity."""

    __tablename__ = "silos"
    __table_args__ = (CheckConstraint(_in("status", SiloStatus), name="status"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    federation_id: Mapped[int] = mapped_column(ForeignKey("federations.id"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    status: Mapped[str] = mapped_column(String(16), default=SiloStatus.PENDING)
    signing_key: Mapped[bytes | None] = mapped_column(LargeBinary)  # raw Ed25519 public, 32 B
    hpke_key: Mapped[bytes | None] = mapped_column(LargeBinary)  # raw X25519 public, 32 B
    fingerprint: Mapped[str | None] = mapped_column(String(128))
    epsilon_cap: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    enrolled_at: Mapped[datetime | None]
    last_seen_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    federation: Mapped[Federation] = relationship()


class EnrolmentToken(Base):
    """A one-time enrolment secret for a silo, stored hashed."""

    __tablename__ = "enrolment_tokens"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    silo_id: Mapped[str] = mapped_column(ForeignKey("silos.id"), index=True)
    token_hash: Mapped[str] = mapped_column(Hash, unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]

    silo: Mapped[Silo] = relationship()


class Update(Base):
    """One update a silo sent, whatever became of it, with the exact signed header."""

    __tablename__ = "updates"
    __table_args__ = (CheckConstraint(_in("status", UpdateStatus), name="status"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # chosen by the silo
    silo_id: Mapped[str] = mapped_column(ForeignKey("silos.id"), index=True)
    federation_id: Mapped[int] = mapped_column(ForeignKey("federations.id"))
    base_version: Mapped[int]
    header: Mapped[dict[str, Any]]
    header_bytes: Mapped[bytes] = mapped_column(LargeBinary)  # exactly what was signed
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    envelope_digest: Mapped[str] = mapped_column(Hash)
    payload_digest: Mapped[str] = mapped_column(Hash)
    size: Mapped[int] = mapped_column(BigInt)
    num_samples: Mapped[int] = mapped_column(BigInt)
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(String(64))
    staleness: Mapped[int | None]
    weight: Mapped[float | None] = mapped_column(Float)
    resulting_version: Mapped[int | None]
    epsilon_claimed: Mapped[float | None] = mapped_column(Float)
    epsilon_computed: Mapped[float | None] = mapped_column(Float)
    receipt: Mapped[dict[str, Any] | None] = mapped_column(_NullableJSON)
    receipt_signature: Mapped[bytes | None] = mapped_column(LargeBinary)
    received_at: Mapped[datetime]
    decided_at: Mapped[datetime]

    silo: Mapped[Silo] = relationship()
    federation: Mapped[Federation] = relationship()

    @classmethod
    def of(cls, sealed: SealedUpdate, h: UpdateHeader, *, federation_id: int, size: int, received_at: datetime,
           decided_at: datetime, status: UpdateStatus, **decision: Any) -> Update:
        """The row of one signed envelope and what was decided about it (the one place it is built).

        ``decision``: ``reason``, ``staleness``, ``weight``, ``resulting_version``,
        ``epsilon_computed`` -- whichever the decision produced.
        """
        return cls(
            id=h.update_id,
            silo_id=sealed.signer_id,  # the verified signer: the header's silo id
            federation_id=federation_id,
            base_version=h.base_version,
            header=json.loads(sealed.header_bytes),
            header_bytes=sealed.header_bytes,
            signature=sealed.signature,
            envelope_digest=sealed.envelope_digest,
            payload_digest=h.payload_digest,
            size=size,
            num_samples=h.num_samples,
            status=status.value,
            epsilon_claimed=h.epsilon_claim,
            received_at=received_at,
            decided_at=decided_at,
            **decision,
        )


class PrivacyCharge(Base):
    """The DP parameters of one accepted update: one term of a silo's composition."""

    __tablename__ = "privacy_charges"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    silo_id: Mapped[str] = mapped_column(ForeignKey("silos.id"), index=True)
    update_id: Mapped[str] = mapped_column(ForeignKey("updates.id"), unique=True)
    noise_multiplier: Mapped[float] = mapped_column(Float)
    sample_rate: Mapped[float] = mapped_column(Float)
    steps: Mapped[int]
    max_grad_norm: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    epsilon_after: Mapped[float] = mapped_column(Float)
    epsilon_claimed: Mapped[float | None] = mapped_column(Float)
    accountant: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    silo: Mapped[Silo] = relationship()
    update: Mapped[Update] = relationship()


class AuditEvent(Base):
    """One entry of the hash-chained audit log; written only by ``audit.append``.

    ``at`` and ``details`` are stored as the exact strings that were hashed, so
    verification is byte-exact on every database. Triggers refuse UPDATE and DELETE.
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_actor_seq", "actor", "seq"),
        Index("ix_audit_events_action_seq", "action", "seq"),
        Index("ix_audit_events_subject_seq", "subject", "seq"),
    )

    seq: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=False)
    at: Mapped[str] = mapped_column(String(32))  # "2026-11-21T10:00:00.123456Z"
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100))
    subject: Mapped[str] = mapped_column(String(200))
    details: Mapped[str] = mapped_column(Text)  # canonical JSON text
    prev_hash: Mapped[str] = mapped_column(Hash)
    hash: Mapped[str] = mapped_column(Hash, unique=True)


class AuditHead(Base):
    """The chain head (one row, id 1): locked by every append so appends serialize."""

    __tablename__ = "audit_head"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInt)
    hash: Mapped[str] = mapped_column(Hash)


class ApiToken(Base):
    """An operator or auditor bearer token, stored hashed."""

    __tablename__ = "api_tokens"
    __table_args__ = (CheckConstraint(_in("role", Role), name="role"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # public token id
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(Hash, unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class MerkleNode(Base):
    """A complete subtree of the audit log's RFC 9162 Merkle tree (coordinator/transparency.py).

    ``(level, idx)`` covers leaves ``[idx * 2**level, (idx + 1) * 2**level)``; level 0
    holds the leaf hashes. Written in the same transaction as the audit entry it completes.
    """

    __tablename__ = "merkle_nodes"

    level: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    idx: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary)  # 32 bytes


class Checkpoint(Base):
    """A signed tree head the coordinator issued: the C2SP checkpoint note as served."""

    __tablename__ = "checkpoints"

    size: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=False)
    root: Mapped[bytes] = mapped_column(LargeBinary)
    note: Mapped[str] = mapped_column(Text)  # checkpoint text, blank line, coordinator signature
    issued_at: Mapped[datetime] = mapped_column(default=utcnow)


class LogWitness(Base):
    """A witness of the log that is not a silo (the helper aggregator): its operator-registered key."""

    __tablename__ = "log_witnesses"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    signing_key: Mapped[bytes] = mapped_column(LargeBinary)  # raw Ed25519 public key
    added_at: Mapped[datetime] = mapped_column(default=utcnow)
    removed_at: Mapped[datetime | None] = mapped_column(default=None)


class WitnessCosignature(Base):
    """A registered witness's verified tlog-cosignature/v1 of one checkpoint."""

    __tablename__ = "witness_cosignatures"

    checkpoint_size: Mapped[int] = mapped_column(
        BigInt, ForeignKey("checkpoints.size"), primary_key=True, autoincrement=False
    )
    witness: Mapped[str] = mapped_column(ForeignKey("log_witnesses.name"), primary_key=True)
    timestamp: Mapped[int] = mapped_column(BigInt)
    line: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class Cosignature(Base):
    """A silo's verified tlog-cosignature/v1 of one checkpoint (its note signature line)."""

    __tablename__ = "cosignatures"

    checkpoint_size: Mapped[int] = mapped_column(
        BigInt, ForeignKey("checkpoints.size"), primary_key=True, autoincrement=False
    )
    silo_id: Mapped[str] = mapped_column(ForeignKey("silos.id"), primary_key=True)
    timestamp: Mapped[int] = mapped_column(BigInt)  # POSIX seconds, from the cosignature
    line: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
