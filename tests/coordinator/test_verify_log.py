"""The offline verifier (python -m privacy.verify_log) against a real database, on SQLite
and PostgreSQL: a log is written, checkpoints are issued and cosigned by a silo's key,
then a copy of the log is altered with the append-only triggers dropped -- an entry
edited, two swapped, one deleted, the tail truncated with the head moved back, an old
entry rewritten with every later hash (and the Merkle tree) recomputed. Each alteration
fails verification, naming the first bad entry; the honest export passes, as JSONL and
as CSV, in a subprocess that has nothing but the standard library and ``cryptography``."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cryptography
import pytest
import sqlalchemy as sa

from coordinator import audit, checkpoints, transparency
from coordinator.db import transaction
from coordinator.models import Federation, MerkleNode, Silo
from privacy import note
from privacy.keys import Identity, raw_public

T0 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
N = 20
FED = "verify log federation"


@dataclass
class Log:
    engine: sa.Engine
    tmp: Path
    roster: Path
    checkpoint_files: dict[int, Path]  # size -> file, each cosigned by the silo


def _now(i: int) -> datetime:
    return T0 + timedelta(seconds=i)


@pytest.fixture
def log(migrated_engine: sa.Engine, tmp_path: Path) -> Log:
    """N entries; after each, a checkpoint cosigned by the silo (kept as a file)."""
    coordinator, silo_key = Identity.generate(), Identity.generate()
    with transaction(migrated_engine) as s:
        s.add(Federation(id=1, name=FED, task_name="csv", schema=[], schema_digest="0" * 64))
        s.add(Silo(id="hospital-a", federation_id=1, name="Hospital A", status="active",
                   signing_key=raw_public(silo_key.signing.public_key()), epsilon_cap=5.0, delta=1e-5))
    origin = checkpoints.origin(FED)
    files = {}
    for i in range(N):
        with transaction(migrated_engine) as s:
            audit.append(s, actor="hospital-a" if i % 2 else "system", action="update_accepted",
                         subject=f"update:{i}", details={"epsilon": 0.1 * i, "note": "ü\u2028x", "i": i},
                         now=_now(i))
            cp = checkpoints.issue(s, coordinator, 1, _now(i))
            text = note.parse_note(cp.note).text
            line = note.cosign(text, checkpoints.witness_name(origin, "hospital-a"), silo_key.signing,
                               int(_now(i).timestamp()))
            checkpoints.add_cosignature(s, 1, cp.size, line, _now(i))
            files[cp.size] = tmp_path / f"checkpoint-{cp.size}.txt"
            files[cp.size].write_text(checkpoints.render(s, cp), encoding="utf-8")
    roster = tmp_path / "roster.txt"
    with transaction(migrated_engine, read_only=True) as s:
        roster.write_text("".join(k + "\n" for k in checkpoints.verifier_keys(s, coordinator, 1)))
    return Log(migrated_engine, tmp_path, roster, files)


def _export(log: Log, fmt: str = "jsonl") -> Path:
    path = log.tmp / f"export.{fmt}"
    with open(path, "w", encoding="utf-8", newline="") as fp, transaction(log.engine, read_only=True) as s:
        (audit.export_jsonl if fmt == "jsonl" else audit.export_csv)(s, fp)
    return path


def _minimal_env(tmp: Path) -> dict[str, str]:
    """A PYTHONPATH with only the verifier's modules and cryptography (and its cffi)."""
    root = tmp / "minimal"
    if not root.exists():
        (root / "privacy").mkdir(parents=True)
        src = Path(__file__).resolve().parents[2] / "privacy"
        for name in ("__init__.py", "merkle.py", "note.py", "verify_log.py"):
            shutil.copy(src / name, root / "privacy" / name)
        site = Path(cryptography.__file__).resolve().parents[1]
        for item in site.iterdir():
            if item.name.startswith(("cryptography", "cffi", "_cffi_backend", "pycparser")):
                (root / item.name).symlink_to(item)
    return {**os.environ, "PYTHONPATH": str(root)}


def _verify(log: Log, export: Path, sizes=(N,), *args: str) -> tuple[int, dict]:
    cmd = [sys.executable, "-S", "-m", "privacy.verify_log", str(export), "--roster", str(log.roster),
           "--min-witnesses", "1", "--json", *args]
    for size in sizes:
        cmd += ["--checkpoint", str(log.checkpoint_files[size])]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_minimal_env(log.tmp), cwd=log.tmp, timeout=120)
    if done.returncode == 2:
        return 2, {"stderr": done.stderr}
    return done.returncode, json.loads(done.stdout)


def _tamper(log: Log, *statements: tuple[str, dict]) -> None:
    """Run SQL with the append-only triggers dropped, as a database owner could."""
    with log.engine.begin() as conn:
        if log.engine.dialect.name == "postgresql":
            conn.exec_driver_sql("DROP TRIGGER audit_events_no_update_delete ON audit_events")
        else:
            conn.exec_driver_sql("DROP TRIGGER audit_events_no_update")
            conn.exec_driver_sql("DROP TRIGGER audit_events_no_delete")
        for sql, params in statements:
            conn.execute(sa.text(sql), params)


