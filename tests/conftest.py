"""Fixtures shared by every test area: databases.

* ``sqlite_url`` -- a fresh SQLite file in the test's tmp_path (not migrated).
* ``postgres_url`` -- a fresh, empty PostgreSQL database for this test, dropped
  afterwards. The server comes from ``FEDSILO_TEST_POSTGRES_URL`` (default
  ``postgresql+psycopg://postgres@127.0.0.1:5432/test``, used only to create and
  drop the throwaway databases). No server: the test is skipped with the reason --
  unless the variable is set or ``CI=true``, then it fails.
* ``db_url`` -- parametrized over ``sqlite`` and ``postgres`` (marked ``postgres``),
  for contract tests that must hold on both databases. Select one backend with
  ``-k sqlite`` / ``-m "not postgres"``.
* ``migrated_engine`` -- ``db_url`` migrated to head, as an Engine from
  ``coordinator.db.make_engine``.

Area-specific fixtures belong in ``tests/<area>/conftest.py``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

POSTGRES_URL_ENV = "FEDSILO_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _admin_engine(url: URL) -> sa.Engine:
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return sa.create_engine(
        url, isolation_level="AUTOCOMMIT", poolclass=NullPool,
        connect_args={"connect_timeout": 5},
    )


@pytest.fixture(scope="session")
def postgres_server_url() -> URL:
    """URL of a reachable PostgreSQL server (its database is only used for admin)."""
    configured = os.environ.get(POSTGRES_URL_ENV)
    url = make_url(configured or DEFAULT_POSTGRES_URL)
    engine = _admin_engine(url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except sa.exc.OperationalError as exc:
        reason = (
            f"PostgreSQL not reachable at {url.render_as_string(hide_password=True)}: "
            f"{str(exc.orig).strip().splitlines()[0] if exc.orig else exc}"
        )
        if os.environ.get("CI") == "true" or configured:
            pytest.fail(f"{reason} ({POSTGRES_URL_ENV} is set or CI=true)", pytrace=False)
        pytest.skip(f"{reason}; set {POSTGRES_URL_ENV} to a server to run these tests")
    finally:
        engine.dispose()
    return url


@contextlib.contextmanager
def _throwaway_database(server_url: URL) -> Iterator[str]:
    name = f"fedsilo_test_{secrets.token_hex(6)}"
    admin = _admin_engine(server_url)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield server_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            # FORCE: a test that leaked a connection must not leak the database.
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def postgres_url(postgres_server_url: URL) -> Iterator[str]:
    """A throwaway database ``fedsilo_test_<random>``, dropped after the test."""
    with _throwaway_database(postgres_server_url) as url:
        yield url


@pytest.fixture(scope="module")
def postgres_module_url(postgres_server_url: URL) -> Iterator[str]:
    """Like ``postgres_url``, shared by one module's tests (one served coordinator)."""
    with _throwaway_database(postgres_server_url) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'coordinator.db'}"


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def db_url(request: pytest.FixtureRequest) -> str:
    """An empty database URL, once per backend."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def migrated_engine(db_url: str) -> Iterator[sa.Engine]:
    """An Engine on ``db_url`` with the schema at head."""
    # Imported here so that test areas without a database do not load the coordinator.
    from coordinator.db import make_engine, upgrade

    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        yield engine
    finally:
        engine.dispose()
