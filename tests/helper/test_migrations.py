"""The helper's migrations: up, down, up, agreement with its models, and living beside
the coordinator's schema in one database (separate version tables)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from coordinator import db as coordinator_db
from helper.db import downgrade, make_engine, upgrade
from helper.models import HelperBase

HELPER_TABLES = {"helper_silos", "helper_openings", "helper_opened_updates", "helper_admin_tokens", "helper_audit",
                 "helper_log_witness"}


def test_up_down_up_and_the_models_agree(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(db_url)
        assert HELPER_TABLES | {"helper_alembic_version"} == set(sa.inspect(engine).get_table_names())
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM helper_alembic_version")).scalar_one() == "h0002"
            diff = compare_metadata(MigrationContext.configure(conn), HelperBase.metadata)
        assert [d for d in diff if d[0] != "remove_table" or d[1].name != "helper_alembic_version"] == []
        downgrade(db_url)
        assert set(sa.inspect(engine).get_table_names()) == {"helper_alembic_version"}
        upgrade(db_url)
        upgrade(db_url)  # idempotent at head
        assert HELPER_TABLES <= set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_the_helper_and_the_coordinator_can_share_one_database(db_url: str) -> None:
    upgrade(db_url)
    coordinator_db.upgrade(db_url)
    engine = make_engine(db_url)
    try:
        assert coordinator_db.current_revision(engine) == coordinator_db.head_revision()
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM helper_alembic_version")).scalar_one() == "h0002"
    finally:
        engine.dispose()


def test_serve_refuses_a_database_not_at_head(tmp_path) -> None:
    import subprocess
    import sys

    from privacy.keys import Identity, b64e
    from tests.support.helper import helper_cli

    helper_cli("init", "--dir", str(tmp_path), "--federation", "f",
               f"--coordinator-key={b64e(Identity.generate().public().signing)}")
    downgrade(f"sqlite:///{tmp_path / 'helper.db'}")
    done = subprocess.run([sys.executable, "-m", "helper.cli", "serve", "--dir", str(tmp_path), "--port", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not 'h0002'" in done.stderr
    # init's files are private: keys and configuration 0600, the key directory 0700
    for path, mode in ((tmp_path / "helper.toml", 0o600), (tmp_path / "keys", 0o700)):
        assert path.stat().st_mode & 0o777 == mode
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in (tmp_path / "keys").iterdir())
