"""coordinator.config: every setting checked at start-up, unknown FEDSILO_* refused."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from coordinator.config import ACCOUNTANT_CHOICES, ConfigError, CoordinatorConfig, env_name
from privacy.accounting import ACCOUNTANTS


def write_toml(data_dir: Path, body: str = "") -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "coordinator.toml"
    path.write_text("[coordinator]\n" + body)
    path.chmod(0o600)  # as init writes it: a looser file is tightened with a warning first
    return path


def test_defaults_and_typed_overrides(tmp_path):
    write_toml(tmp_path, 'accountant = "prv"\nport = 9000\n')
    config = CoordinatorConfig.load(tmp_path, environ={"FEDSILO_PORT": "9100", "FEDSILO_RETAIN_VERSIONS": "3"})
    assert (config.accountant, config.port, config.retain_versions) == ("prv", 9100, 3)
    assert config.database_url == f"sqlite:///{tmp_path.resolve() / 'coordinator.db'}"
    assert config.base_url == "http://127.0.0.1:9100"


def test_the_accountant_choices_are_the_accountants():
    assert set(ACCOUNTANT_CHOICES) == set(ACCOUNTANTS)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("FEDSILO_ACCOUNTANT", "bogus", "accountant must be one of rdp, prv, pld, not 'bogus'; write e.g. FEDSILO_ACCOUNTANT=rdp"),
        ("FEDSILO_PORT", "http", "port must be an integer from 1 to 65535, not 'http'; write e.g. FEDSILO_PORT=8600"),
        ("FEDSILO_PORT", "70000", "port must be an integer from 1 to 65535, not 70000"),
        ("FEDSILO_INGEST_WORKERS", "0", "ingest_workers must be an integer >= 1, not 0"),
        ("FEDSILO_MAX_UPDATE_BYTES", "-1", "max_update_bytes must be an integer number of bytes >= 1024, not -1"),
        ("FEDSILO_RETAIN_VERSIONS", "2.5", "retain_versions must be an integer >= 0 (0 keeps every version), not '2.5'"),
        ("FEDSILO_PUBLIC_URL", "fl.example.org", "public_url must be empty or an http(s):// URL"),
        ("FEDSILO_FEDERATION_NAME", " ", "federation_name must be a non-empty name"),
    ],
)
def test_a_bad_variable_is_refused_with_what_to_write(tmp_path, variable, value, expected):
    write_toml(tmp_path)
    with pytest.raises(ConfigError) as info:
        CoordinatorConfig.load(tmp_path, environ={variable: value})
    assert str(info.value).startswith(f"{variable}: {expected}")


def test_a_database_url_is_checked_but_never_echoed(tmp_path):
    write_toml(tmp_path)
    with pytest.raises(ConfigError) as info:
        CoordinatorConfig.load(tmp_path, environ={"FEDSILO_DATABASE_URL": "mysql://u:s3cret@host/db"})
    message = str(info.value)
    assert message.startswith("FEDSILO_DATABASE_URL: database_url must be a SQLite or PostgreSQL")
    assert "s3cret" not in message
    url = "postgresql+psycopg://u:s3cret@host/db"
    assert CoordinatorConfig.load(tmp_path, environ={"FEDSILO_DATABASE_URL": url}).database_url == url


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('port = "8600"', "port must be an integer from 1 to 65535, not '8600'; write e.g. port = 8600"),
        ("port = true", "port must be an integer from 1 to 65535, not True"),
        ("accountant = 1", "accountant must be one of rdp, prv, pld, not 1; write e.g. accountant = \"rdp\""),
        ("torch_threads = -1", "torch_threads must be an integer >= 0 (0 keeps torch's default), not -1"),
    ],
)
def test_a_bad_value_in_the_file_names_the_file(tmp_path, line, expected):
    path = write_toml(tmp_path, line + "\n")
    with pytest.raises(ConfigError) as info:
        CoordinatorConfig.load(tmp_path, environ={})
    assert str(info.value).startswith(f"{path}: {expected}")


def test_unknown_settings_are_refused(tmp_path):
    path = write_toml(tmp_path, "acountant = 'rdp'\n")
    with pytest.raises(ConfigError, match=r"unknown settings \['acountant'\]"):
        CoordinatorConfig.load(tmp_path, environ={})
    path.write_text("[coordinator]\n")
    with pytest.raises(ConfigError) as info:
        CoordinatorConfig.load(tmp_path, environ={"FEDSILO_ACOUNTANT": "prv"})
    assert str(info.value).startswith("unknown environment variable FEDSILO_ACOUNTANT; did you mean FEDSILO_ACCOUNTANT?")


def test_variables_outside_the_coordinators_namespace_are_left_alone(tmp_path):
    # The silo's settings, test hooks and the app factory's data directory are not ours.
    write_toml(tmp_path)
    environ = {"FEDSILO_SILO_LR": "x", "FEDSILO_TEST_CRASH_AT": "pushed", "FEDSILO_DATA_DIR": "/elsewhere",
               "FEDSILOX": "1", "PATH": "/bin"}
    config = CoordinatorConfig.load(tmp_path, environ=environ)
    assert config.data_dir == tmp_path


def test_direct_construction_is_checked_too(tmp_path):
    with pytest.raises(ConfigError, match="^setting fold_workers: fold_workers must be an integer >= 1, not 0"):
        CoordinatorConfig(tmp_path, fold_workers=0)
    assert env_name("fold_workers") == "FEDSILO_FOLD_WORKERS"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("FEDSILO_ACCOUNTANT", "bogus", "FEDSILO_ACCOUNTANT: accountant must be one of rdp, prv, pld, not 'bogus'"),
        ("FEDSILO_MAX_UPDATE_BYTE", "1000", "unknown environment variable FEDSILO_MAX_UPDATE_BYTE; did you mean FEDSILO_MAX_UPDATE_BYTES?"),
    ],
)
def test_serve_with_a_bad_setting_exits_2_with_the_message_and_no_traceback(tmp_path, variable, value, expected):
    write_toml(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSILO_")}
    env[variable] = value
    done = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "serve", "--data-dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"fedsilo-coordinator serve: error: {expected}")
    assert "Traceback" not in done.stderr


def test_operations_md_documents_every_setting_and_its_variable():
    text = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| `")]
    documented = {cells[0].strip(" `"): [c.strip() for c in cells[1:]] for cells in rows if len(cells) == 5}
    settings = {f.name for f in fields(CoordinatorConfig)} - {"data_dir"}
    assert set(documented) == settings
    for name, (variable, _default, allowed, _meaning) in documented.items():
        assert variable == f"`{env_name(name)}`"
    assert documented["accountant"][2] == ", ".join(f"`{a}`" for a in ACCOUNTANT_CHOICES)
