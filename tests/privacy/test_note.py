"""privacy.note: C2SP signed notes, checkpoints and cosignature/v1 -- formats taken from
the specifications (key IDs, signed bytes), tamper and hostile-input cases."""

from __future__ import annotations

import base64
import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from privacy import note
from privacy.note import Checkpoint, NoteError

ORIGIN = "fedsilo/example-federation"
ROOT = hashlib.sha256(b"root").digest()
URLSAFE_ROOT = base64.urlsafe_b64encode(b"\xff" * 32).decode()


def _raw(key) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@pytest.fixture(scope="module")
def log_key():
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def witness_key():
    return Ed25519PrivateKey.generate()


def test_key_ids_follow_the_specs(log_key):
    # signed-note: SHA-256(name || 0x0A || 0x01 || key)[:4]; tlog-cosignature: type 0x04
    for t in (0x01, 0x04):
        want = hashlib.sha256(ORIGIN.encode() + b"\n" + bytes([t]) + _raw(log_key)).digest()[:4]
        assert note.key_id(ORIGIN, t, log_key.public_key()) == want


def test_checkpoint_text_round_trip():
    cp = Checkpoint(ORIGIN, 20852163, ROOT)
    text = cp.text()
    assert text == f"{ORIGIN}\n20852163\n{base64.b64encode(ROOT).decode()}\n"
    assert Checkpoint.parse(text) == cp
    ext = Checkpoint(ORIGIN, 0, ROOT, ("extra line",))
    assert Checkpoint.parse(ext.text()) == ext


@pytest.mark.parametrize("text", [
    f"{ORIGIN}\n012\n{base64.b64encode(ROOT).decode()}\n",  # leading zero
    f"{ORIGIN}\n-1\n{base64.b64encode(ROOT).decode()}\n",
    f"{ORIGIN}\n12\n{base64.b64encode(ROOT[:31]).decode()}\n",  # short root
    f"{ORIGIN}\n12\n{URLSAFE_ROOT}\n",  # not standard base64
    f"{ORIGIN}\n12\n",
    f"\n12\n{base64.b64encode(ROOT).decode()}\n",
    f"{ORIGIN}\n12\n{base64.b64encode(ROOT).decode()}",  # no final newline
])
def test_bad_checkpoints_are_refused(text):
    with pytest.raises(NoteError):
        Checkpoint.parse(text)


def test_sign_and_verify_a_checkpoint(log_key, witness_key):
    text = Checkpoint(ORIGIN, 7, ROOT).text()
    line = note.sign_note(text, ORIGIN, log_key)
    signed = note.parse_note(text + "\n" + line + "\n")
    assert signed.text == text
    note.verify_note_signature(signed, ORIGIN, log_key.public_key())
    # the signature is Ed25519 over the text, after the 4-byte key ID
    name, blob = signed.signatures[0]
    log_key.public_key().verify(blob[4:], text.encode())
    # a different key with the same name: not "signed by" it
    with pytest.raises(NoteError, match="not signed"):
        note.verify_note_signature(signed, ORIGIN, witness_key.public_key())
    # an altered text fails
    forged = note.SignedNote(text.replace("\n7\n", "\n8\n"), signed.signatures)
    with pytest.raises(NoteError, match="does not verify"):
        note.verify_note_signature(forged, ORIGIN, log_key.public_key())


