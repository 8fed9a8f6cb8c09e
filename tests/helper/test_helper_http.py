"""The helper aggregator over real HTTP: it opens only what its rules allow, audits every
decision, and signs every answer."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import httpx
import pytest
import torch
from sqlalchemy import select

from helper.db import make_engine, session_factory
from helper.models import HelperAuditEntry
from privacy import codec, masked_update, secagg
from privacy import envelope as env
from privacy.keys import Identity, b64d, b64e, hpke_public_from_raw, signing_public_from_raw
from tests.support.helper import helper_cli, running_helper

FEDERATION = "fed-secagg-test"
MASK = secagg.MaskSettings(clip=1.0, scale=2**16, max_updates=64, max_weight=256)
SCHEMA = codec.Schema.of({"w": torch.zeros(3, 4), "b": torch.zeros(4)})
SILOS = ("silo-a", "silo-b", "silo-c")


@pytest.fixture(scope="module")
def coordinator() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def helper(tmp_path_factory, coordinator):
    with running_helper(tmp_path_factory.mktemp("helper"), federation=FEDERATION,
                        coordinator_key=b64e(coordinator.public().signing), k_min=3) as running:
        yield running


@pytest.fixture(scope="module")
def silos(helper) -> dict[str, Identity]:
    """Three silos on the helper's roster, enrolled with their one-time tokens."""
    out = {}
    for silo_id in SILOS:
        created = helper.admin("POST", "/admin/silos", json={"silo_id": silo_id})
        assert created.status_code == 201, created.text
        identity = Identity.generate()
        body = {"silo_id": silo_id, "signing_key": b64e(identity.public().signing)}
        with httpx.Client(base_url=helper.base_url) as c:
            answer = c.post("/enrol", json=body, headers={"Authorization": f"Bearer {created.json()['token']}"})
            assert answer.status_code == 200, answer.text
            again = c.post("/enrol", json=body, headers={"Authorization": f"Bearer {created.json()['token']}"})
            assert again.status_code == 401 and again.json()["reason"] == "bad_token"  # one-time
        out[silo_id] = identity
    return out


def _helper_hpke(helper):
    return hpke_public_from_raw(b64d(helper.init["helper_keys"]["hpke_key"]))


