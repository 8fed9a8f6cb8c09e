"""Receipts: the coordinator's signed statement of what it decided about one update.

A receipt is a ``privacy.envelope`` statement of kind ``"receipt"`` (canonical JSON,
signed with the coordinator's Ed25519 key; docs/protocol.md). It names the update
and the audit entry that recorded the decision (``audit_seq``, ``audit_hash``), so a
silo can later prove what the coordinator accepted -- or refused -- and when.

The parsed statement is stored in the update's row; :func:`render` re-encodes it
canonically, which reproduces the signed bytes exactly, so a resend of an accepted
update gets byte-for-byte the original receipt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from privacy.envelope import canonical_json, sign_statement
from privacy.keys import Identity, b64e

__all__ = ["KIND", "render", "sign"]

KIND = "receipt"


def sign(identity: Identity, fields: Mapping) -> tuple[dict, bytes]:
    """Sign ``fields`` as a receipt; return the statement (parsed, with ``kind``) and signature."""
    data, signature = sign_statement(KIND, fields, identity.signing)
    return json.loads(data), signature


def render(receipt: Mapping, signature: bytes) -> dict:
    """The JSON body a silo receives: the receipt's fields, its exact bytes and signature."""
    fields = {k: v for k, v in receipt.items() if k != "kind"}
    return {**fields, "receipt": b64e(canonical_json(dict(receipt))), "signature": b64e(signature)}