def test_cosignature_v1_signs_the_timestamped_message(log_key, witness_key):
    text = Checkpoint(ORIGIN, 7, ROOT).text()
    name = "fedsilo/example-federation/silo/abc"
    line = note.cosign(text, name, witness_key, 1679315147)
    n, blob = note.parse_signature_line(line)
    assert n == name and len(blob) == 4 + 8 + 64
    assert struct.unpack(">Q", blob[4:12]) == (1679315147,)
    # the signed message of tlog-cosignature
    witness_key.public_key().verify(blob[12:], b"cosignature/v1\ntime 1679315147\n" + text.encode())
    cs = note.verify_cosignature(text, name, blob, witness_key.public_key())
    assert (cs.name, cs.timestamp, cs.line) == (name, 1679315147, line)
    # another checkpoint, another key, another name, an altered timestamp: refused
    with pytest.raises(NoteError):
        note.verify_cosignature(Checkpoint(ORIGIN, 8, ROOT).text(), name, blob, witness_key.public_key())
    with pytest.raises(NoteError):
        note.verify_cosignature(text, name, blob, log_key.public_key())
    with pytest.raises(NoteError):
        note.verify_cosignature(text, name + "x", blob, witness_key.public_key())
    with pytest.raises(NoteError):
        note.verify_cosignature(text, name, blob[:4] + struct.pack(">Q", 1679315148) + blob[12:],
                                witness_key.public_key())
    # a note signature (0x01) by the same key is not a cosignature (0x04)
    _, plain = note.parse_signature_line(note.sign_note(text, name, witness_key))
    with pytest.raises(NoteError):
        note.verify_cosignature(text, name, plain, witness_key.public_key())


def test_unknown_signature_lines_are_ignored(log_key, witness_key):
    text = Checkpoint(ORIGIN, 7, ROOT).text()
    lines = [note.sign_note(text, ORIGIN, log_key), note.cosign(text, "w.example/1", witness_key, 5)]
    signed = note.parse_note(text + "\n" + "\n".join(lines) + "\n")
    assert len(signed.signatures) == 2
    note.verify_note_signature(signed, ORIGIN, log_key.public_key())
    assert note.parse_note(signed.render()) == signed


@pytest.mark.parametrize("raw", [
    b"text\n",  # no blank line, no signature
    b"text\n\n",  # no signature
    b"text\n\n- name AAAA\n",  # not an em dash
    "text\n\n\u2014 name not-base64!\n".encode(),
    "text\n\n\u2014 na me AAAAAAAA\n".encode(),
    "text\n\n\u2014 na+me AAAAAAAA\n".encode(),
    "te\x01xt\n\n\u2014 name AAAAAAAA\n".encode(),  # control character
    b"\xff\xfe\n\n",  # not UTF-8
    "text\n\n\u2014 name AAAAAAAA".encode(),  # no final newline
])
def test_hostile_notes_are_refused(raw):
    with pytest.raises(NoteError):
        note.parse_note(raw)


def test_the_worked_example_of_docs_protocol_md():
    """docs/protocol.md section 8.4, recomputed from its keys and leaves."""
    from pathlib import Path

    from privacy import merkle

    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")
    example = doc[doc.index("### 8.4 Worked example"):doc.index("## 9. Versioning")]
    log = Ed25519PrivateKey.from_private_bytes(bytes([1]) * 32)
    wit = Ed25519PrivateKey.from_private_bytes(bytes([2]) * 32)
    origin, wname = "fedsilo/example", "fedsilo/example/silo/hospital-a"
    leaves = [b'{"action":"a","n":%d}' % i for i in range(3)]
    hashes = [merkle.leaf_hash(leaf) for leaf in leaves]
    for i, h in enumerate(hashes):
        assert f"leaf hash {i} = {h.hex()}" in example
    for n in (2, 3):
        assert f"root, size {n} = {base64.b64encode(merkle.root_of(leaves[:n])[1]).decode()}" in example
    text = Checkpoint(origin, 3, merkle.root_of(leaves)[1]).text()
    signed = text + "\n" + note.sign_note(text, origin, log) + "\n" + note.cosign(text, wname, wit, 1764500000) + "\n"
    assert "```\n" + signed + "```" in example
    assert note.vkey(origin, note.TYPE_ED25519, log.public_key()) in example
    assert note.vkey(wname, note.TYPE_COSIGNATURE_V1, wit.public_key()) in example
    b64 = [base64.b64encode(h).decode() for h in hashes]
    assert f'"proof": ["{b64[1]}",\n"{b64[2]}"]' in example
    assert f'"proof":\n["{b64[2]}"]' in example
