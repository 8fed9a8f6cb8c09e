"""Signed checkpoints of the audit log and the silos' cosignatures of them.

A checkpoint (C2SP tlog-checkpoint, privacy/note.py) states the size and root hash of
the audit log's Merkle tree, signed with the coordinator's Ed25519 identity key under
the key name :func:`origin` -- ``fedsilo/<federation name, percent-encoded>``, which is
also the origin line. Checkpoints are issued when a fold asks (:func:`issue`), when the
newest one is requested and the log has grown for at least the configured interval
(:func:`latest`), and on an operator's demand.

A silo *witnesses* the log: it checks a new checkpoint is consistent with the last one
it accepted, then cosigns it (tlog-cosignature/v1) with its enrolled Ed25519 key under
the key name :func:`witness_name` and hands the signature line back
(:func:`add_cosignature`). The coordinator verifies it against the silo's enrolled key
before storing it, and serves every checkpoint with all the cosignatures it holds, so
a compliance officer can require several independent witnesses (docs/compliance.md).
"""

from __future__ import annotations

import base64
from datetime import datetime, timedelta
from urllib.parse import unquote

from sqlalchemy import func, select, union_all
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from privacy import note
from privacy.keys import Identity, signing_public_from_raw
from privacy.witness import log_origin, registered_witness_name, witness_name

from . import audit, transparency
from .errors import ApiError, AuthError, CoordinatorError, Reason
from .models import Checkpoint, Cosignature, Federation, LogWitness, Silo, SiloStatus, WitnessCosignature

__all__ = [
    "ACTION_CHECKPOINT_ISSUED",
    "ACTION_COSIGNATURE_REJECTED",
    "ACTION_WITNESS_REGISTERED",
    "DEFAULT_INTERVAL",
    "MAX_CLOCK_SKEW",
    "add_cosignature",
    "due",
    "get",
    "issue",
    "issue_on_demand",
    "latest",
    "newest",
    "newest_cosigned",
    "origin",
    "record_rejection",
    "register_witness",
    "render",
    "verifier_keys",
    "witness_name",
]

#: Least time between two checkpoints issued because the newest one was requested.
DEFAULT_INTERVAL = timedelta(seconds=10)
#: How far in the future a cosignature's timestamp may be.
MAX_CLOCK_SKEW = timedelta(minutes=5)
ACTION_COSIGNATURE_REJECTED = "cosignature_rejected"
ACTION_CHECKPOINT_ISSUED = "checkpoint_issued"
ACTION_WITNESS_REGISTERED = "log_witness_registered"


#: The checkpoint origin of a federation, and a silo's witness key name (privacy/witness.py).
origin = log_origin


def verifier_keys(session: Session, identity: Identity, federation_id: int) -> list[str]:
    """The coordinator's verifier key, then each enrolled silo's witness key (C2SP vkeys).

    What ``python -m privacy.verify_log --roster`` reads. A compliance officer should
    confirm each key's fingerprint with its owner: this list comes from the coordinator.
    """
    log_origin = _origin(session, federation_id)
    keys = [note.vkey(log_origin, note.TYPE_ED25519, identity.signing.public_key())]
    silos = session.scalars(
        select(Silo).where(Silo.federation_id == federation_id, Silo.signing_key.is_not(None)).order_by(Silo.id))
    for silo in silos:
        keys.append(note.vkey(witness_name(log_origin, silo.id), note.TYPE_COSIGNATURE_V1,
                              signing_public_from_raw(silo.signing_key)))
    for w in session.scalars(select(LogWitness).where(LogWitness.removed_at.is_(None)).order_by(LogWitness.name)):
        keys.append(note.vkey(registered_witness_name(log_origin, w.name), note.TYPE_COSIGNATURE_V1,
                              signing_public_from_raw(w.signing_key)))
    return keys


