"""Fixtures shared by the tiny benchmark runs."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest) -> str:
    """The database a tiny run uses, once per backend."""
    if request.param == "postgres":
        request.getfixturevalue("postgres_server_url")  # skips (or fails under CI) without a server
    return request.param
