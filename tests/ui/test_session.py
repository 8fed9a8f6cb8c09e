"""Session cookies and CSRF tokens (coordinator/ui/session.py), with an injected clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from coordinator.ui.session import SESSION_SECONDS, SessionKeys
from privacy.keys import Identity

T0 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


@pytest.fixture
def keys() -> SessionKeys:
    return SessionKeys.from_identity(Identity.generate())


def test_a_cookie_names_its_token_and_expires(keys: SessionKeys) -> None:
    cookie, session = keys.issue("tok_abc", now=T0)
    assert keys.check(cookie, now=T0) == session
    assert session.token_id == "tok_abc"
    assert keys.check(cookie, now=T0 + timedelta(seconds=SESSION_SECONDS - 1)) == session
    assert keys.check(cookie, now=T0 + timedelta(seconds=SESSION_SECONDS)) is None


def test_every_cookie_has_its_own_session_id(keys: SessionKeys) -> None:
    a, sa = keys.issue("tok_abc", now=T0)
    b, sb = keys.issue("tok_abc", now=T0)
    assert a != b and sa.sid != sb.sid


@pytest.mark.parametrize("mangle", [
    lambda c: c[:-2] + ("AA" if not c.endswith("AA") else "BB"),  # signature altered
    lambda c: "e30" + c[c.index("."):],  # body replaced by {}
    lambda c: c.replace(".", ""),  # no separator
    lambda c: c + ".x",  # two separators
    lambda c: "",
])
def test_an_altered_cookie_is_refused(keys: SessionKeys, mangle) -> None:
    cookie, _ = keys.issue("tok_abc", now=T0)
    assert keys.check(mangle(cookie), now=T0) is None


def test_another_coordinators_cookie_is_refused(keys: SessionKeys) -> None:
    other = SessionKeys.from_identity(Identity.generate())
    cookie, _ = other.issue("tok_abc", now=T0)
    assert keys.check(cookie, now=T0) is None


def test_the_key_is_the_same_in_every_process_of_one_coordinator() -> None:
    identity = Identity.generate()
    cookie, session = SessionKeys.from_identity(identity).issue("tok_abc", now=T0)
    assert SessionKeys.from_identity(identity).check(cookie, now=T0) == session


def test_a_csrf_token_belongs_to_one_session(keys: SessionKeys) -> None:
    token = keys.csrf_token("sid-1")
    assert keys.csrf_ok("sid-1", token)
    assert not keys.csrf_ok("sid-2", token)
    assert not keys.csrf_ok("sid-1", token[:-1] + ("A" if token[-1] != "A" else "B"))
    assert not keys.csrf_ok("sid-1", None) and not keys.csrf_ok(None, token)


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ValueError):
        SessionKeys(b"short")