def register_witness(session: Session, federation_id: int, name: str, signing_key: bytes, actor: str,
                     now: datetime) -> str:
    """Register (or re-key) a witness that is not a silo -- the helper aggregator -- and
    audit it; returns its key name. Its cosignatures are then accepted and served."""
    key = signing_public_from_raw(signing_key)  # a real Ed25519 key, or KeyFileError
    row = session.get(LogWitness, name)
    previous = None if row is None else note.vkey(registered_witness_name(_origin(session, federation_id), name),
                                                  note.TYPE_COSIGNATURE_V1, signing_public_from_raw(row.signing_key))
    if row is None:
        row = LogWitness(name=name, signing_key=signing_key, added_at=now)
        session.add(row)
    else:
        row.signing_key, row.removed_at = signing_key, None
    key_name = registered_witness_name(_origin(session, federation_id), name)
    vkey = note.vkey(key_name, note.TYPE_COSIGNATURE_V1, key)
    audit.append(session, actor=actor, action=ACTION_WITNESS_REGISTERED, subject=f"witness:{name}",
                 details={"key": vkey, "previous_key": previous}, now=now)
    return vkey


def _origin(session: Session, federation_id: int) -> str:
    return origin(session.get(Federation, federation_id).name)


def issue(session: Session, identity: Identity, federation_id: int, now: datetime) -> Checkpoint:
    """Sign and store the checkpoint of the log as of now (or return the one of this size)."""
    size = audit.get_head(session)[0]
    existing = session.get(Checkpoint, size)
    if existing is not None:
        return existing
    log_origin = _origin(session, federation_id)
    root = transparency.tree_root(session, size)
    body = note.Checkpoint(log_origin, size, root).text()
    signed = body + "\n" + note.sign_note(body, log_origin, identity.signing) + "\n"
    row = Checkpoint(size=size, root=root, note=signed, issued_at=now)
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:  # a concurrent request issued this size first: same content
        return session.get(Checkpoint, size, populate_existing=True)
    return row


def issue_on_demand(session: Session, identity: Identity, federation_id: int, actor: str, now: datetime) -> Checkpoint:
    """An operator's request: issue the checkpoint of the log now, and audit the request.

    The entry lands after the checkpoint it records (the checkpoint covers the log
    before it); the next checkpoint covers the entry.
    """
    row = issue(session, identity, federation_id, now)
    audit.append(session, actor=actor, action=ACTION_CHECKPOINT_ISSUED, subject=f"checkpoint:{row.size}",
                 details={"size": row.size, "root": base64.b64encode(row.root).decode()}, now=now)
    return row


def latest(
    session: Session, identity: Identity, federation_id: int, now: datetime,
    interval: timedelta = DEFAULT_INTERVAL,
) -> Checkpoint:
    """The newest checkpoint; a new one first if :func:`due` (then ``session`` must be writable)."""
    if due(session, now, interval):
        return issue(session, identity, federation_id, now)
    return newest(session)


def due(session: Session, now: datetime, interval: timedelta = DEFAULT_INTERVAL) -> bool:
    """Whether a new checkpoint is due: none yet, or the log grew and ``interval`` passed."""
    last = newest(session)
    return last is None or (last.size < audit.get_head(session)[0] and now - last.issued_at >= interval)


def newest(session: Session) -> Checkpoint | None:
    """The newest checkpoint issued, if any."""
    return session.scalars(select(Checkpoint).order_by(Checkpoint.size.desc()).limit(1)).first()


def get(session: Session, size: int) -> Checkpoint:
    row = session.get(Checkpoint, size)
    if row is None:
        raise ApiError(Reason.NOT_FOUND, f"no checkpoint of size {size} was issued")
    return row


def newest_cosigned(session: Session, min_cosignatures: int) -> Checkpoint:
    """The newest checkpoint with at least ``min_cosignatures`` cosignatures."""
    both = union_all(select(Cosignature.checkpoint_size.label("size")),
                     select(WitnessCosignature.checkpoint_size.label("size"))).subquery()
    size = session.scalar(
        select(both.c.size).group_by(both.c.size).having(func.count() >= min_cosignatures)
        .order_by(both.c.size.desc()).limit(1)
    )
    if size is None:
        raise ApiError(Reason.NOT_FOUND, f"no checkpoint has {min_cosignatures} cosignatures yet")
    return get(session, size)


def render(session: Session, row: Checkpoint) -> str:
    """The checkpoint note as served: the coordinator's signature, then every cosignature."""
    lines = session.scalars(
        select(Cosignature.line).where(Cosignature.checkpoint_size == row.size).order_by(Cosignature.silo_id)
    ).all()
    lines += session.scalars(
        select(WitnessCosignature.line).where(WitnessCosignature.checkpoint_size == row.size)
        .order_by(WitnessCosignature.witness)
    ).all()
    return row.note + "".join(line + "\n" for line in lines)