def masked(helper, silo_id: str, identity: Identity, n: int):
    """One masked update: (its ``masked`` header member, the coordinator's share, q)."""
    x = {"w": torch.full((3, 4), 0.01 * n), "b": torch.linspace(-0.5, 0.5, 4)}
    q = secagg.quantize(x, MASK)
    seed, uid = secagg.new_seed(), hashlib.sha256(f"{silo_id}/{n}".encode()).hexdigest()[:32]
    payload = codec.encode(secagg.to_wire(secagg.mask_update(q, seed, uid)))
    header = env.UpdateHeader(
        silo_id=silo_id, update_id=uid, base_version=0, created_at=env.utc_timestamp(), num_samples=10,
        dp={"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10, "max_grad_norm": 1.0, "delta": 1e-5},
        epsilon_claim=1.0, payload_digest=hashlib.sha256(payload).hexdigest(), payload_size=len(payload),
        schema_digest=SCHEMA.digest, payload_kind=env.MASKED_DELTA,
    )
    member = masked_update.make_masked(header, federation=FEDERATION, seed=seed, helper=_helper_hpke(helper),
                                       signer=identity.signing)
    share = secagg.from_wire(codec.decode(payload))
    return dataclasses.replace(header, masked=member).masked, share, q


def ask(helper, coordinator: Identity | None, buffer_id: str, updates: list[tuple[dict, int]],
        *, tamper=None) -> httpx.Response:
    body = env.canonical_json({"federation": FEDERATION, "buffer_id": buffer_id, "schema": SCHEMA.to_json(),
                               "updates": [{"masked": m, "weight": w} for m, w in updates]})
    headers = {"Content-Type": "application/json"}
    if coordinator is not None:
        headers |= env.sign_request("POST", "/open", body, silo_id="coordinator", signer=coordinator.signing)
    if tamper is not None:
        body = tamper(body)
    with httpx.Client(base_url=helper.base_url, timeout=120) as c:
        return c.post("/open", content=body, headers=headers)


def check_signed(helper, response: httpx.Response) -> dict:
    key = signing_public_from_raw(b64d(helper.init["helper_keys"]["signing_key"]))
    data = b64d(response.headers["Fedsilo-Helper-Statement"])
    statement = env.verify_statement("helper_response", data, b64d(response.headers["Fedsilo-Helper-Signature"]), key)
    assert statement["status"] == response.status_code
    assert statement["body_digest"] == hashlib.sha256(response.content).hexdigest()
    return statement


def last_audit(helper) -> HelperAuditEntry:
    engine = make_engine(f"sqlite:///{helper.data_dir / 'helper.db'}")
    try:
        with session_factory(engine).begin() as session:
            return session.execute(select(HelperAuditEntry).order_by(HelperAuditEntry.seq.desc()).limit(1)).scalar_one()
    finally:
        engine.dispose()


def refused(helper, response: httpx.Response, reason: str, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.json()["reason"] == reason
    check_signed(helper, response)
    entry = last_audit(helper)
    assert entry.action == "open_refused" and json.loads(entry.details)["reason"] == reason


def test_an_opening_adds_up_and_a_retry_gets_the_same_signed_answer(helper, silos, coordinator) -> None:
    weights = {"silo-a": 3, "silo-b": 1, "silo-c": 256}
    updates, total, plain = [], None, {"w": 0, "b": 0}
    for n, (silo_id, identity) in enumerate(silos.items()):
        member, share, q = masked(helper, silo_id, identity, n)
        updates.append((member, weights[silo_id]))
        total = secagg.add_weighted(total, share, weights[silo_id])
        plain = {k: plain[k] + weights[silo_id] * q[k] for k in plain}
    first = ask(helper, coordinator, "buf-1", updates)
    assert first.status_code == 200, first.text
    check_signed(helper, first)
    helper_sum = secagg.from_wire(codec.decode(first.content))
    opened = secagg.open_sum(total, helper_sum, MASK.scale)
    for name in plain:
        assert torch.equal(opened[name] * MASK.scale, plain[name].to(torch.float64))
    entry = last_audit(helper)
    assert entry.action == "opened" and entry.subject == "buf-1"
    assert json.loads(entry.details)["weights"] == [3, 1, 256]
    # a retry (the coordinator crashed before it stored the answer): the same bytes
    again = ask(helper, coordinator, "buf-1", updates)
    assert again.status_code == 200 and again.content == first.content
    # the same seeds under another buffer id: never opened twice
    refused(helper, ask(helper, coordinator, "buf-2", updates), "seed_reused", 409)
    # other contents under an opened buffer id
    fresh = [masked(helper, s, i, 10 + n)[0] for n, (s, i) in enumerate(silos.items())]
    refused(helper, ask(helper, coordinator, "buf-1", [(m, 1) for m in fresh]), "buffer_reused", 409)


def test_fewer_than_k_min_distinct_silos_are_refused(helper, silos, coordinator) -> None:
    one = [masked(helper, "silo-a", silos["silo-a"], 20 + n)[0] for n in range(3)]
    refused(helper, ask(helper, coordinator, "buf-one-silo", [(m, 1) for m in one]), "too_few_silos", 422)
    two = [masked(helper, s, silos[s], 30)[0] for s in ("silo-a", "silo-b")]
    refused(helper, ask(helper, coordinator, "buf-two", [(m, 1) for m in two]), "too_few_silos", 422)


def test_a_silo_the_helper_does_not_know_is_refused(helper, silos, coordinator) -> None:
    stranger = Identity.generate()  # enrolled with the coordinator, perhaps; not with the helper
    updates = [masked(helper, s, silos[s], 40)[0] for s in ("silo-a", "silo-b")]
    updates.append(masked(helper, "silo-invented", stranger, 40)[0])
    refused(helper, ask(helper, coordinator, "buf-stranger", [(m, 1) for m in updates]), "unknown_silo", 403)
    # a real silo id with a key the coordinator made up
    forged = masked(helper, "silo-c", stranger, 41)[0]
    refused(helper, ask(helper, coordinator, "buf-forged", [(m, 1) for m in updates[:2] + [forged]]),
            "bad_signature", 401)


def test_altered_or_out_of_range_weights_are_refused(helper, silos, coordinator) -> None:
    updates = [(masked(helper, s, silos[s], 50)[0], 2) for s in SILOS]
    refused(helper, ask(helper, coordinator, "buf-w", updates,
                        tamper=lambda b: b.replace(b'"weight":2', b'"weight":9', 1)), "not_signed", 401)
    for i, bad in enumerate((0, 257, -1, 1.5, True)):
        refused(helper, ask(helper, coordinator, f"buf-w{i}", [(updates[0][0], bad), *updates[1:]]),
                "weight_out_of_range", 422)
    # none of those opened anything: the same updates still open once, correctly signed
    assert ask(helper, coordinator, "buf-w-ok", updates).status_code == 200


def test_an_unsigned_or_wrongly_signed_request_is_refused(helper, silos, coordinator) -> None:
    updates = [(masked(helper, s, silos[s], 60)[0], 1) for s in SILOS]
    refused(helper, ask(helper, None, "buf-unsigned", updates), "not_signed", 401)
    refused(helper, ask(helper, Identity.generate(), "buf-other-key", updates), "not_signed", 401)


def test_a_revoked_silo_is_refused_and_the_audit_chain_verifies(helper, silos, coordinator) -> None:
    updates = [(masked(helper, s, silos[s], 70)[0], 1) for s in SILOS]
    done = helper_cli("silo", "revoke", "--dir", str(helper.data_dir), "silo-c")
    assert done == {"silo_id": "silo-c", "revoked": True}
    refused(helper, ask(helper, coordinator, "buf-revoked", updates), "revoked", 403)
    assert helper_cli("audit", "verify", "--dir", str(helper.data_dir)) == {"ok": True, "first_bad_seq": None}


def test_health_and_metrics(helper, silos) -> None:
    with httpx.Client(base_url=helper.base_url) as c:
        health = c.get("/healthz").json()
        metrics = c.get("/metrics").text
    assert health["status"] == "ok" and health["federation"] == FEDERATION
    assert "fedsilo_helper_openings_total 2.0" in metrics  # buf-1 and buf-w-ok; the retry is not counted
    assert "fedsilo_helper_open_seconds_count 2.0" in metrics  # timed like the openings: retries not counted
    assert 'fedsilo_helper_refusals_total{reason="seed_reused"} 1.0' in metrics
