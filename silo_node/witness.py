"""The silo as a witness of the coordinator's transparency log, over HTTP.

:func:`witness_once` is one round: fetch the newest checkpoint and the consistency
proof from the last checkpoint this silo accepted, check both (privacy/witness.py),
cosign, hand the cosignature back, and return what is now accepted. It raises
``privacy.witness.ForkDetected`` -- never cosigning -- when the coordinator shows a log
that does not extend the one this silo cosigned; the caller records
``exc.evidence()`` and stops (silo_node/daemon.py; the ledger keeps the checkpoints). The log routes are public: nothing here is signed but the cosignature.
"""

from __future__ import annotations

import base64
from datetime import datetime

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy import witness as w

__all__ = ["LogError", "inclusion_proof", "witness_once"]


class LogError(Exception):
    """The coordinator's log routes did not answer as docs/protocol.md section 8 says."""


def _get(http: httpx.Client, path: str, **params: int) -> httpx.Response:
    r = http.get(f"/api/v1/log{path}", params=params)
    if r.status_code != 200:
        raise LogError(f"GET /api/v1/log{path}: {r.status_code} {r.text[:200]}")
    return r


def witness_once(
    http: httpx.Client, *, accepted: str | None, federation_name: str, silo_id: str,
    log_key: Ed25519PublicKey, key: Ed25519PrivateKey, now: datetime,
) -> w.Witnessed:
    """One witnessing round against the coordinator ``http`` points at (its base URL)."""
    origin = w.log_origin(federation_name)
    shown = _get(http, "/checkpoint").text
    new = w.checked_checkpoint(shown, origin, log_key)
    proof: list[bytes] = []
    if accepted is not None:
        old = w.checked_checkpoint(accepted, origin, log_key)
        if 0 < old.size < new.size:
            body = _get(http, "/proof/consistency", old=old.size, new=new.size).json()
            proof = [base64.b64decode(h, validate=True) for h in body["proof"]]
    done = w.witness(accepted, shown, proof, origin=origin, log_key=log_key,
                     name=w.witness_name(origin, silo_id), key=key, now=now)
    r = http.post("/api/v1/log/cosignatures", json={"size": new.size, "cosignature": done.cosignature})
    if r.status_code != 200:
        raise LogError(f"the coordinator refused the cosignature: {r.status_code} {r.text[:200]}")
    return done


def inclusion_proof(http: httpx.Client, index: int, size: int) -> list[bytes]:
    """The coordinator's inclusion proof of leaf ``index`` in the tree of ``size`` (unverified)."""
    body = _get(http, "/proof/inclusion", index=index, size=size).json()
    return [base64.b64decode(h, validate=True) for h in body["proof"]]
