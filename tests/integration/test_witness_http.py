"""A silo witnessing a real coordinator over HTTP (silo_node/witness.py): it cosigns a log
that only grows, proves its receipts' inclusion, and refuses -- with the evidence -- a
coordinator whose database was truncated or rewritten (triggers dropped, hashes, tree
and the coordinator's own checkpoints recomputed) after the silo cosigned."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from privacy import merkle
from privacy import witness as w
from privacy.keys import signing_public_from_raw
from silo_node.witness import witness_once
from tests.support.coordinator import FakeSilo, running_coordinator, verify_receipt
from tests.support.tlog import tamper

FED = "witness-federation"


@pytest.fixture
def server(tmp_path):
    with running_coordinator(tmp_path, name=FED) as srv:
        srv.silo = FakeSilo.create(srv, "hospital-a")
        yield srv


def _round(server, accepted):
    silo = server.silo
    with server.client() as http:
        return witness_once(http, accepted=accepted, federation_name=FED, silo_id=silo.silo_id,
                            log_key=signing_public_from_raw(silo.coordinator.signing), key=silo.identity.signing,
                            now=datetime.now(UTC))


def _grow(server, seed: int) -> dict:
    r = server.silo.push(server.silo.seal(server.silo.delta(seed=seed), base_version=0))
    assert r.status_code == 200, r.text
    return verify_receipt(r.json(), server.silo.coordinator)


def test_an_honest_log_is_witnessed_and_receipts_are_included(server):
    first = _round(server, None)
    receipt = _grow(server, 1)
    assert server.admin("POST", "/log/checkpoint").status_code == 200
    second = _round(server, first.note_text)
    assert second.checkpoint.size > first.checkpoint.size >= 1
    with server.client() as http:
        served = http.get(f"/api/v1/log/checkpoints/{second.checkpoint.size}").text
        assert second.cosignature in served
        body = http.get("/api/v1/log/proof/inclusion",
                        params={"index": receipt["leaf_index"], "size": second.checkpoint.size}).json()
    w.verify_inclusion(receipt, second.checkpoint, [base64.b64decode(h) for h in body["proof"]])
    with pytest.raises(merkle.ProofError):
        w.verify_inclusion({**receipt, "leaf_hash": "00" * 32}, second.checkpoint,
                           [base64.b64decode(h) for h in body["proof"]])
    # nothing new: the same checkpoint is witnessed again
    assert _round(server, second.note_text).checkpoint == second.checkpoint


@pytest.mark.parametrize("alteration", ["truncated", "rewritten"])
def test_a_silo_refuses_to_cosign_an_altered_log(server, alteration):
    _grow(server, 1)
    _grow(server, 2)
    assert server.admin("POST", "/log/checkpoint").status_code == 200
    accepted = _round(server, None)
    size = accepted.checkpoint.size
    if alteration == "truncated":
        tamper(server, keep=size - 2)
    else:
        tamper(server, keep=size, rewrite=2)
    assert server.admin("POST", "/log/checkpoint").status_code == 200
    with pytest.raises(w.ForkDetected) as exc:
        _round(server, accepted.note_text)
    evidence = exc.value.evidence()
    assert evidence["accepted_checkpoint"] == accepted.note_text
    assert f"\n{size}\n" in evidence["accepted_checkpoint"]
    assert ("shrank" if alteration == "truncated" else "forked") in evidence["reason"]
    with server.client() as http:  # and nothing was cosigned
        assert "/silo/" not in http.get("/api/v1/log/checkpoint").text
