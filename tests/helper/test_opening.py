"""The helper's opening rules against its real database (SQLite and PostgreSQL): a seed is
opened at most once even when two openings race, and nothing is written by a refusal."""

from __future__ import annotations

import hashlib
import threading
from datetime import UTC, datetime

import pytest
import torch
from sqlalchemy import func, select

from helper import audit, roster
from helper.db import make_engine, session_factory, upgrade
from helper.models import HelperOpenedUpdate, HelperOpening
from helper.opening import HelperPolicy, HelperReason, Refused, open_buffer
from privacy import masked_update, secagg
from privacy import envelope as env
from privacy.keys import Identity, b64e
from tests.helper.test_helper_http import FEDERATION, MASK, SCHEMA
from tests.privacy.test_envelope import make_header

K_MIN = 2


@pytest.fixture
def world(db_url: str):
    upgrade(db_url)
    engine = make_engine(db_url)
    factory = session_factory(engine)
    coordinator = Identity.generate()
    policy = HelperPolicy(federation=FEDERATION, k_min=K_MIN, mask=MASK,
                          coordinator_key=coordinator.signing.public_key(), identity=Identity.generate())
    silos = {}
    now = datetime.now(UTC)
    for name in ("s1", "s2", "s3"):
        identity = Identity.generate()
        with factory.begin() as s:
            token = roster.create_silo(s, name, actor="test", now=now)
        with factory.begin() as s:
            roster.enrol(s, token, name, b64e(identity.public().signing), now=now)
        silos[name] = identity
    yield factory, policy, coordinator, silos
    engine.dispose()


def _member(policy, silos, name: str, n: int) -> dict:
    uid = hashlib.sha256(f"{name}/{n}".encode()).hexdigest()[:32]
    header = make_header(b"x" * 8, silo_id=name, update_id=uid, schema_digest=SCHEMA.digest)
    header, _ = masked_update.mask_for_helper(
        {"w": torch.zeros(3, 4), "b": torch.zeros(4)}, header, federation=FEDERATION, settings=MASK,
        helper=policy.identity.hpke.public_key(), signer=silos[name].signing)
    return header.masked


def _call(factory, policy, coordinator, buffer_id: str, members: list[dict]):
    body = env.canonical_json({"federation": FEDERATION, "buffer_id": buffer_id, "schema": SCHEMA.to_json(),
                               "updates": [{"masked": m, "weight": 1} for m in members]})
    headers = {k.lower(): v for k, v in
               env.sign_request("POST", "/open", body, silo_id="coordinator", signer=coordinator.signing).items()}
    return open_buffer(factory, policy, target="/open", body=body, headers=headers, now=datetime.now(UTC))


def test_two_racing_openings_sharing_a_seed_open_it_once(world) -> None:
    factory, policy, coordinator, silos = world
    shared = _member(policy, silos, "s1", 1)
    a = [shared, _member(policy, silos, "s2", 1)]
    b = [shared, _member(policy, silos, "s3", 1)]
    results: dict[str, object] = {}

    def run(name: str, members: list[dict]) -> None:
        try:
            results[name] = _call(factory, policy, coordinator, name, members)
        except Refused as refusal:
            results[name] = refusal

    threads = [threading.Thread(target=run, args=("buf-a", a)), threading.Thread(target=run, args=("buf-b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refusals = [r for r in results.values() if isinstance(r, Refused)]
    assert len(refusals) == 1 and refusals[0].reason is HelperReason.SEED_REUSED
    with factory.begin() as s:
        assert s.scalar(select(func.count()).select_from(HelperOpening)) == 1
        assert s.scalar(select(func.count()).select_from(HelperOpenedUpdate)) == 2
        assert audit.verify(s) is None


def test_a_refusal_writes_only_its_audit_entry(world) -> None:
    factory, policy, coordinator, silos = world
    members = [_member(policy, silos, "s1", 2), _member(policy, silos, "s1", 3)]  # one silo twice
    with pytest.raises(Refused) as err:
        _call(factory, policy, coordinator, "buf-c", members)
    assert err.value.reason is HelperReason.TOO_FEW_SILOS
    with factory.begin() as s:
        assert s.scalar(select(func.count()).select_from(HelperOpening)) == 0
        assert s.scalar(select(func.count()).select_from(HelperOpenedUpdate)) == 0
        assert audit.verify(s) is None
    # the same updates, now with a second silo, still open: a refusal consumed nothing
    members.append(_member(policy, silos, "s2", 2))
    assert _call(factory, policy, coordinator, "buf-d", members).repeated is False
