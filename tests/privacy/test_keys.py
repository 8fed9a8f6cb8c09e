"""Key files: created 0600, refused when others can read them; fingerprints."""

from __future__ import annotations

import os
import stat

import pytest

from privacy import keys
from privacy.errors import KeyFileError, Reason


def test_identity_round_trip_and_file_modes(tmp_path):
    ident = keys.Identity.generate()
    ident.save(tmp_path / "k")
    for name in (keys.SIGNING_KEY_FILE, keys.HPKE_KEY_FILE):
        assert (tmp_path / "k" / name).stat().st_mode & 0o777 == 0o600
    loaded = keys.Identity.load(tmp_path / "k")
    assert loaded.public() == ident.public()


def test_key_file_is_never_world_readable_even_with_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        keys.Identity.generate().save(tmp_path)
    finally:
        os.umask(old)
    assert (tmp_path / keys.SIGNING_KEY_FILE).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_refuses_keys_readable_by_others(tmp_path, mode):
    keys.Identity.generate().save(tmp_path)
    path = tmp_path / keys.SIGNING_KEY_FILE
    os.chmod(path, mode)
    with pytest.raises(KeyFileError) as info:
        keys.load_private_key(path)
    assert info.value.reason is Reason.KEY_PERMISSIONS
    assert "chmod 600" in str(info.value)


def test_malformed_and_missing_key_files(tmp_path):
    path = tmp_path / "bad.pem"
    path.write_bytes(b"not a key")
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError) as info:
        keys.load_private_key(path)
    assert info.value.reason is Reason.KEY_MALFORMED
    with pytest.raises(KeyFileError):
        keys.load_private_key(tmp_path / "missing.pem")


def test_repr_and_fingerprints_leak_no_private_material():
    ident = keys.Identity.generate()
    pem = ident.signing.private_bytes(
        keys.serialization.Encoding.Raw, keys.serialization.PrivateFormat.Raw, keys.serialization.NoEncryption()
    )
    assert keys.b64e(pem) not in repr(ident)
    fp = ident.public().fingerprints()
    assert fp["signing"].startswith("SHA256:") and len(fp["signing"].split(":")) == 17
    assert fp["signing"] != fp["hpke"]


def test_public_identity_json_round_trip_and_validation():
    pub = keys.Identity.generate().public()
    assert keys.PublicIdentity.from_json(pub.to_json()) == pub
    with pytest.raises(KeyFileError):
        keys.PublicIdentity.from_json({"signing_key": "AAAA", "hpke_key": pub.to_json()["hpke_key"]})
    with pytest.raises(KeyFileError):
        keys.PublicIdentity.from_json({"signing_key": 5})


def test_b64_round_trip():
    for n in range(0, 40):
        data = os.urandom(n)
        assert keys.b64d(keys.b64e(data)) == data


def test_write_private_never_replaces_unless_asked(tmp_path):
    from privacy.keys import write_private

    path = tmp_path / "secret"
    write_private(path, b"one", replace=False)
    assert path.read_bytes() == b"one" and stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(KeyFileError) as info:
        write_private(path, b"two", replace=False)
    assert info.value.reason is Reason.KEY_EXISTS and path.read_bytes() == b"one"
    write_private(path, b"three")
    assert path.read_bytes() == b"three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]  # no temporary file left


def test_ensure_private_tightens_and_says_so(tmp_path):
    from privacy.keys import ensure_private

    directory, file = tmp_path / "d", tmp_path / "d" / "f"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    file.write_text("x")
    file.chmod(0o644)
    assert "mode 0644); changed it to 0600" in ensure_private(file)
    assert "mode 0755); changed it to 0700" in ensure_private(directory)
    assert stat.S_IMODE(file.stat().st_mode) == 0o600 and stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert ensure_private(file) is None and ensure_private(tmp_path / "missing") is None
