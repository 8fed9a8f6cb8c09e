"""Start-up: the data directory and its configuration file are private, and kept so."""

from __future__ import annotations

import logging
import stat

import pytest

from coordinator import startup
from coordinator.bootstrap import initialize
from coordinator.config import CONFIG_FILE
from privacy.errors import KeyFileError, Reason
from privacy.keys import Identity


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def data_dir(tmp_path):
    result = initialize(tmp_path / "coordinator", task="csv", task_options={"feature_names": ["f0", "f1", "f2", "f3"], "classes": 2})
    return result.config.data_dir


def test_init_creates_private_files(data_dir):
    assert mode(data_dir) == 0o700 and mode(data_dir / "keys") == 0o700
    assert mode(data_dir / CONFIG_FILE) == 0o600
    assert all(mode(p) == 0o600 for p in (data_dir / "keys").iterdir())


def test_looser_directory_and_config_are_tightened_loudly_at_start(data_dir, caplog):
    data_dir.chmod(0o755)
    (data_dir / CONFIG_FILE).chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="fedsilo.coordinator"):
        startup.check_startable(data_dir)
    assert mode(data_dir) == 0o700 and mode(data_dir / CONFIG_FILE) == 0o600
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"{data_dir} was accessible by group or others (mode 0755); changed it to 0700" in m for m in messages)
    assert any("coordinator.toml was accessible by group or others (mode 0644)" in m for m in messages)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedsilo.coordinator"):
        startup.check_startable(data_dir)  # nothing left to repair: nothing said
    assert caplog.records == []


def test_a_readable_key_is_refused_not_repaired(data_dir):
    key = data_dir / "keys" / "signing_key.pem"
    key.chmod(0o640)
    with pytest.raises(startup.StartupError, match="chmod 600"):
        startup.check_startable(data_dir)
    assert mode(key) == 0o640


def test_key_files_are_never_replaced(data_dir):
    before = (data_dir / "keys" / "signing_key.pem").read_bytes()
    with pytest.raises(KeyFileError) as info:
        Identity.generate().save(data_dir / "keys")
    assert info.value.reason is Reason.KEY_EXISTS
    assert (data_dir / "keys" / "signing_key.pem").read_bytes() == before
    assert sorted(p.name for p in (data_dir / "keys").iterdir()) == ["hpke_key.pem", "signing_key.pem"]  # no temp left
