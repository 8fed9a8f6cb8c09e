"""C2SP signed notes, tlog-checkpoints and tlog-cosignature/v1, with Ed25519 only.

A *signed note* (c2sp.org/signed-note) is UTF-8 text ending in a newline, a blank line,
then one line per signature: ``— <key name> <base64(key ID || signature)>`` (U+2014,
space). The text is separated from the signatures by the last blank line.

* Note signature (type 0x01): Ed25519 over the note text (with its final newline);
  key ID = ``SHA-256(name || 0x0A || 0x01 || public key)[:4]``.
* Cosignature v1 (type 0x04, c2sp.org/tlog-cosignature): the signature bytes are
  ``timestamp (u64, big-endian) || Ed25519 signature`` over
  ``"cosignature/v1\\ntime <timestamp>\\n" || note text``; key ID =
  ``SHA-256(name || 0x0A || 0x04 || public key)[:4]``.

A *checkpoint* (c2sp.org/tlog-checkpoint) is a note whose text is the origin line, the
tree size in decimal (no leading zeros) and the base64 root hash, each on its own line,
followed by optional extension lines.

The verifiers follow the signed-note rules: signature lines from unknown keys (a name
or key ID not configured) are ignored; a line that matches a known key must verify.
Standard library and ``cryptography`` only; nothing here knows HTTP or SQL.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from privacy.merkle import HASH_SIZE

__all__ = [
    "COSIGNATURE_HEADER",
    "Checkpoint",
    "Cosignature",
    "MAX_SIGNATURES",
    "NoteError",
    "SignedNote",
    "TYPE_COSIGNATURE_V1",
    "TYPE_ED25519",
    "cosign",
    "key_id",
    "parse_note",
    "parse_vkey",
    "parse_signature_line",
    "sign_note",
    "signature_line",
    "verify_cosignature",
    "verify_note_signature",
    "vkey",
]

DASH = "\u2014"
COSIGNATURE_HEADER = "cosignature/v1"
TYPE_ED25519 = 0x01
TYPE_COSIGNATURE_V1 = 0x04
#: Signature lines accepted in one note (the spec asks for at least 16).
MAX_SIGNATURES = 256
MAX_NOTE_BYTES = 64 * 1024
_MAX_TIMESTAMP = 2**63 - 1


class NoteError(Exception):
    """A note, checkpoint or signature is malformed or does not verify; ``str`` says why."""


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _check_name(name: str) -> None:
    if not name or any(c.isspace() or c == "+" for c in name):
        raise NoteError(f"key name {name!r} is empty or contains a space or '+'")


def key_id(name: str, sig_type: int, public: Ed25519PublicKey) -> bytes:
    """``SHA-256(name || "\\n" || type || raw public key)[:4]``."""
    _check_name(name)
    return hashlib.sha256(name.encode() + b"\n" + bytes([sig_type]) + _raw(public)).digest()[:4]


def vkey(name: str, sig_type: int, public: Ed25519PublicKey) -> str:
    """A C2SP verifier key: ``<name>+<key ID, hex>+<base64(type || raw public key)>``."""
    kid = key_id(name, sig_type, public)
    return f"{name}+{kid.hex()}+{base64.b64encode(bytes([sig_type]) + _raw(public)).decode()}"


def parse_vkey(text: str) -> tuple[str, int, Ed25519PublicKey]:
    """``(name, signature type, key)`` of a verifier key; the key ID must match."""
    try:
        name, kid_hex, b64 = text.strip().split("+", 2)  # base64 may contain "+" too
        raw = base64.b64decode(b64, validate=True)
        kid = bytes.fromhex(kid_hex)
    except (ValueError, binascii.Error):
        raise NoteError(f"not a verifier key (name+keyid+base64): {text.strip()[:80]!r}") from None
    if len(raw) != 33 or raw[0] not in (TYPE_ED25519, TYPE_COSIGNATURE_V1):
        raise NoteError(f"verifier key {name!r} is not an Ed25519 key of type 0x01 or 0x04")
    public = Ed25519PublicKey.from_public_bytes(raw[1:])
    if key_id(name, raw[0], public) != kid:
        raise NoteError(f"verifier key {name!r}: the key ID does not match the key")
    return name, raw[0], public


def signature_line(name: str, key_hash: bytes, signature: bytes) -> str:
    """One note signature line, without its newline."""
    return f"{DASH} {name} {base64.b64encode(key_hash + signature).decode()}"


@dataclass(frozen=True, slots=True)
class SignedNote:
    """A parsed note: its text (with the final newline) and its signature lines."""

    text: str
    signatures: tuple[tuple[str, bytes], ...]  # (key name, key ID || signature)

    def render(self) -> str:
        lines = [signature_line(name, blob[:4], blob[4:]) for name, blob in self.signatures]
        return self.text + "\n" + "".join(line + "\n" for line in lines)


def parse_note(note: str | bytes) -> SignedNote:
    """Split a signed note into its text and signature lines (nothing verified yet)."""
    if isinstance(note, bytes):
        if len(note) > MAX_NOTE_BYTES:
            raise NoteError("the note is too large")
        try:
            note = note.decode("utf-8")
        except UnicodeDecodeError:
            raise NoteError("the note is not UTF-8") from None
    if len(note) > MAX_NOTE_BYTES:
        raise NoteError("the note is too large")
    if any(ord(c) < 0x20 and c != "\n" for c in note):
        raise NoteError("the note contains control characters")
    if not note.endswith("\n"):
        raise NoteError("the note does not end with a newline")
    sep = note.rfind("\n\n")
    if sep < 0:
        raise NoteError("the note has no blank line before its signatures")
    text, sig_block = note[: sep + 1], note[sep + 2:]
    signatures = []
    for line in sig_block.splitlines():
        signatures.append(parse_signature_line(line))
    if not signatures:
        raise NoteError("the note has no signature lines")
    if len(signatures) > MAX_SIGNATURES:
        raise NoteError("the note has too many signatures")
    return SignedNote(text, tuple(signatures))


def parse_signature_line(line: str) -> tuple[str, bytes]:
    """``(key name, key ID || signature)`` of one signature line (no newline)."""
    prefix = DASH + " "
    if not line.startswith(prefix):
        raise NoteError(f"not a signature line: {line[:80]!r}")
    parts = line[len(prefix):].split(" ")
    if len(parts) != 2:
        raise NoteError(f"a signature line is '{DASH} <name> <base64>': {line[:80]!r}")
    name, b64 = parts
    _check_name(name)
    try:
        blob = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise NoteError(f"the signature of {name!r} is not base64") from None
    if len(blob) < 5:
        raise NoteError(f"the signature of {name!r} is too short")
    return name, blob


def sign_note(text: str, name: str, private: Ed25519PrivateKey) -> str:
    """The signature line (type 0x01) of ``name``'s key over the note ``text``."""
    if not text.endswith("\n"):
        raise NoteError("note text must end with a newline")
    kid = key_id(name, TYPE_ED25519, private.public_key())
    return signature_line(name, kid, private.sign(text.encode()))