def add_cosignature(session: Session, federation_id: int, size: int, line: str,
                    now: datetime) -> Cosignature | WitnessCosignature:
    """Verify a silo's (or a registered witness's) cosignature line of checkpoint ``size`` and store it.

    Authenticated by the cosignature itself: its key name names an enrolled, active
    silo and it verifies with that silo's enrolled key over the stored checkpoint.
    Raises a CoordinatorError naming what is wrong; stores nothing then.
    """
    try:
        name, blob = note.parse_signature_line(line)
    except note.NoteError as exc:
        raise ApiError(Reason.MALFORMED, f"the cosignature line is malformed: {exc}") from None
    row = get(session, size)
    log_origin = _origin(session, federation_id)
    if name.startswith(registered_witness_name(log_origin, "")):
        return _add_witness_cosignature(session, row, log_origin, name, blob, now)
    prefix = witness_name(log_origin, "")
    silo = session.get(Silo, unquote(name[len(prefix):])) if name.startswith(prefix) else None
    if (silo is None or silo.signing_key is None or silo.federation_id != federation_id
            or witness_name(log_origin, silo.id) != name):
        raise AuthError(Reason.UNKNOWN_SILO, f"{name!r} is not the key name of an enrolled silo")
    if silo.status == SiloStatus.REVOKED:
        raise AuthError(Reason.REVOKED)
    cosig = _verified(row, name, blob, signing_public_from_raw(silo.signing_key), now)
    existing = session.get(Cosignature, (size, silo.id))
    if existing is not None:
        if cosig.timestamp > existing.timestamp:  # keep the newest statement of this silo
            existing.timestamp, existing.line, existing.received_at = cosig.timestamp, cosig.line, now
        return existing
    stored = Cosignature(checkpoint_size=size, silo_id=silo.id, timestamp=cosig.timestamp,
                         line=cosig.line, received_at=now)
    session.add(stored)
    session.flush()
    return stored


def _add_witness_cosignature(session: Session, row: Checkpoint, log_origin: str, name: str, blob: bytes,
                             now: datetime) -> WitnessCosignature:
    """A registered witness's cosignature: the same checks as a silo's, against its registered key."""
    witness = session.get(LogWitness, unquote(name[len(registered_witness_name(log_origin, "")):]))
    if witness is None or witness.removed_at is not None or registered_witness_name(log_origin, witness.name) != name:
        raise AuthError(Reason.UNKNOWN_SILO, f"{name!r} is not the key name of a registered witness")
    cosig = _verified(row, name, blob, signing_public_from_raw(witness.signing_key), now)
    existing = session.get(WitnessCosignature, (row.size, witness.name))
    if existing is not None:
        if cosig.timestamp > existing.timestamp:
            existing.timestamp, existing.line, existing.received_at = cosig.timestamp, cosig.line, now
        return existing
    stored = WitnessCosignature(checkpoint_size=row.size, witness=witness.name, timestamp=cosig.timestamp,
                                line=cosig.line, received_at=now)
    session.add(stored)
    session.flush()
    return stored


def _verified(row: Checkpoint, name: str, blob: bytes, key, now: datetime):
    text = note.parse_note(row.note).text
    try:
        cosig = note.verify_cosignature(text, name, blob, key)
    except note.NoteError as exc:
        raise AuthError(Reason.BAD_SIGNATURE, f"the cosignature does not verify: {exc}") from None
    if cosig.timestamp > (now + MAX_CLOCK_SKEW).timestamp():
        raise ApiError(Reason.INVALID_REQUEST, "the cosignature's timestamp is in the future")
    return cosig


def record_rejection(session: Session, size: object, line: object, error: CoordinatorError, now: datetime) -> None:
    """The audit entry of a refused cosignature (written in its own transaction)."""
    claimed = line[:300] if isinstance(line, str) else None
    audit.append(
        session, actor="anonymous", action=ACTION_COSIGNATURE_REJECTED,
        subject=f"checkpoint:{size}" if isinstance(size, int) else "checkpoint",
        details={"reason": error.reason.value, "detail": error.detail, "line": claimed}, now=now,
    )
