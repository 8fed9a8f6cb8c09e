"""The silo refuses plain HTTP to another machine unless told otherwise.

The enrolment token travels in the first request, and every later request carries the
silo's signature and metadata: over ``http://`` to a remote host all of it would cross
the network unencrypted. Loopback stays allowed (tests, a local TLS-terminating proxy).
"""

from __future__ import annotations

import pytest

from silo_node.cli import main
from silo_node.config import ConfigError, check_coordinator_url


@pytest.mark.parametrize("url", ["https://fl.example.org", "https://10.0.0.5:8600", "http://127.0.0.1:8600",
                                 "http://127.8.9.10", "http://localhost:8600/", "http://[::1]:8600"])
def test_allowed(url):
    check_coordinator_url(url)


@pytest.mark.parametrize("url", ["http://fl.example.org", "http://10.0.0.5:8600", "http://[2001:db8::1]/",
                                 "http://127.0.0.1.example.org", "http://localhost.example.org"])
def test_plain_http_to_another_machine_is_refused_unless_allowed(url):
    with pytest.raises(ConfigError) as info:
        check_coordinator_url(url)
    assert "unencrypted" in info.value.message and "--allow-insecure-http" in info.value.message
    check_coordinator_url(url, allow_insecure_http=True)


@pytest.mark.parametrize("url", ["ftp://fl.example.org", "fl.example.org"])
def test_other_schemes_are_refused_even_when_insecure_http_is_allowed(url):
    with pytest.raises(ConfigError):
        check_coordinator_url(url, allow_insecure_http=True)


def test_init_refuses_before_anything_leaves(tmp_path, capsys):
    """No keys written, nothing sent: the refusal comes before enrolment."""
    code = main(["init", "--data-dir", str(tmp_path / "silo"), "--coordinator", "http://192.0.2.1:8600",
                 "--token", "fse_" + "a" * 43])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: coordinator URL 'http://192.0.2.1:8600' is plain HTTP") and "\n" == err[-1]
    assert not (tmp_path / "silo" / "keys").exists()
