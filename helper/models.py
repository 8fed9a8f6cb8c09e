"""The helper's tables: its roster, its openings, the updates it opened, its audit chain.

A metadata of its own (and its own Alembic version table, ``helper_alembic_version``),
so a helper and a coordinator may even share one PostgreSQL database without
touching each other's schema.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class HelperBase(DeclarativeBase):
    pass


class HelperSilo(HelperBase):
    """A silo on the helper's own roster. ``signing_key`` is set once, at enrolment."""

    __tablename__ = "helper_silos"
    silo_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)  # SHA-256; cleared when used
    signing_key: Mapped[str | None] = mapped_column(String(64))  # base64url raw Ed25519 public key
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    enrolled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class HelperOpening(HelperBase):
    """One opened buffer. ``request_digest`` makes a retry idempotent and a reuse a refusal."""

    __tablename__ = "helper_openings"
    buffer_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_digest: Mapped[str] = mapped_column(String(64))
    updates: Mapped[int] = mapped_column(Integer)
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class HelperOpenedUpdate(HelperBase):
    """Every update (and seed) the helper has ever opened: each at most once, by constraint."""

    __tablename__ = "helper_opened_updates"
    update_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    seed_digest: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 of the seed, never the seed
    silo_id: Mapped[str] = mapped_column(String(128))
    buffer_id: Mapped[str] = mapped_column(ForeignKey("helper_openings.buffer_id"))


class HelperAdminToken(HelperBase):
    __tablename__ = "helper_admin_tokens"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class HelperAuditEntry(HelperBase):
    """A link of the helper's hash chain (recipe in :mod:`helper.audit`)."""

    __tablename__ = "helper_audit"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(128))
    details: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class HelperLogWitness(HelperBase):
    """The helper as a witness of the coordinator's log (helper/witness.py): one row."""

    __tablename__ = "helper_log_witness"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)  # always 1
    accepted_note: Mapped[str | None] = mapped_column(Text, nullable=True)  # the newest checkpoint cosigned
    halted_reason: Mapped[str | None] = mapped_column(Text, nullable=True)  # set on a fork; /open refused
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
