"""The helper as a witness of the coordinator's transparency log (issue 12, item 7).

Every federation with secure aggregation then has one witness the coordinator's
operator does not run. Each round -- every ``interval_seconds`` while ``serve`` runs,
or once with ``fedsilo-helper witness run`` -- the helper fetches the coordinator's
newest checkpoint and the consistency proof from the last one it cosigned, checks both
against the coordinator key pinned at ``init`` (privacy/witness.py, the silos' rules),
cosigns (C2SP tlog-cosignature/v1, key name ``<origin>/witness/<name>``, its own
Ed25519 key) and hands the cosignature back; the coordinator accepts it once its
operator registered the helper's key (``POST /api/admin/log/witnesses``).

A validly signed checkpoint that does not extend the one the helper cosigned is a fork
or a rollback: the helper never cosigns it, records the evidence (both checkpoints and
the failed proof) in its own audit log (``log_fork_detected``), and *halts*: every
``/open`` is refused (``log_forked``, signed, audited) until its operator has looked and
runs ``fedsilo-helper witness resume`` (audited). A network or format problem only
postpones witnessing to the next round.

``witness.toml`` in the helper's directory (``fedsilo-helper witness setup``)::

    coordinator_url = "https://fl.example.org"
    federation_name = "example"      # the checkpoint origin is fedsilo/<name>
    interval_seconds = 60
    name = "helper"                  # the name registered at the coordinator
"""

from __future__ import annotations

import base64
import logging
import re
import tomllib
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import tomli_w
from sqlalchemy.orm import Session, sessionmaker

from privacy import note
from privacy import witness as w
from privacy.keys import write_private
from silo_node.witness import LogError, consistency_proof, fetch_checkpoint, post_cosignature

from . import audit
from .models import HelperLogWitness
from .opening import HelperPolicy

__all__ = ["WITNESS_FILE", "Round", "WitnessSettings", "halted_reason", "load_settings", "resume", "witness_round",
           "write_settings"]

log = logging.getLogger("fedsilo.helper.witness")
WITNESS_FILE = "witness.toml"
ACTOR = "coordinator"  # whose log it is
_NAME = re.compile(r"[A-Za-z0-9._~-]{1,64}")


@dataclass(frozen=True)
class WitnessSettings:
    coordinator_url: str
    federation_name: str
    interval_seconds: float = 60.0
    name: str = "helper"

    @property
    def origin(self) -> str:
        return w.log_origin(self.federation_name)

    @property
    def key_name(self) -> str:
        return w.registered_witness_name(self.origin, self.name)


def write_settings(directory: Path, settings: WitnessSettings) -> None:
    if not re.fullmatch(r"https?://\S+", settings.coordinator_url):
        raise ValueError("coordinator_url must be an http(s) URL")
    if not _NAME.fullmatch(settings.name) or not settings.interval_seconds > 0:
        raise ValueError("name: 1 to 64 letters, digits or ._~-; interval_seconds > 0")
    write_private(Path(directory) / WITNESS_FILE, tomli_w.dumps(asdict(settings)).encode(), replace=True)


def load_settings(directory: Path) -> WitnessSettings | None:
    """The witness settings, or None when this helper does not witness (no witness.toml)."""
    path = Path(directory) / WITNESS_FILE
    if not path.exists():
        return None
    with open(path, "rb") as f:
        return WitnessSettings(**tomllib.load(f))


@dataclass(frozen=True)
class Round:
    """What one round did: ``cosigned`` (size), ``forked`` (reason), ``halted``, ``unavailable``."""

    outcome: str
    detail: str
    size: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _state(session: Session, now: datetime) -> HelperLogWitness:
    row = session.get(HelperLogWitness, 1, with_for_update=True)
    if row is None:
        row = HelperLogWitness(id=1, accepted_note=None, halted_reason=None, updated_at=now)
        session.add(row)
        session.flush()
    return row


def halted_reason(factory: sessionmaker[Session]) -> str | None:
    """Why the helper halted after a fork, or None."""
    with factory.begin() as session:
        row = session.get(HelperLogWitness, 1)
        return None if row is None else row.halted_reason


def witness_round(factory: sessionmaker[Session], policy: HelperPolicy, settings: WitnessSettings, *,
                  now: datetime, transport: httpx.BaseTransport | None = None) -> Round:
    """One witnessing round against the coordinator (see the module docstring)."""
    with factory.begin() as session:
        state = _state(session, now)
        accepted, halted = state.accepted_note, state.halted_reason
    if halted is not None:
        return Round("halted", halted)
    try:
        with httpx.Client(base_url=settings.coordinator_url, timeout=30, transport=transport) as http:
            done = w.witness_round(
                lambda: fetch_checkpoint(http), lambda old, new: consistency_proof(http, old, new),
                lambda size, line: post_cosignature(http, size, line), accepted, origin=settings.origin,
                log_key=policy.coordinator_key, name=settings.key_name, key=policy.identity.signing, now=now)
    except w.ForkDetected as exc:
        with factory.begin() as session:
            state = _state(session, now)
            state.halted_reason, state.updated_at = exc.reason, now
            audit.append(session, actor=ACTOR, action="log_fork_detected", subject=settings.origin,
                         details=exc.evidence(), now=now)
        log.error("the coordinator's log is not the one this helper witnessed: %s. /open is refused until "
                  "the operator runs 'fedsilo-helper witness resume'", exc.reason)
        return Round("forked", exc.reason)
    except (LogError, w.WitnessError, httpx.HTTPError, ValueError, KeyError) as exc:
        log.warning("could not witness the coordinator's log this round: %s", exc)
        return Round("unavailable", str(exc))
    cp = done.checkpoint
    with factory.begin() as session:
        state = _state(session, now)
        old = None if state.accepted_note is None else note.Checkpoint.parse(note.parse_note(state.accepted_note).text)
        state.accepted_note, state.updated_at = done.note_text, now
        if old is None or (old.size, old.root) != (cp.size, cp.root):
            audit.append(session, actor=ACTOR, action="log_checkpoint_cosigned", subject=settings.origin,
                         details={"size": cp.size, "root": base64.b64encode(cp.root).decode()},
                         now=now)
    return Round("cosigned", f"cosigned the checkpoint of size {cp.size}", cp.size)


def resume(factory: sessionmaker[Session], *, operator_reason: str, now: datetime) -> str | None:
    """The operator looked at a fork and lets the helper open buffers and witness again,
    trusting the coordinator's log as it now is (audited, with the halted state)."""
    with factory.begin() as session:
        state = _state(session, now)
        was = state.halted_reason
        audit.append(session, actor="operator", action="log_witness_resumed", subject="log",
                     details={"reason": operator_reason, "halted_reason": was,
                              "accepted_checkpoint": state.accepted_note}, now=now)
        state.halted_reason, state.accepted_note, state.updated_at = None, None, now
    return was
