"""The web pages over real HTTP: a coordinator subprocess, real silos' envelopes, httpx.

Sign-in and its cookie, every page for both roles, CSRF on every form, and for every
admin form: an auditor's POST is refused with 403 and changes nothing. (The browser
tests in test_browser.py drive the same pages from a real Chromium.)
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from coordinator.errors import STATUS, Reason
from coordinator.models import Role
from tests.support.coordinator import FakeSilo, open_context, running_coordinator
from tests.ui.pages import csrf_of, form_routes, sign_in

INVALID = STATUS[Reason.INVALID_REQUEST]
PAGES = ["/ui/", "/ui/silos", "/ui/log", "/ui/checkpoints", "/ui/settings", "/ui/silos/new"]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator:
    with running_coordinator(tmp_path_factory.mktemp("ui")) as running:
        yield running


@pytest.fixture(scope="module")
def federation(server) -> dict:
    """Two silos; three updates folded and one refused (its base version does not exist)."""
    a, b = FakeSilo.create(server, "clinic-a"), FakeSilo.create(server, "clinic-b")
    pushed = []
    for i, silo in enumerate((a, b, a)):
        r = silo.push(silo.seal(silo.delta(seed=i), base_version=i))
        assert r.status_code == 200, r.text
        pushed.append(r.json())
    refused = b.push(b.seal(b.delta(seed=9), base_version=99))
    assert refused.status_code >= 400
    r = server.admin("POST", "/tokens", json={"name": "ui-auditor", "role": "auditor"})
    assert r.status_code == 201, r.text
    return {"silos": (a, b), "receipts": pushed, "auditor": r.json()["token"]}


@pytest.fixture
def admin(server, federation) -> Iterator[httpx.Client]:
    with sign_in(server.base_url, server.admin_token) as client:
        yield client


@pytest.fixture
def auditor(server, federation) -> Iterator[httpx.Client]:
    with sign_in(server.base_url, federation["auditor"]) as client:
        yield client


def state(server) -> tuple:
    """Everything a form could change: silos, settings, tokens and the audit head."""
    silos = server.admin("GET", "/silos").json()
    fed = server.admin("GET", "/federation").json()
    toks = server.admin("GET", "/tokens").json()
    with server.client() as c:
        head = c.get("/api/audit/verify", headers=server.admin_headers).json()["head_seq"]
    return silos, fed, toks, head


# ------------------------------------------------------------------ signing in


def test_sign_in_gives_a_strict_http_only_cookie_that_is_not_the_token(server, federation):
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        page = client.get("/ui/login")
        assert page.status_code == 200 and 'type="password"' in page.text
        r = client.post("/ui/login", data={"csrf": csrf_of(page.text), "token": server.admin_token})
        assert r.status_code == 303 and r.headers["location"] == "/ui/"
        cookies = [v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith("fedsilo_session=")]
        assert len(cookies) == 1
        attrs = [a.strip().lower() for a in cookies[0].split(";")]
        assert "httponly" in attrs and "samesite=strict" in attrs and "path=/ui" in attrs
        assert "secure" not in attrs  # plain HTTP on loopback: a Secure cookie would never come back
        value = cookies[0].split(";")[0].split("=", 1)[1]
        assert server.admin_token not in value and server.admin_token.split("_")[-1] not in value
        assert client.get("/ui/").status_code == 200


def test_the_cookie_is_secure_when_the_browser_came_over_tls(server, federation):
    """Behind a TLS-terminating proxy on loopback (uvicorn trusts its X-Forwarded-Proto)."""
    tls = {"X-Forwarded-Proto": "https"}
    with httpx.Client(base_url=server.base_url, timeout=60, headers=tls) as client:
        page = client.get("/ui/login")
        login_cookie = page.headers["set-cookie"]
        assert login_cookie.startswith("fedsilo_login=") and "; secure" in login_cookie.lower()
        # httpx keeps Secure cookies for https URLs only: hand the nonce back by hand.
        nonce = login_cookie.split(";")[0].split("=", 1)[1]
        r = client.post("/ui/login", data={"csrf": csrf_of(page.text), "token": server.admin_token},
                        headers={"Cookie": f"fedsilo_login={nonce}"})
        assert r.status_code == 303
        session = [v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith("fedsilo_session=")]
        assert "secure" in [a.strip().lower() for a in session[0].split(";")]


def test_pages_send_a_visitor_without_a_session_to_sign_in(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        for path in PAGES:
            r = client.get(path)
            assert r.status_code == 303 and r.headers["location"] == "/ui/login", path
        r = client.post("/ui/silos/new", data={"name": "x", "epsilon_cap": "1", "delta": "1e-5"})
        assert r.status_code == 401


def test_a_wrong_token_or_a_missing_form_token_is_refused(server, federation):
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        page = client.get("/ui/login")
        wrong = client.post("/ui/login", data={"csrf": csrf_of(page.text), "token": "fst_nope_nope"})
        assert wrong.status_code == 401 and "not valid" in wrong.text
        assert "fedsilo_session" not in client.cookies
        no_csrf = client.post("/ui/login", data={"token": server.admin_token})
        assert no_csrf.status_code == 403 and "fedsilo_session" not in client.cookies


def test_signing_out_forgets_the_session(server, admin):
    csrf = csrf_of(admin.get("/ui/").text)
    r = admin.post("/ui/logout", data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    assert "fedsilo_session" not in admin.cookies
    assert admin.get("/ui/").status_code == 303


def test_revoking_a_token_ends_its_sessions(server, federation):
    made = server.admin("POST", "/tokens", json={"name": "short-lived", "role": "auditor"}).json()
    with sign_in(server.base_url, made["token"]) as client:
        assert client.get("/ui/silos").status_code == 200
        assert server.admin("POST", f"/tokens/{made['token_id']}/revoke").status_code == 200
        r = client.get("/ui/silos")
        assert r.status_code == 303 and r.headers["location"] == "/ui/login"


# ----------------------------------------------------------------------- pages


@pytest.mark.parametrize("role", ["admin", "auditor"])
def test_every_page_renders_for_both_roles(server, federation, role, request):
    client = request.getfixturevalue(role)
    a, b = federation["silos"]
    update_id = federation["receipts"][0]["update_id"]
    for path in [*PAGES, f"/ui/updates/{update_id}", f"/ui/log?silo_id={a.silo_id}"]:
        r = client.get(path)
        assert r.status_code == 200, (path, r.text[:500])
        assert "default-src 'none'" in r.headers["content-security-policy"]
        assert r.headers["cache-control"] == "no-store"
        assert "<script" not in r.text
    silos = client.get("/ui/silos").text
    assert "clinic-a" in silos and "clinic-b" in silos
    assert ("Revoke" in silos) == (role == "admin")
    overview = client.get("/ui/").text
    assert 'id="current-version">3<' in overview and "unknown_base_version" in overview
    page = client.get(f"/ui/updates/{update_id}").text
    assert federation["receipts"][0]["audit_hash"] in page.split('id="receipt"')[1]  # the signed receipt
    assert update_id in page and "resulting version" in page and "0.0000 →" in page


def test_the_log_filters_by_silo_and_action_and_pages(server, admin, federation):
    a, b = federation["silos"]
    only_b = admin.get("/ui/log", params={"silo_id": b.silo_id}).text
    assert "update_rejected" in only_b and a.silo_id not in only_b.split('id="events"')[1]
    accepted = admin.get("/ui/log", params={"action": "update_accepted"}).text.split('id="events"')[1]
    assert accepted.count("<code>update_accepted</code>") == 3 and "silo_created" not in accepted
    everything = admin.get("/ui/log").text
    assert 'id="next"' not in everything  # fewer entries than a page
    later = admin.get("/ui/log", params={"since": "2999-01-01"}).text
    assert "no entries match" in later
    paged = admin.get("/ui/log", params={"after": "3"}).text.split('id="events"')[1]
    assert '<td class="num">4</td>' in paged and '<td class="num">3</td>\n    <td class="num">2</td>' not in paged


def test_verify_reports_an_intact_log_to_either_role(auditor):
    r = auditor.post("/ui/checkpoints/verify", data={"csrf": csrf_of(auditor.get("/ui/checkpoints").text)})
    assert r.status_code == 200 and 'class="alert ok" id="verify-result">Intact' in r.text


# ----------------------------------------------------------------------- forms


def _forms(server) -> list[tuple[str, tuple]]:
    from coordinator.app import create_app

    ctx = open_context(server.data_dir)
    try:
        return sorted(form_routes(create_app(ctx).routes))
    finally:
        ctx.close()


def _fill(path: str, silo_id: str) -> str:
    return path.replace("{silo_id}", silo_id)


_VALID = {  # a form that an admin's POST would carry out
    "/ui/silos/new": {"name": "from-auditor", "epsilon_cap": "5", "delta": "1e-5"},
    "/ui/silos/{silo_id}/revoke": {"reason": "auditor tried"},
    "/ui/settings": {"alpha": "0.25"},
}


def test_every_admin_form_is_known_to_this_test(server):
    forms = dict(_forms(server))
    admin_only = {p for p, roles in forms.items() if roles == (Role.ADMIN,)}
    assert admin_only == set(_VALID)
    assert set(forms) - admin_only == {"/ui/logout", "/ui/checkpoints/verify"}


@pytest.mark.parametrize("path", sorted(_VALID))
def test_an_auditor_is_refused_every_admin_form_and_nothing_changes(server, federation, auditor, path):
    csrf = csrf_of(auditor.get("/ui/").text)
    before = state(server)
    r = auditor.post(_fill(path, federation["silos"][0].silo_id), data={"csrf": csrf, **_VALID[path]})
    assert r.status_code == 403, r.text[:300]
    assert "forbidden" in r.text and "Nothing was changed" in r.text
    assert state(server) == before


@pytest.mark.parametrize("path", sorted(_VALID))
def test_an_admin_form_without_the_sessions_csrf_token_is_refused(server, federation, admin, auditor, path):
    other = csrf_of(auditor.get("/ui/").text)  # a real token, of another session
    before = state(server)
    target = _fill(path, federation["silos"][0].silo_id)
    assert admin.post(target, data=_VALID[path]).status_code == 403
    assert admin.post(target, data={"csrf": other, **_VALID[path]}).status_code == 403
    assert admin.post(target, json={"csrf": csrf_of(admin.get("/ui/").text), **_VALID[path]}).status_code == INVALID
    assert state(server) == before


def test_an_admin_creates_a_silo_whose_token_is_shown_once_and_works(server, admin):
    csrf = csrf_of(admin.get("/ui/silos/new").text)
    r = admin.post("/ui/silos/new", data={"csrf": csrf, "name": "clinic-new", "epsilon_cap": "4", "delta": "1e-6"})
    assert r.status_code == 201, r.text[:500]
    token = r.text.split('id="enrolment-token">')[1].split("<")[0]
    assert token not in admin.get("/ui/silos").text
    silo = FakeSilo.enroll(server.base_url, token)  # the shown token is the real one
    assert silo.enrolment["silo_id"] in admin.get("/ui/silos").text
    bad = admin.post("/ui/silos/new", data={"csrf": csrf, "name": "x", "epsilon_cap": "lots", "delta": "1e-6"})
    assert bad.status_code == INVALID and "epsilon_cap must be a number" in bad.text


def test_an_admin_changes_a_setting_and_revokes_a_silo(server, admin, federation):
    csrf = csrf_of(admin.get("/ui/settings").text)
    r = admin.post("/ui/settings", data={"csrf": csrf, "alpha": "0.3"})
    assert r.status_code == 200 and 'id="saved"' in r.text
    assert server.admin("GET", "/federation").json()["settings"]["alpha"] == 0.3
    silo = federation["silos"][1]
    r = admin.post(f"/ui/silos/{silo.silo_id}/revoke", data={"csrf": csrf, "reason": "left the study"})
    assert r.status_code == 303
    assert server.admin("GET", f"/silos/{silo.silo_id}").json()["status"] == "revoked"
    log = admin.get("/ui/log", params={"action": "silo_revoked"}).text
    assert "silo_revoked" in log.split('id="events"')[1]


def test_no_token_reaches_the_log(server, federation):
    """Last in this module: after every sign-in above, the server's output names no token."""
    logs = server.logs()
    for token in (server.admin_token, federation["auditor"]):
        assert token not in logs
