"""Key pairs, fingerprints and key files.

Every party holds two key pairs: Ed25519 to sign (its identity) and X25519 to
receive HPKE-encrypted payloads. Public keys travel as raw 32-byte values
(base64url on the wire); private keys stay on the machine that made them, in
PKCS#8 PEM files created with mode 0600 in a 0700 directory, and never replaced
(a key that enrolled must survive any retry). Loading refuses a private key file
that group or others can read, as ssh does; other private files and directories
(configuration, data directories) are tightened loudly instead (:func:`ensure_private`).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
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


#: What :func:`fingerprint` produces, and all that a fingerprint given by a person may be.
FINGERPRINT_PATTERN = re.compile(r"SHA256:[0-9a-f]{2}(?::[0-9a-f]{2}){15}")


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


PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def write_private(path: Path, data: bytes, *, replace: bool = True) -> None:
    """Write ``data`` to ``path`` atomically, created 0600 (never readable by others, not even briefly).

    With ``replace=False`` an existing file is never replaced: KeyFileError
    ``key_exists`` instead (the rename is a hard link, which fails if ``path`` exists,
    so two writers cannot both win).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)  # umask cannot widen it, but an existing file's mode could
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise KeyFileError(Reason.KEY_EXISTS, f"{path} already exists; it was not replaced") from None
    finally:
        tmp.unlink()


def save_private_key(path: Path, key: Ed25519PrivateKey | X25519PrivateKey, *, replace: bool = False) -> None:
    """Write a private key as PKCS#8 PEM, 0600; an existing key file is never replaced unless asked."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(path, pem, replace=replace)


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed; the directory itself ends up 0700.

    ``mkdir(mode=)`` applies only to a directory it creates, so an existing one is
    checked (and tightened, loudly) by :func:`ensure_private`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    return path


def ensure_private(path: Path) -> str | None:
    """Tighten a private directory to 0700, or a private file to 0600, if group or others have access.

    Returns a sentence saying what was repaired (for the caller to log as a warning),
    or None when nothing needed repairing or ``path`` does not exist; raises
    KeyFileError ``key_permissions`` when it is looser and cannot be changed. Private *key*
    files are not repaired but refused (:func:`load_private_key`): a key that others
    could read may have been copied, and only a person can decide whether to replace it.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    mode = stat.S_IMODE(st.st_mode)
    if not mode & (stat.S_IRWXG | stat.S_IRWXO):
        return None
    wanted = PRIVATE_DIR_MODE if stat.S_ISDIR(st.st_mode) else PRIVATE_FILE_MODE
    try:
        path.chmod(wanted)
    except OSError as exc:  # not the owner: then it cannot be vouched for either
        raise KeyFileError(
            Reason.KEY_PERMISSIONS,
            f"{path} is accessible by group or others (mode {mode:04o}) and cannot be tightened "
            f"({exc.strerror}); as its owner, run: chmod {wanted:o} {path}",
        ) from None
    return f"{path} was accessible by group or others (mode {mode:04o}); changed it to {wanted:04o}"


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
        """Write both private keys (0600) into ``directory`` (0700); never replaces a key file."""
        directory = make_private_dir(directory)
        ensure_private(directory)
        save_private_key(directory / SIGNING_KEY_FILE, self.signing)
        save_private_key(directory / HPKE_KEY_FILE, self.hpke)

    @staticmethod
    def present(directory: Path) -> tuple[bool, bool]:
        """Whether the signing and the HPKE key file exist in ``directory``."""
        directory = Path(directory)
        return (directory / SIGNING_KEY_FILE).exists(), (directory / HPKE_KEY_FILE).exists()

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
