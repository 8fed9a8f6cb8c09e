"""The silo as a witness of the coordinator's transparency log, over HTTP.

:func:`witness_once` is one round: fetch the newest checkpoint and the consistency
proof from the last checkpoint this silo accepted, check both (privacy/witness.py),
cosign, hand the cosignature back, and return what is now accepted. It raises
``privacy.witness.ForkDetected`` -- never cosigning -- when the coordinator shows a log
that does not extend the one this silo cosigned; the caller records
``exc.evidence()`` and stops (silo_node/daemon.py; the ledger keeps the checkpoints).
The log routes are public: nothing here is signed but the cosignature. The helper
(helper/witness.py) uses the same three calls with its own key and state.
"""

from __future__ import annotations

import base64
from datetime import datetime

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy import witness as w

__all__ = ["LogError", "consistency_proof", "fetch_checkpoint", "inclusion_proof", "post_cosignature", "witness_once"]


class LogError(Exception):
    """The coordinator's log routes did not answer as docs/protocol.md section 8 says."""


def _get(http: httpx.Client, path: str, **params: int) -> httpx.Response:
    r = http.get(f"/api/v1/log{path}", params=params)
    if r.status_code != 200:
        raise LogError(f"GET /api/v1/log{path}: {r.status_code} {r.text[:200]}")
    return r


def fetch_checkpoint(http: httpx.Client) -> str:
    """The coordinator's newest checkpoint note, as served (unverified)."""
    return _get(http, "/checkpoint").text


def consistency_proof(http: httpx.Client, old: int, new: int) -> list[bytes]:
    """The coordinator's consistency proof between two tree sizes (unverified)."""
    body = _get(http, "/proof/consistency", old=old, new=new).json()
    return [base64.b64decode(h, validate=True) for h in body["proof"]]


def post_cosignature(http: httpx.Client, size: int, line: str) -> None:
    """Hand a cosignature line of checkpoint ``size`` back; LogError if refused."""
    r = http.post("/api/v1/log/cosignatures", json={"size": size, "cosignature": line})
    if r.status_code != 200:
        raise LogError(f"the coordinator refused the cosignature: {r.status_code} {r.text[:200]}")


def witness_once(
    http: httpx.Client, *, accepted: str | None, federation_name: str, silo_id: str,
    log_key: Ed25519PublicKey, key: Ed25519PrivateKey, now: datetime,
) -> w.Witnessed:
    """One witnessing round against the coordinator ``http`` points at (its base URL)."""
    origin = w.log_origin(federation_name)
    return w.witness_round(lambda: fetch_checkpoint(http), lambda old, new: consistency_proof(http, old, new),
                           lambda size, line: post_cosignature(http, size, line), accepted, origin=origin,
                           log_key=log_key, name=w.witness_name(origin, silo_id), key=key, now=now)


def inclusion_proof(http: httpx.Client, index: int, size: int) -> list[bytes]:
    """The coordinator's inclusion proof of leaf ``index`` in the tree of ``size`` (unverified)."""
    body = _get(http, "/proof/inclusion", index=index, size=size).json()
    return [base64.b64decode(h, validate=True) for h in body["proof"]]
