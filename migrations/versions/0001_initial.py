"""Initial schema: federation, model versions, silos, updates, privacy charges,
the append-only audit log and its head, API tokens.

Revision ID: 0001
Revises:
Create Date: 2026-11-21

Migrations are frozen history: write types and constraint names out here, do not
import them from coordinator.models (which will have moved on). Every migration
must run on SQLite and PostgreSQL, up and down (tests/coordinator/test_migrations.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENESIS_HASH = "0" * 64
APPEND_ONLY = "audit_events is append-only"

# Types as they were at this revision.
TS = sa.DateTime(timezone=True)  # UTC; naive UTC text on SQLite
HASH = sa.String(64)
BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _created_at() -> sa.Column:
    return sa.Column("created_at", TS, nullable=False)


def upgrade() -> None:
    op.create_table(
        "federations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("task_name", sa.String(200), nullable=False),
        sa.Column("task_options", sa.JSON(), nullable=False),
        sa.Column("schema", sa.JSON(), nullable=False),
        sa.Column("schema_digest", HASH, nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("current_version", sa.Integer(), nullable=False),
        sa.Column("buffer_blob", sa.LargeBinary(), nullable=True),
        sa.Column("buffer_count", sa.Integer(), nullable=False),
        sa.Column("buffer_updates", sa.JSON(), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_federations"),
    )
    op.create_table(
        "silos",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("federation_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("signing_key", sa.LargeBinary(), nullable=True),
        sa.Column("hpke_key", sa.LargeBinary(), nullable=True),
        sa.Column("fingerprint", sa.String(128), nullable=True),
        sa.Column("epsilon_cap", sa.Float(), nullable=False),
        sa.Column("delta", sa.Float(), nullable=False),
        _created_at(),
        sa.Column("enrolled_at", TS, nullable=True),
        sa.Column("last_seen_at", TS, nullable=True),
        sa.Column("revoked_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_silos"),
        sa.ForeignKeyConstraint(["federation_id"], ["federations.id"],
                                name="fk_silos_federation_id_federations"),
        sa.UniqueConstraint("name", name="uq_silos_name"),
        sa.CheckConstraint("status IN ('pending', 'active', 'revoked')", name="ck_silos_status"),
    )
    op.create_table(
        "enrolment_tokens",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("silo_id", sa.String(64), nullable=False),
        sa.Column("token_hash", HASH, nullable=False),
        _created_at(),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("used_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_enrolment_tokens"),
        sa.ForeignKeyConstraint(["silo_id"], ["silos.id"],
                                name="fk_enrolment_tokens_silo_id_silos"),
        sa.UniqueConstraint("token_hash", name="uq_enrolment_tokens_token_hash"),
    )
    op.create_index("ix_enrolment_tokens_silo_id", "enrolment_tokens", ["silo_id"])
    op.create_table(
        "updates",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("silo_id", sa.String(64), nullable=False),
        sa.Column("federation_id", sa.Integer(), nullable=False),
        sa.Column("base_version", sa.Integer(), nullable=False),
        sa.Column("header", sa.JSON(), nullable=False),
        sa.Column("header_bytes", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("envelope_digest", HASH, nullable=False),
        sa.Column("payload_digest", HASH, nullable=False),
        sa.Column("size", BIGINT, nullable=False),
        sa.Column("num_samples", BIGINT, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(64), nullable=True),
        sa.Column("staleness", sa.Integer(), nullable=True),
        sa.Column("weight", sa.Float(), nullable=True),
        sa.Column("resulting_version", sa.Integer(), nullable=True),
        sa.Column("epsilon_claimed", sa.Float(), nullable=True),
        sa.Column("epsilon_computed", sa.Float(), nullable=True),
        sa.Column("receipt", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("receipt_signature", sa.LargeBinary(), nullable=True),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("decided_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_updates"),
        sa.ForeignKeyConstraint(["silo_id"], ["silos.id"], name="fk_updates_silo_id_silos"),
        sa.ForeignKeyConstraint(["federation_id"], ["federations.id"],
                                name="fk_updates_federation_id_federations"),
        sa.CheckConstraint("status IN ('accepted', 'buffered', 'rejected')",
                           name="ck_updates_status"),
    )
    op.create_index("ix_updates_silo_id", "updates", ["silo_id"])
    op.create_index("ix_updates_status", "updates", ["status"])
    op.create_table(
        "model_versions",
        sa.Column("federation_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("digest", HASH, nullable=False),
        sa.Column("size", BIGINT, nullable=False),
        sa.Column("blob", sa.LargeBinary(), nullable=True),
        sa.Column("parent_version", sa.Integer(), nullable=True),
        sa.Column("produced_by_update", sa.String(64), nullable=True),
        _created_at(),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("federation_id", "version", name="pk_model_versions"),
        sa.ForeignKeyConstraint(["federation_id"], ["federations.id"],
                                name="fk_model_versions_federation_id_federations"),
        sa.ForeignKeyConstraint(["produced_by_update"], ["updates.id"],
                                name="fk_model_versions_produced_by_update_updates"),
    )
    op.create_table(
        "privacy_charges",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("silo_id", sa.String(64), nullable=False),
        sa.Column("update_id", sa.String(64), nullable=False),
        sa.Column("noise_multiplier", sa.Float(), nullable=False),
        sa.Column("sample_rate", sa.Float(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("max_grad_norm", sa.Float(), nullable=False),
        sa.Column("delta", sa.Float(), nullable=False),
        sa.Column("epsilon_after", sa.Float(), nullable=False),
        sa.Column("epsilon_claimed", sa.Float(), nullable=True),
        sa.Column("accountant", sa.String(16), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_privacy_charges"),
        sa.ForeignKeyConstraint(["silo_id"], ["silos.id"],
                                name="fk_privacy_charges_silo_id_silos"),
        sa.ForeignKeyConstraint(["update_id"], ["updates.id"],
                                name="fk_privacy_charges_update_id_updates"),
        sa.UniqueConstraint("update_id", name="uq_privacy_charges_update_id"),
    )
    op.create_index("ix_privacy_charges_silo_id", "privacy_charges", ["silo_id"])
    op.create_table(
        "audit_events",
        sa.Column("seq", BIGINT, autoincrement=False, nullable=False),
        sa.Column("at", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(100), nullable=False),
        sa.Column("subject", sa.String(200), nullable=False),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("prev_hash", HASH, nullable=False),
        sa.Column("hash", HASH, nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_events"),
        sa.UniqueConstraint("hash", name="uq_audit_events_hash"),
    )
    op.create_index("ix_audit_events_actor_seq", "audit_events", ["actor", "seq"])
    op.create_index("ix_audit_events_action_seq", "audit_events", ["action", "seq"])
    op.create_index("ix_audit_events_subject_seq", "audit_events", ["subject", "seq"])
    audit_head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", BIGINT, nullable=False),
        sa.Column("hash", HASH, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_head"),
        sa.CheckConstraint("id = 1", name="ck_audit_head_single_row"),
    )
    op.bulk_insert(audit_head, [{"id": 1, "seq": 0, "hash": GENESIS_HASH}])
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("token_hash", HASH, nullable=False),
        _created_at(),
        sa.Column("revoked_at", TS, nullable=True),
        sa.Column("last_used_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.UniqueConstraint("name", name="uq_api_tokens_name"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
        sa.CheckConstraint("role IN ('admin', 'auditor')", name="ck_api_tokens_role"),
    )
    _create_append_only_triggers()


def downgrade() -> None:
    _drop_append_only_triggers()
    op.drop_table("api_tokens")
    op.drop_table("audit_head")
    op.drop_index("ix_audit_events_subject_seq", table_name="audit_events")
    op.drop_index("ix_audit_events_action_seq", table_name="audit_events")
    op.drop_index("ix_audit_events_actor_seq", table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_index("ix_privacy_charges_silo_id", table_name="privacy_charges")
    op.drop_table("privacy_charges")
    op.drop_table("model_versions")
    op.drop_index("ix_updates_status", table_name="updates")
    op.drop_index("ix_updates_silo_id", table_name="updates")
    op.drop_table("updates")
    op.drop_index("ix_enrolment_tokens_silo_id", table_name="enrolment_tokens")
    op.drop_table("enrolment_tokens")
    op.drop_table("silos")
    op.drop_table("federations")


# The triggers make the audit table append-only for everyone who is not able to
# drop them (the schema owner); the hash chain detects what they might do anyway.

def _create_append_only_triggers() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION audit_events_append_only() RETURNS trigger "
            "LANGUAGE plpgsql AS $$ BEGIN "
            f"RAISE EXCEPTION '{APPEND_ONLY}' USING ERRCODE = 'insufficient_privilege'; "
            "END $$"
        )
        op.execute(
            "CREATE TRIGGER audit_events_no_update_delete BEFORE UPDATE OR DELETE "
            "ON audit_events FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()"
        )
        op.execute(
            "CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE "
            "ON audit_events FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only()"
        )
    else:
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_events_no_{verb.lower()} BEFORE {verb} ON audit_events "
                f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END"
            )


def _drop_append_only_triggers() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_truncate ON audit_events")
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_update_delete ON audit_events")
        op.execute("DROP FUNCTION IF EXISTS audit_events_append_only()")
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_delete")
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_update")
