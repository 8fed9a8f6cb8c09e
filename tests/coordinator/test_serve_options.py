"""``serve``'s TLS and log options are checked before uvicorn starts, with one-line errors."""

from __future__ import annotations

import pytest

from coordinator import cli
from tests.support.pki import TestCA


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = TestCA(tmp_path_factory.mktemp("pki"))
    return ca, ca.issue("coordinator", server=True), ca.issue("other", server=True)


def _serve(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(["serve", "--data-dir", "/nonexistent", *args])
    return code, capsys.readouterr().err


def test_a_certificate_needs_its_key_and_client_cas_need_both(pki, capsys):
    ca, (cert, key), _ = pki
    assert _serve(capsys, "--tls-cert", str(cert)) == (2, "fedsilo-coordinator serve: error: give both --tls-cert "
                                                          "and --tls-key\n")
    code, err = _serve(capsys, "--tls-client-ca", str(ca.cert_path))
    assert code == 2 and "--tls-client-ca needs --tls-cert and --tls-key" in err


def test_a_key_others_can_read_is_refused(pki, capsys, tmp_path):
    _, (cert, key), _ = pki
    loose = tmp_path / "loose.key"
    loose.write_bytes(key.read_bytes())
    loose.chmod(0o644)
    code, err = _serve(capsys, "--tls-cert", str(cert), "--tls-key", str(loose))
    assert code == 2 and f"chmod 600 {loose}" in err and err.count("\n") == 1


def test_a_key_that_does_not_match_the_certificate_is_refused(pki, capsys):
    _, (cert, _), (_, other_key) = pki
    code, err = _serve(capsys, "--tls-cert", str(cert), "--tls-key", str(other_key))
    assert code == 2 and "cannot use the TLS files" in err


def test_missing_files_are_named(pki, capsys, tmp_path):
    _, (cert, key), _ = pki
    code, err = _serve(capsys, "--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(key))
    assert code == 2 and "nope.pem is not a readable file" in err


def test_valid_tls_files_get_as_far_as_the_data_directory(pki, capsys):
    ca, (cert, key), _ = pki
    code, err = _serve(capsys, "--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(ca.cert_path))
    assert code == 2 and "/nonexistent is not a coordinator data directory" in err
