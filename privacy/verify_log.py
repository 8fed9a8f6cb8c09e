"""Verify an audit export against signed, cosigned checkpoints -- offline, trusting no one.

    python -m privacy.verify_log EXPORT --checkpoint FILE [--checkpoint FILE ...]
        (--roster FILE | --coordinator-key VKEY [--witness-key VKEY ...])
        [--min-witnesses N] [--silo-evidence FILE ...] [--allow-newer] [--json]

Needs Python and the ``cryptography`` package only (docs/compliance.md walks through it
step by step). Exit status: 0 the export is exactly the log the checkpoints describe;
1 it is not (the report names the first bad entry); 2 the inputs are unusable (a file
missing, a checkpoint whose signatures do not verify, too few witnesses, an unknown
file format).

What is checked
---------------
1. Each checkpoint file is a C2SP signed note signed by the coordinator's key and
   cosigned (tlog-cosignature/v1) by at least ``--min-witnesses`` of the configured
   witness keys (each silo's enrolled key). Signatures from keys not configured are
   ignored; one that claims a configured key and fails makes the checkpoint unusable.
2. The export's entries, in order, are the leaves of an RFC 9162 Merkle tree (leaf
   input: the entry's JSONL line, privacy/merkle.py). The tree of the first ``size``
   entries must have each checkpoint's root hash, and the export must end at the
   newest checkpoint (``--allow-newer``: later entries are reported, not verified).
3. If not, a second pass names the first bad entry: a line that is not an entry, a
   sequence number out of place (an entry deleted, inserted or moved), an entry whose
   content does not match its own hash (edited), one not linked to the previous
   entry's hash; or, when every entry is self-consistent but a root differs (history
   rewritten with every later hash recomputed), the first entry after the longest
   prefix still proven by a matching checkpoint or a witnessed leaf -- exact when that
   evidence brackets it (a matching checkpoint or leaf just before it, a failing one at
   it), otherwise the range between the two (``--silo-evidence``: the checkpoints each
   silo cosigned and its receipts' audit paths, from ``fedsilo-silo ledger --witnessed``).

Keys are C2SP verifier keys (``<name>+<key id hex>+<base64(type || key)>``) as served by
``GET /api/v1/log/witnesses``; a roster file holds one per line (``#`` comments
allowed), the coordinator's being the one whose name is the checkpoint's origin.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import csv
import hashlib
import io
import itertools
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from privacy import merkle, note

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "EXIT_OK",
    "InputError",
    "Report",
    "Trusted",
    "VerifierKey",
    "chain_bytes",
    "leaf_bytes",
    "WitnessedLeaf",
    "load_checkpoint",
    "load_silo_evidence",
    "main",
    "parse_vkey",
    "read_export",
    "verify_export",
]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
FIELDS = ("seq", "at", "actor", "action", "subject", "details", "prev_hash", "hash")
GENESIS_HASH = "0" * 64
_CHUNK = 16 << 20  # bytes of a JSONL export read at once
_BATCH = 4096  # CSV rows per batch
_BLOCK_LEVEL = 12  # leaves hashed as one perfect subtree: 4096


class InputError(Exception):
    """An input cannot be used (as opposed to: it was used and the log failed)."""


# ------------------------------------------------------------------ keys

@dataclass(frozen=True)
class VerifierKey:
    name: str
    sig_type: int  # 0x01 note signatures (the coordinator), 0x04 cosignatures (witnesses)
    public: Ed25519PublicKey


def parse_vkey(text: str) -> VerifierKey:
    """A C2SP signed-note verifier key: ``name+hex key id+base64(type || 32-byte key)``."""
    try:
        return VerifierKey(*note.parse_vkey(text))
    except note.NoteError as exc:
        raise InputError(str(exc)) from None


def read_roster(path: Path) -> list[VerifierKey]:
    lines = _read_text(path).splitlines()
    return [parse_vkey(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


# ----------------------------------------------------------- checkpoints

@dataclass(frozen=True)
class Trusted:
    """A checkpoint whose coordinator signature and cosignatures verified."""

    file: str
    origin: str
    size: int
    root: bytes
    witnesses: tuple[str, ...]


def load_checkpoint(path: Path, log_keys: Sequence[VerifierKey], witnesses: Sequence[VerifierKey],
                    min_witnesses: int) -> Trusted:
    """Parse and verify one checkpoint file; InputError says why it cannot be trusted."""
    return _trust(_read_text(path), str(path), log_keys, witnesses, min_witnesses)


def _trust(text: str, label: str, log_keys: Sequence[VerifierKey], witnesses: Sequence[VerifierKey],
           min_witnesses: int) -> Trusted:
    try:
        signed = note.parse_note(text)
        cp = note.Checkpoint.parse(signed.text)
        [log_key] = [k for k in log_keys if k.name == cp.origin] or [None]
        if log_key is None:
            raise InputError(f"{label}: no coordinator key named {cp.origin!r} was given")
        note.verify_note_signature(signed, cp.origin, log_key.public)
        vouched = []
        for w in witnesses:
            kid = note.key_id(w.name, note.TYPE_COSIGNATURE_V1, w.public)
            for name, blob in signed.signatures:
                if name == w.name and blob[:4] == kid:
                    note.verify_cosignature(signed.text, name, blob, w.public)
                    vouched.append(name)
    except note.NoteError as exc:
        raise InputError(f"{label}: {exc}") from None
    vouched = sorted(set(vouched))
    if len(vouched) < min_witnesses:
        raise InputError(f"{label}: {len(vouched)} witness cosignature(s) verified, "
                         f"{min_witnesses} required ({', '.join(vouched) or 'none'})")
    return Trusted(label, cp.origin, cp.size, cp.root, tuple(vouched))


@dataclass(frozen=True)
class WitnessedLeaf:
    """A leaf hash proven (by its audit path) to be in a checkpoint a witness cosigned."""

    index: int
    hash: bytes
    source: str


def load_silo_evidence(path: Path, log_keys: Sequence[VerifierKey],
                       witnesses: Sequence[VerifierKey]) -> tuple[list[Trusted], list[WitnessedLeaf]]:
    """Read a silo's ``fedsilo-silo ledger --witnessed`` export: the checkpoints it cosigned
    (each must verify with the coordinator's key and carry at least one configured
    witness's cosignature) and its receipts' leaves with the audit paths that prove them
    in one of those checkpoints. InputError if any of it does not verify."""
    trusted: dict[int, Trusted] = {}
    leaves: list[tuple[int, dict]] = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        label = f"{path}:{n}"
        try:
            item = json.loads(line)
            if "checkpoint" in item:
                t = _trust(item["checkpoint"], label, log_keys, witnesses, 1)
                if t.size in trusted and trusted[t.size].root != t.root:
                    raise InputError(f"{label}: two cosigned checkpoints of size {t.size} differ: the "
                                     "coordinator forked its log (keep this file)")
                trusted[t.size] = t
            else:
                leaves.append((n, item))
        except (ValueError, TypeError, KeyError) as exc:
            raise InputError(f"{label}: not a line of a silo's witnessed export ({exc})") from None
    found = []
    for n, item in leaves:
        label = f"{path}:{n}"
        try:
            index, size = int(item["leaf_index"]), int(item["checkpoint_size"])
            leaf = bytes.fromhex(item["leaf_hash"])
            proof = [base64.b64decode(h, validate=True) for h in item["proof"]]
        except (ValueError, TypeError, KeyError) as exc:
            raise InputError(f"{label}: not a witnessed leaf ({exc})") from None
        if size not in trusted:
            raise InputError(f"{label}: no cosigned checkpoint of size {size} in {path}")
        try:
            merkle.verify_inclusion(leaf, index, size, proof, trusted[size].root)
        except merkle.ProofError as exc:
            raise InputError(f"{label}: the audit path of leaf {index} does not verify: {exc}") from None
        found.append(WitnessedLeaf(index, leaf, label))
    return list(trusted.values()), found


# ------------------------------------------------------------------ export

def _j(s: str) -> str:
    # RFC 8785 string form: Python's escaping with ensure_ascii=False is exactly JCS's.
    return json.dumps(s, ensure_ascii=False)


def leaf_bytes(e: dict, details_text: str) -> bytes:
    """The canonical JSON of all eight fields (the leaf input), from the details' text."""
    return (f'{{"action":{_j(e["action"])},"actor":{_j(e["actor"])},"at":{_j(e["at"])},'
            f'"details":{details_text},"hash":{_j(e["hash"])},"prev_hash":{_j(e["prev_hash"])},'
            f'"seq":{e["seq"]},"subject":{_j(e["subject"])}}}').encode("utf-8")


def chain_bytes(e: dict, details_text: str) -> bytes:
    """The canonical JSON of the seven hashed fields: SHA-256 of it is the entry's ``hash``."""
    return (f'{{"action":{_j(e["action"])},"actor":{_j(e["actor"])},"at":{_j(e["at"])},'
            f'"details":{details_text},"prev_hash":{_j(e["prev_hash"])},'
            f'"seq":{e["seq"]},"subject":{_j(e["subject"])}}}').encode("utf-8")


@dataclass
class Entry:
    """One export record: its leaf input, and its fields when they could be read."""

    leaf: bytes
    fields: dict | None = None
    details_text: str | None = None
    problem: str | None = None


def read_export(path: Path) -> tuple[str, Iterator[list[bytes]]]:
    """``(format, batches of leaf inputs)``: JSONL lines as they are; CSV rows composed
    canonically. Lines end in ``\n`` only (U+2028 inside an entry is text, not a break)."""
    fp = _open(path)
    head = fp.read(64)
    fp.seek(0)
    if head.startswith(b"{"):
        return "jsonl", _jsonl_batches(fp)
    if head.startswith(b"seq,") or head.startswith(b"\xef\xbb\xbfseq,"):
        entries = _csv_entries(fp)
        return "csv", iter(lambda: [e.leaf for e in itertools.islice(entries, _BATCH)], [])
    fp.close()
    raise InputError(f"{path} is neither a JSONL nor a CSV audit export (it should start with "
                     "'{' or with the header 'seq,at,actor,...')")


def _jsonl_batches(fp) -> Iterator[list[bytes]]:
    with fp:
        rest = b""
        while chunk := fp.read(_CHUNK):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            if b"\r" in chunk:  # an export saved with CRLF line ends
                lines = [line.rstrip(b"\r") for line in lines]
            yield [line for line in lines if line]
        if rest.strip():
            yield [rest.rstrip(b"\r")]


def _csv_entries(fp) -> Iterator[Entry]:
    reader = csv.DictReader(io.TextIOWrapper(fp, encoding="utf-8-sig", newline=""))
    if tuple(reader.fieldnames or ()) != FIELDS:
        raise InputError(f"the CSV header must be {','.join(FIELDS)}")
    for row in reader:
        try:
            e = dict(row, seq=int(row["seq"]))
        except (TypeError, ValueError):
            yield Entry(b"", problem=f"seq {row.get('seq')!r} is not an integer")
            continue
        yield Entry(leaf_bytes(e, row["details"]), e, row["details"])


def _parse_leaf(leaf: bytes) -> Entry:
    """Read a JSONL leaf back into fields, requiring its bytes to be the canonical form."""
    try:
        e = json.loads(leaf)
        if not isinstance(e, dict) or set(e) != set(FIELDS):
            raise ValueError("not an object with exactly the eight entry fields")
        if not isinstance(e["seq"], int) or isinstance(e["seq"], bool):
            raise ValueError("seq is not an integer")
        if not all(isinstance(e[f], str) for f in FIELDS if f not in ("seq", "details")):
            raise ValueError("a text field is not a string")
        text = leaf.decode("utf-8")
        prefix = leaf_bytes(e, "\0").decode("utf-8").split("\0")
        if not (text.startswith(prefix[0]) and text.endswith(prefix[1])):
            raise ValueError("the line is not in canonical form")
        details_text = text[len(prefix[0]):len(text) - len(prefix[1])]
    except (ValueError, UnicodeDecodeError) as exc:
        return Entry(leaf, problem=f"not a canonical audit entry: {exc}")
    return Entry(leaf, e, details_text)


# ------------------------------------------------------------------ verify

@dataclass
class Report:
    ok: bool
    format: str
    entries: int
    verified_through: int  # entries proven equal to what the witnesses saw
    checkpoints: list[dict] = field(default_factory=list)
    first_bad_index: int | None = None  # 0-based leaf index (= seq - 1)
    first_bad_index_exact: bool = True
    last_possible_bad_index: int | None = None
    problem: str | None = None
    message: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def verify_export(fmt: str, leaves: Iterable[list[bytes]], trusted: Sequence[Trusted], *, allow_newer: bool = False,
                  reread: Iterable[Entry] | None = None, evidence: Sequence[Trusted] = (),
                  witnessed: Sequence[WitnessedLeaf] = ()) -> Report:
    """Check the leaves against the trusted checkpoints; on failure, find the first bad entry.

    The first pass only hashes the leaves (fast). ``reread`` gives the same entries
    again, parsed, for the diagnostic second pass that runs only on failure.
    ``evidence`` (more cosigned checkpoints, e.g. from silos' ledgers) and ``witnessed``
    (leaf hashes proven in cosigned checkpoints) only narrow down the first bad entry;
    the export must end at the newest of ``trusted``, the officer's own checkpoints.
    """
    newest = max(t.size for t in trusted)
    trusted = [*trusted, *(t for t in evidence if t.size <= newest and t.size not in {u.size for u in trusted})]
    want = {t.size: t.root for t in trusted}
    sizes = sorted(want)
    builder, got = merkle.RootBuilder(), {}
    if 0 in want:
        got[0] = merkle.EMPTY_ROOT
    sha256, block = hashlib.sha256, 1 << _BLOCK_LEVEL
    for batch in leaves:
        hashes = [sha256(b"\x00" + leaf).digest() for leaf in batch]
        i = 0
        while i < len(hashes):
            size = builder.size
            # Whole aligned blocks go in as one perfect subtree (hashed level by level,
            # which is what makes a million entries take seconds), unless a checkpoint
            # size falls inside the block and its prefix root is needed.
            if (size % block == 0 and len(hashes) - i >= block
                    and bisect.bisect_right(sizes, size) == bisect.bisect_right(sizes, size + block - 1)):
                builder.add_subtree(_BLOCK_LEVEL, merkle.perfect_root(hashes[i:i + block]))
                i += block
                if builder.size in want:
                    got[builder.size] = builder.root()
                continue
            builder.add_hash(hashes[i])
            i += 1
            if builder.size in want:
                got[builder.size] = builder.root()
    n = builder.size
    cps = [{"file": t.file, "size": t.size, "witnesses": list(t.witnesses),
            "matches": got.get(t.size) == t.root} for t in sorted({t.size: t for t in trusted}.values(),
                                                                     key=lambda t: t.size)]
    report = Report(False, fmt, n, 0, cps)
    if all(c["matches"] for c in cps) and (n == newest or allow_newer):
        report.ok, report.verified_through = True, newest
        extra = n - newest
        report.message = (f"all {newest} entries covered by the checkpoints are exactly the witnessed log"
                          + (f"; the {extra} later entries are not covered by any checkpoint" if extra else ""))
        return report
    matched = [c["size"] for c in cps if c["matches"]]
    report.verified_through = max(matched, default=0)
    if all(c["matches"] for c in cps):  # n > newest, not allowed
        report.first_bad_index = newest
        report.problem = "not_covered"
        report.message = (f"the export has {n} entries, the newest checkpoint covers {newest}: entries from "
                          f"seq {newest + 1} on were appended after it (use a newer checkpoint, or --allow-newer)")
        return report
    return _diagnose(report, reread, newest, witnessed)


def _diagnose(report: Report, entries: Iterable[Entry] | None, newest: int,
              witnessed: Sequence[WitnessedLeaf] = ()) -> Report:
    bad_cp = min(c["size"] for c in report.checkpoints if not c["matches"])
    lower = max((c["size"] for c in report.checkpoints if c["matches"] and c["size"] < bad_cp), default=0)
    known = {w.index: w.hash for w in witnessed if w.index < newest}
    seen: dict[int, bool] = {}  # witnessed leaf index -> whether the export's leaf there matches

    def fail(index: int, problem: str, message: str) -> Report:
        report.first_bad_index, report.problem, report.message = index, problem, message
        return report

    prev_hash = GENESIS_HASH
    for i, entry in enumerate(entries or ()):
        if i >= newest:
            break
        e = entry.fields
        if e is None:
            return fail(i, "malformed", f"line {i + 1}: {entry.problem}")
        if e["seq"] != i + 1:
            what = "an entry is missing before it" if e["seq"] > i + 1 else "it is out of order or duplicated"
            return fail(i, "sequence", f"entry {i + 1} of the export has seq {e['seq']}: {what}")
        if hashlib.sha256(chain_bytes(e, entry.details_text)).hexdigest() != e["hash"]:
            return fail(i, "edited", f"seq {i + 1} was altered: its content does not match its hash")
        if e["prev_hash"] != prev_hash:
            return fail(i, "unlinked", f"seq {i + 1} does not link to the hash of seq {i}")
        prev_hash = e["hash"]
        if i in known:
            seen[i] = hashlib.sha256(b"\x00" + entry.leaf).digest() == known[i]
    if report.entries < bad_cp:
        unproven = ("" if lower == report.entries else
                    f"; seq {lower + 1}..{report.entries} are not proven intact either (only a checkpoint of "
                    f"that size could prove them)")
        return fail(report.entries, "truncated",
                    f"the export ends at seq {report.entries}, the checkpoint of size {bad_cp} has more: "
                    f"entries from seq {report.entries + 1} were removed{unproven}")
    # Every entry links to the previous one, and a leaf commits to its entry's hash, so
    # a witnessed leaf the export matches proves every entry up to it; one it does not
    # match bounds the first altered entry from above, as a checkpoint that does not.
    lower = max([lower, *(i + 1 for i, same in seen.items() if same and i < bad_cp)])
    upper = min([bad_cp - 1, *(i for i, same in seen.items() if not same)])
    upper = max(upper, lower)
    exact = upper == lower
    where = (f"seq {lower + 1}" if exact else
             f"one of seq {lower + 1}..{upper + 1} (entries before seq {lower + 1} are proven intact, the tree "
             f"through seq {upper + 1} is not the witnessed one; a checkpoint or receipt in between, e.g. a "
             f"silo's --silo-evidence, would narrow it down)")
    report.first_bad_index, report.problem, report.first_bad_index_exact = lower, "rewritten", exact
    report.verified_through = max(report.verified_through, lower)
    report.last_possible_bad_index = None if exact else upper
    report.message = (f"history was rewritten: every entry matches its own hash and link, but the tree of the first "
                      f"{bad_cp} entries is not the one the witnesses cosigned; the first altered entry is {where}")
    return report


# -------------------------------------------------------------------- CLI

def _open(path: Path):
    try:
        return open(path, "rb")  # noqa: SIM115 -- closed by the caller's iteration
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None


def _read_text(path: Path) -> str:
    with _open(path) as f:
        try:
            return f.read().decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{path} is not UTF-8 text") from None


def _entries(path: Path, fmt: str) -> Iterator[Entry]:
    with _open(path) as fp:
        if fmt == "csv":
            yield from _csv_entries(fp)
            return
        for line in fp:
            if line.strip():
                yield _parse_leaf(line.rstrip(b"\n").rstrip(b"\r"))


def verify_file(export: Path, trusted: Sequence[Trusted], *, allow_newer: bool = False,
                evidence: Sequence[Trusted] = (), witnessed: Sequence[WitnessedLeaf] = ()) -> Report:
    fmt, leaves = read_export(export)
    return verify_export(fmt, leaves, trusted, allow_newer=allow_newer, reread=_entries(export, fmt),
                         evidence=evidence, witnessed=witnessed)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m privacy.verify_log", description=__doc__.split("\n\n")[0])
    p.add_argument("export", type=Path, help="the audit export (JSONL or CSV)")
    p.add_argument("--checkpoint", type=Path, action="append", required=True,
                   help="a checkpoint file you kept (repeat for several)")
    p.add_argument("--roster", type=Path, help="file of verifier keys: the coordinator's and the witnesses'")
    p.add_argument("--coordinator-key", action="append", default=[], help="the coordinator's verifier key")
    p.add_argument("--witness-key", action="append", default=[], help="a witness (silo) verifier key")
    p.add_argument("--min-witnesses", type=int, default=1, help="cosignatures required per checkpoint (1)")
    p.add_argument("--silo-evidence", type=Path, action="append", default=[],
                   help="a silo's 'fedsilo-silo ledger --witnessed' export: its cosigned checkpoints and "
                        "receipt leaves narrow down the first bad entry (repeat for several silos)")
    p.add_argument("--allow-newer", action="store_true", help="accept entries after the newest checkpoint")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        keys = read_roster(args.roster) if args.roster else []
        keys += [parse_vkey(k) for k in args.coordinator_key + args.witness_key]
        log_keys = [k for k in keys if k.sig_type == note.TYPE_ED25519]
        witnesses = [k for k in keys if k.sig_type == note.TYPE_COSIGNATURE_V1]
        if not log_keys:
            raise InputError("give the coordinator's key (--coordinator-key or a roster)")
        if args.min_witnesses < 0:
            raise InputError("--min-witnesses must be >= 0")
        trusted = [load_checkpoint(p, log_keys, witnesses, args.min_witnesses) for p in args.checkpoint]
        if len({t.origin for t in trusted}) > 1:
            raise InputError("the checkpoints are of different logs (origins differ)")
        evidence, leaves = [], []
        for path in args.silo_evidence:
            more, found = load_silo_evidence(path, log_keys, witnesses)
            evidence += more
            leaves += found
        if len({t.origin for t in [*trusted, *evidence]}) > 1:
            raise InputError("the silo evidence is of another log (origins differ)")
        report = verify_file(args.export, trusted, allow_newer=args.allow_newer, evidence=evidence, witnessed=leaves)
    except InputError as exc:
        print(f"CANNOT VERIFY: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(f"{'OK' if report.ok else 'FAILED'}: {report.message}")
        print(f"  export: {report.entries} entries ({report.format})")
        for c in report.checkpoints:
            print(f"  checkpoint {c['file']}: size {c['size']}, cosigned by {', '.join(c['witnesses']) or 'nobody'}"
                  f" -- {'matches' if c['matches'] else 'DOES NOT MATCH'}")
        if not report.ok:
            print(f"  first bad entry: seq {report.first_bad_index + 1} (leaf index {report.first_bad_index})"
                  + ("" if report.first_bad_index_exact else f" at the earliest; at the latest seq "
                     f"{report.last_possible_bad_index + 1}"))
    return EXIT_OK if report.ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
