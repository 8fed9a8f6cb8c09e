"""A silo's duties as a witness of the coordinator's transparency log -- pure logic.

:func:`witness` decides whether to cosign a checkpoint the coordinator shows: its
signature must verify with the coordinator's pinned key, its origin must be the
federation's, and it must be consistent (RFC 9162 2.1.4.2) with the last checkpoint
this silo accepted. Then it returns the tlog-cosignature/v1 line to hand back and the
checkpoint to remember. A checkpoint that is *signed* but not consistent is proof that
the coordinator forked, rolled back or rewrote its log: :class:`ForkDetected` carries
both checkpoints and the failed proof, for the silo's ledger and its IT team; the silo
must never cosign for this log again without a human looking.

:func:`verify_inclusion` checks a receipt's entry is in a checkpoint's tree.
No HTTP, no storage: ``silo_node/witness.py`` fetches and posts.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy import merkle, note

__all__ = [
    "ForkDetected",
    "WitnessError",
    "Witnessed",
    "checked_checkpoint",
    "log_origin",
    "registered_witness_name",
    "verify_inclusion",
    "witness",
    "witness_name",
    "witness_round",
]


_SAFE = "-._~"  # RFC 3986 unreserved: note key names may not contain spaces or '+'


def log_origin(federation_name: str) -> str:
    """The checkpoint origin line, also the coordinator's note key name: ``fedsilo/<name>``."""
    return "fedsilo/" + quote(federation_name, safe=_SAFE)


def witness_name(origin: str, silo_id: str) -> str:
    """The key name a silo cosigns with: ``<origin>/silo/<silo id, percent-encoded>``."""
    return f"{origin}/silo/{quote(silo_id, safe=_SAFE)}"


def registered_witness_name(origin: str, witness: str) -> str:
    """The key name of a witness the operator registered (e.g. the helper): ``<origin>/witness/<name>``."""
    return f"{origin}/witness/{quote(witness, safe=_SAFE)}"


class WitnessError(Exception):
    """The checkpoint cannot be witnessed (unsigned, malformed, another log); not a fork."""


class ForkDetected(Exception):
    """A validly signed checkpoint that does not extend the one this silo accepted."""

    def __init__(self, accepted: str, shown: str, proof: Sequence[bytes], reason: str) -> None:
        self.accepted, self.shown, self.proof, self.reason = accepted, shown, list(proof), reason
        super().__init__(reason)

    def evidence(self) -> dict:
        """What to keep: both signed checkpoints as received and the proof that failed."""
        return {"accepted_checkpoint": self.accepted, "shown_checkpoint": self.shown,
                "consistency_proof": [base64.b64encode(h).decode() for h in self.proof], "reason": self.reason}


@dataclass(frozen=True)
class Witnessed:
    """The outcome of :func:`witness`: the cosignature line and the checkpoint now accepted."""

    cosignature: str
    checkpoint: note.Checkpoint
    note_text: str  # the signed note as received; the next call's ``accepted``


def checked_checkpoint(signed_note: str, origin: str, log_key: Ed25519PublicKey) -> note.Checkpoint:
    """The checkpoint in ``signed_note`` after checking the coordinator's signature and origin."""
    try:
        signed = note.parse_note(signed_note)
        cp = note.Checkpoint.parse(signed.text)
        if cp.origin != origin:
            raise WitnessError(f"the checkpoint is of log {cp.origin!r}, not {origin!r}")
        note.verify_note_signature(signed, origin, log_key)
    except note.NoteError as exc:
        raise WitnessError(f"the checkpoint cannot be trusted: {exc}") from None
    return cp


def witness(
    accepted: str | None, shown: str, proof: Sequence[bytes], *, origin: str, log_key: Ed25519PublicKey,
    name: str, key: Ed25519PrivateKey, now: datetime,
) -> Witnessed:
    """Cosign ``shown`` if it extends ``accepted`` (None: the first checkpoint seen).

    ``proof`` is the consistency proof from the accepted size to the shown size. Raises
    WitnessError (nothing learned) or ForkDetected (the log is not append-only).
    """
    new = checked_checkpoint(shown, origin, log_key)
    if accepted is not None:
        old = checked_checkpoint(accepted, origin, log_key)
        if new.size < old.size:
            raise ForkDetected(accepted, shown, proof,
                               f"the log shrank from {old.size} to {new.size} entries (a rollback)")
        try:
            merkle.verify_consistency(old.size, new.size, old.root, new.root, proof)
        except merkle.ProofError as exc:
            raise ForkDetected(accepted, shown, proof,
                               f"the checkpoint of size {new.size} does not extend the one of size {old.size} "
                               f"this silo cosigned: {exc}") from None
    line = note.cosign(new.text(), name, key, int(now.timestamp()))
    return Witnessed(line, new, shown)


def witness_round(
    fetch_checkpoint: Callable[[], str], fetch_consistency: Callable[[int, int], Sequence[bytes]],
    submit: Callable[[int, str], None], accepted: str | None, *, origin: str, log_key: Ed25519PublicKey,
    name: str, key: Ed25519PrivateKey, now: datetime,
) -> Witnessed:
    """One witnessing round, the transport injected (a silo and the helper bring their own):
    fetch the newest checkpoint, the consistency proof from ``accepted`` when the log grew,
    :func:`witness`, then ``submit(size, cosignature line)``. Raises what :func:`witness`
    raises -- never submitting then -- and whatever the callables raise."""
    shown = fetch_checkpoint()
    new = checked_checkpoint(shown, origin, log_key)
    proof: Sequence[bytes] = []
    if accepted is not None:
        old = checked_checkpoint(accepted, origin, log_key)
        if 0 < old.size < new.size:
            proof = fetch_consistency(old.size, new.size)
    done = witness(accepted, shown, proof, origin=origin, log_key=log_key, name=name, key=key, now=now)
    submit(new.size, done.cosignature)
    return done


def verify_inclusion(receipt: Mapping, checkpoint: note.Checkpoint, proof: Sequence[bytes]) -> None:
    """The receipt's audit entry (``leaf_index``, ``leaf_hash``) is in ``checkpoint``'s tree.

    Raises merkle.ProofError.
    """
    if checkpoint.size < receipt["tree_size"]:
        raise merkle.ProofError(f"the checkpoint of size {checkpoint.size} is older than the receipt's entry")
    merkle.verify_inclusion(bytes.fromhex(receipt["leaf_hash"]), receipt["leaf_index"], checkpoint.size,
                            proof, checkpoint.root)
