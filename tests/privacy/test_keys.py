"""Key files: created 0600, refused when others can read them; fingerprints."""

from __future__ import annotations

import os

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