def test_the_honest_export_verifies_as_jsonl_and_csv(log: Log) -> None:
    for fmt in ("jsonl", "csv"):
        code, report = _verify(log, _export(log, fmt))
        assert code == 0, report
        assert (report["ok"], report["format"], report["entries"], report["verified_through"]) == (True, fmt, N, N)
        assert report["checkpoints"][0]["witnesses"] == [checkpoints.witness_name(checkpoints.origin(FED),
                                                                                  "hospital-a")]
    # all the checkpoints at once, too
    code, report = _verify(log, _export(log), tuple(log.checkpoint_files))
    assert code == 0 and all(c["matches"] for c in report["checkpoints"])


def test_inputs_that_cannot_be_trusted_are_refused_with_status_2(log: Log) -> None:
    export = _export(log)
    code, out = _verify(log, export, (N,), "--min-witnesses", "2")
    assert code == 2 and "1 witness cosignature(s) verified, 2 required" in out["stderr"]
    forged = log.tmp / "forged.txt"
    forged.write_text(log.checkpoint_files[N].read_text().replace(f"\n{N}\n", f"\n{N + 1}\n", 1))
    log.checkpoint_files[-1] = forged
    code, out = _verify(log, export, (-1,))
    assert code == 2 and "does not verify" in out["stderr"]
    other = log.tmp / "not-an-export.txt"
    other.write_text("hello\n")
    code, out = _verify(log, other)
    assert code == 2 and "neither a JSONL nor a CSV audit export" in out["stderr"]


def _row(log: Log, seq: int) -> dict:
    """Entry ``seq`` as an export dict (read fresh: the test alters rows under the ORM)."""
    with transaction(log.engine, read_only=True) as s:
        return audit.event_to_dict(s.get(audit.AuditEvent, seq, populate_existing=True))


def test_an_edited_entry_is_named(log: Log) -> None:
    _tamper(log, ("UPDATE audit_events SET details = :d WHERE seq = 7", {"d": '{"epsilon":0,"i":6,"note":"x"}'}))
    code, report = _verify(log, _export(log))
    assert (code, report["problem"], report["first_bad_index"]) == (1, "edited", 6)
    code, report = _verify(log, _export(log, "csv"))
    assert (code, report["problem"], report["first_bad_index"]) == (1, "edited", 6)


def test_two_swapped_entries_are_named(log: Log) -> None:
    # entries 5 and 12 trade places (their seq numbers), so the export lists them swapped
    _tamper(log, ("UPDATE audit_events SET seq = -1 WHERE seq = 5", {}),
            ("UPDATE audit_events SET seq = 5 WHERE seq = 12", {}),
            ("UPDATE audit_events SET seq = 12 WHERE seq = -1", {}))
    code, report = _verify(log, _export(log))
    assert (code, report["first_bad_index"]) == (1, 4)


def test_a_deleted_middle_entry_is_named(log: Log) -> None:
    _tamper(log, ("DELETE FROM audit_events WHERE seq = 9", {}))
    code, report = _verify(log, _export(log))
    assert (code, report["problem"], report["first_bad_index"]) == (1, "sequence", 8)


def test_a_truncated_tail_with_the_head_moved_back_is_named(log: Log) -> None:
    head = _row(log, 15)
    _tamper(log, ("DELETE FROM audit_events WHERE seq > 15", {}),
            ("UPDATE audit_head SET seq = 15, hash = :h", {"h": head["hash"]}))
    with transaction(log.engine, read_only=True) as s:
        assert audit.verify(s).ok is False  # the coordinator's own checkpoint of size 20 says so
    code, report = _verify(log, _export(log))
    assert (code, report["problem"], report["first_bad_index"]) == (1, "truncated", 15)
    # with the checkpoint of size 15 as well, the 15 remaining entries are proven intact
    code, report = _verify(log, _export(log), (15, N))
    assert (code, report["first_bad_index"], report["verified_through"]) == (1, 15, 15)


def test_an_appended_entry_is_not_covered(log: Log) -> None:
    with transaction(log.engine) as s:
        audit.append(s, actor="system", action="forged", subject="x", details={}, now=_now(99))
    code, report = _verify(log, _export(log))
    assert (code, report["problem"], report["first_bad_index"]) == (1, "not_covered", N)
    code, report = _verify(log, _export(log), (N,), "--allow-newer")
    assert code == 0 and report["verified_through"] == N and report["entries"] == N + 1