def verify_note_signature(note: SignedNote, name: str, public: Ed25519PublicKey) -> None:
    """The note carries a valid 0x01 signature by (``name``, ``public``), or NoteError."""
    kid = key_id(name, TYPE_ED25519, public)
    found = [blob for n, blob in note.signatures if n == name and blob[:4] == kid]
    if not found:
        raise NoteError(f"the note is not signed by {name!r} with the expected key")
    for blob in found:
        try:
            public.verify(blob[4:], note.text.encode())
        except InvalidSignature:
            raise NoteError(f"the signature of {name!r} does not verify") from None


# ---------------------------------------------------------------- checkpoints

@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The body of a C2SP tlog-checkpoint."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode(), *self.extensions]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Parse a note text (not the signatures) as a checkpoint, strictly."""
        lines = text.split("\n")
        if len(lines) < 4 or lines[-1] != "":
            raise NoteError("a checkpoint has an origin, a size and a root hash line, each ending in a newline")
        origin, size_s, root_s, *ext = lines[:-1]
        if not origin:
            raise NoteError("the checkpoint's origin line is empty")
        if not (size_s.isascii() and size_s.isdigit()) or (size_s != "0" and size_s.startswith("0")):
            raise NoteError(f"the checkpoint size {size_s!r} is not a decimal without leading zeros")
        try:
            root = base64.b64decode(root_s, validate=True)
        except (binascii.Error, ValueError):
            raise NoteError("the checkpoint root hash is not base64") from None
        if len(root) != HASH_SIZE or base64.b64encode(root).decode() != root_s:
            raise NoteError("the checkpoint root hash is not 32 bytes in standard base64")
        if any(not line for line in ext):
            raise NoteError("the checkpoint has an empty extension line")
        return cls(origin, int(size_s), root, tuple(ext))


# ---------------------------------------------------------------- cosignatures

@dataclass(frozen=True, slots=True)
class Cosignature:
    """A verified tlog-cosignature/v1: who, when (POSIX seconds), and its note line."""

    name: str
    timestamp: int
    line: str


def _cosigned_message(text: str, timestamp: int) -> bytes:
    return f"{COSIGNATURE_HEADER}\ntime {timestamp}\n{text}".encode()


def cosign(text: str, name: str, private: Ed25519PrivateKey, timestamp: int) -> str:
    """The cosignature line (type 0x04) of ``name`` over the checkpoint ``text`` at ``timestamp``."""
    if not 0 <= timestamp <= _MAX_TIMESTAMP:
        raise NoteError("the cosignature timestamp is out of range")
    kid = key_id(name, TYPE_COSIGNATURE_V1, private.public_key())
    signature = private.sign(_cosigned_message(text, timestamp))
    return signature_line(name, kid, struct.pack(">Q", timestamp) + signature)


def verify_cosignature(text: str, name: str, blob: bytes, public: Ed25519PublicKey) -> Cosignature:
    """Verify one cosignature (``blob`` = key ID || timestamp || signature) of (``name``, ``public``)."""
    if blob[:4] != key_id(name, TYPE_COSIGNATURE_V1, public):
        raise NoteError(f"the cosignature of {name!r} is not from the expected key")
    if len(blob) != 4 + 8 + 64:
        raise NoteError(f"the cosignature of {name!r} has the wrong length")
    (timestamp,) = struct.unpack(">Q", blob[4:12])
    if timestamp > _MAX_TIMESTAMP:
        raise NoteError(f"the cosignature timestamp of {name!r} is out of range")
    try:
        public.verify(blob[12:], _cosigned_message(text, timestamp))
    except InvalidSignature:
        raise NoteError(f"the cosignature of {name!r} does not verify") from None
    return Cosignature(name, timestamp, signature_line(name, blob[:4], blob[4:]))
