"""Key pairs, fingerprints and key files.

Every party holds two key pairs: Ed25519 to sign (its identity) and X25519 to
receive HPKE-encrypted payloads. Public keys travel as raw 32-byte values
(base64url on the wire); private keys stay on the machine that made them, in
PKCS#8 PEM files created with mode 0600. Loading refuses a private key file that
group or others can read, as ssh does.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from .errors import KeyFileError, Reason

SIGNING_KEY_FILE = "signing_key.pem"
HPKE_KEY_FILE = "hpke_key.pem"


def b64e(data: bytes) -> str:
    """Unpadded base64url, the encoding of every binary value on the wire."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: str) -> bytes:
    """Decode unpadded (or padded) base64url; raises ValueError on garbage."""
    if not isinstance(text, str):
        raise ValueError("expected a base64url string")
    padded = text + "=" * (-len(text) % 4)
    return base64.urlsafe_b64decode(padded.encode("ascii"))


def raw_public(key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public: bytes | Ed25519PublicKey | X25519PublicKey) -> str:
    """``SHA256:`` + the first 16 bytes of SHA-256(raw public key) as colon hex.

    Short enough to read aloud when comparing out of band.
    """
    raw = public if isinstance(public, bytes) else raw_public(public)
    h = hashlib.sha256(raw).digest()[:16]
    return "SHA256:" + ":".join(f"{b:02x}" for b in h)


def signing_public_from_raw(raw: bytes) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise KeyFileError(Reason.KEY_MALFORMED, "not a 32-byte Ed25519 public key") from exc


def hpke_public_from_raw(raw: bytes) -> X25519PublicKey:
    try:
        return X25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise KeyFileError(Reason.KEY_MALFORMED, "not a 32-byte X25519 public key") from exc


def save_private_key(path: Path, key: Ed25519PrivateKey | X25519PrivateKey) -> None:
    """Write a private key as PKCS#8 PEM, created 0600 (never world-readable, not even briefly)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # umask cannot widen it, but an existing file's mode could
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_private_key(path: Path) -> Ed25519PrivateKey | X25519PrivateKey:
    """Load a PEM private key, refusing files that group or others can access."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(Reason.KEY_MALFORMED, f"key file {path} does not exist") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            Reason.KEY_PERMISSIONS,
            f"key file {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}",
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(Reason.KEY_MALFORMED, f"key file {path} is not a PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey | X25519PrivateKey):
        raise KeyFileError(Reason.KEY_MALFORMED, f"key file {path} holds an unsupported key type")
    return key


@dataclass(frozen=True)
class PublicIdentity:
    """A party's two public keys, as raw bytes."""

    signing: bytes
    hpke: bytes

    @property
    def signing_key(self) -> Ed25519PublicKey:
        return signing_public_from_raw(self.signing)

    @property
    def hpke_key(self) -> X25519PublicKey:
        return hpke_public_from_raw(self.hpke)

    def fingerprints(self) -> dict[str, str]:
        return {"signing": fingerprint(self.signing), "hpke": fingerprint(self.hpke)}

    def to_json(self) -> dict[str, str]:
        return {"signing_key": b64e(self.signing), "hpke_key": b64e(self.hpke)}

    @classmethod
    def from_json(cls, obj: dict) -> PublicIdentity:
        try:
            ident = cls(b64d(obj["signing_key"]), b64d(obj["hpke_key"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise KeyFileError(Reason.KEY_MALFORMED, "public keys must be base64url strings") from exc
        ident.signing_key, ident.hpke_key  # validate both now, not at first use
        return ident


@dataclass(frozen=True)
class Identity:
    """A party's private signing and HPKE keys."""

    signing: Ed25519PrivateKey
    hpke: X25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    def public(self) -> PublicIdentity:
        return PublicIdentity(raw_public(self.signing.public_key()), raw_public(self.hpke.public_key()))

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        save_private_key(directory / SIGNING_KEY_FILE, self.signing)
        save_private_key(directory / HPKE_KEY_FILE, self.hpke)

    @classmethod
    def load(cls, directory: Path) -> Identity:
        directory = Path(directory)
        signing = load_private_key(directory / SIGNING_KEY_FILE)
        hpke = load_private_key(directory / HPKE_KEY_FILE)
        if not isinstance(signing, Ed25519PrivateKey) or not isinstance(hpke, X25519PrivateKey):
            raise KeyFileError(Reason.KEY_MALFORMED, f"key files in {directory} have the wrong types")
        return cls(signing, hpke)

    def __repr__(self) -> str:  # never print key material
        return f"Identity(public={self.public().fingerprints()})"