def _rewrite_from(log: Log, seq: int) -> None:
    """Change entry ``seq``, recompute every later hash and the whole Merkle tree, and drop
    the coordinator's own checkpoints: nothing in the database contradicts the new history."""
    rows = [_row(log, k) for k in range(1, N + 1)]
    rows[seq - 1]["details"] = {**rows[seq - 1]["details"], "epsilon": 0}
    statements = []
    prev = rows[seq - 2]["hash"] if seq > 1 else audit.GENESIS_HASH
    for r in rows[seq - 1:]:
        r["prev_hash"] = prev
        r["hash"] = prev = audit.entry_hash(**{f: r[f] for f in ("seq", "at", "actor", "action", "subject",
                                                                  "details", "prev_hash")})
        statements.append(("UPDATE audit_events SET details = :d, prev_hash = :p, hash = :h WHERE seq = :s",
                           {"d": audit.canonical_json(r["details"]).decode(), "p": r["prev_hash"], "h": r["hash"],
                            "s": r["seq"]}))
    statements.append(("UPDATE audit_head SET hash = :h", {"h": prev}))
    statements += [("DELETE FROM merkle_nodes", {}), ("DELETE FROM cosignatures", {}), ("DELETE FROM checkpoints", {})]
    _tamper(log, *statements)
    with transaction(log.engine) as s:
        for i, r in enumerate(rows):
            transparency.append_leaf(s, i, audit.leaf_input(r))
    with transaction(log.engine, read_only=True) as s:
        assert audit.verify(s).ok  # online verification cannot see it: only the witnesses can
        assert s.scalar(sa.select(sa.func.count()).select_from(MerkleNode)) > N


def test_a_rewritten_history_is_named(log: Log) -> None:
    _rewrite_from(log, 6)
    export = _export(log)
    # with every checkpoint the silo cosigned: exactly
    code, report = _verify(log, export, tuple(log.checkpoint_files))
    assert (code, report["problem"], report["first_bad_index"], report["first_bad_index_exact"]) == (
        1, "rewritten", 5, True)
    assert report["verified_through"] == 5
    # with the newest and one older checkpoint: the range between them, which holds it
    code, report = _verify(log, export, (3, N))
    assert (code, report["first_bad_index"], report["last_possible_bad_index"]) == (1, 3, N - 1)
    assert report["first_bad_index_exact"] is False


def test_the_human_report_names_the_entry(log: Log) -> None:
    _tamper(log, ("DELETE FROM audit_events WHERE seq = 3", {}))
    done = subprocess.run([sys.executable, "-m", "privacy.verify_log", str(_export(log)), "--roster",
                           str(log.roster), "--checkpoint", str(log.checkpoint_files[N])],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stdout.startswith("FAILED:") and "first bad entry: seq 3 (leaf index 2)" in done.stdout


def _witnessed_file(log: Log, indices: tuple[int, ...], *, corrupt: bool = False) -> Path:
    """What ``fedsilo-silo ledger --witnessed`` writes: a checkpoint the silo cosigned and
    its receipts' leaves with their audit paths in it."""
    import base64

    lines = [json.dumps({"checkpoint": log.checkpoint_files[N].read_text(), "size": N})]
    with transaction(log.engine, read_only=True) as s:
        for i in indices:
            proof = [base64.b64encode(h).decode() for h in transparency.inclusion_proof(s, i, N)]
            leaf = transparency.leaf_hash_at(s, i).hex()
            if corrupt:
                leaf = "00" * 32
            lines.append(json.dumps({"leaf_index": i, "leaf_hash": leaf, "checkpoint_size": N, "proof": proof}))
    path = log.tmp / f"witnessed-{'-'.join(map(str, indices))}{'-bad' if corrupt else ''}.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_witnessed_leaves_name_a_rewritten_entry_exactly(log: Log) -> None:
    bracketing = _witnessed_file(log, (4, 5))  # the leaf before the rewrite and the rewritten one
    above = _witnessed_file(log, (12,))
    _rewrite_from(log, 6)
    export = _export(log)
    code, report = _verify(log, export, (N,))  # one checkpoint: anywhere in 1..N
    assert (code, report["first_bad_index"], report["last_possible_bad_index"]) == (1, 0, N - 1)
    code, report = _verify(log, export, (N,), "--silo-evidence", str(bracketing))
    assert (code, report["problem"], report["first_bad_index"], report["first_bad_index_exact"]) == (
        1, "rewritten", 5, True)
    assert report["verified_through"] == 5  # the witnessed leaf at index 4 proves seq 1..5
    # a later leaf only bounds it from above
    code, report = _verify(log, export, (N,), "--silo-evidence", str(above))
    assert (code, report["first_bad_index"], report["last_possible_bad_index"]) == (1, 0, 12)


def test_silo_evidence_that_does_not_verify_is_refused(log: Log) -> None:
    bad = _witnessed_file(log, (3,), corrupt=True)
    code, out = _verify(log, _export(log), (N,), "--silo-evidence", str(bad))
    assert code == 2 and "does not verify" in out["stderr"]
