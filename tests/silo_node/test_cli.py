"""``fedsilo-silo``: enrolment, configuration, status and ledger export, and its errors.

Enrolment runs against :class:`FakeCoordinator` (the contract with real crypto) through
an injected transport; the subprocess CLI against a real coordinator is covered in
tests/integration/test_silos.py.
"""

from __future__ import annotations

import json
import stat
import tomllib

import httpx
import pytest

from privacy.envelope import sign_statement
from privacy.keys import Identity
from silo_node.cli import main
from silo_node.client_errors import BadResponse, Unreachable, Untrusted
from silo_node.commands import init_silo, silo_status
from silo_node.config import ConfigError, ConfigReason, SiloConfig, TrainingWindow
from silo_node.ledger import Ledger, Receipt
from silo_node.partition import write_partitions

from tests.support.fake_coordinator import FakeCoordinator

URL = "https://coordinator.example"


@pytest.fixture(scope="module")
def partitions(tmp_path_factory):
    return write_partitions("breast_cancer", tmp_path_factory.mktemp("parts"), 2, alpha=1.0, seed=3)


@pytest.fixture
def fake() -> FakeCoordinator:
    return FakeCoordinator()


def enrol(tmp_path, fake, **kw):
    return init_silo(data_dir=tmp_path / "silo", coordinator_url=URL, token=fake.create_token("hospital-a"),
                     transport=fake.transport, environ={}, **kw)


# --------------------------------------------------------------------------- init


def test_init_generates_private_keys_locally_pins_the_coordinator_and_checks_the_data(tmp_path, fake, partitions):
    result = enrol(tmp_path, fake, data_path=str(partitions.paths[0]))
    assert result.enrolled and result.data_error is None and result.num_samples > 0
    cfg = result.config
    assert result.fingerprints == fake.identity.public().fingerprints()
    for key_file in cfg.keys_dir.iterdir():
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(cfg.keys_dir.stat().st_mode) == 0o700
    # The public half enrolled, the private half never left: the coordinator holds exactly our public keys.
    assert fake.silos[cfg.enrolment.silo_id] == Identity.load(cfg.keys_dir).public()
    doc = tomllib.loads((cfg.data_dir / "silo.toml").read_text())
    assert doc["enrolment"]["fingerprints"] == result.fingerprints
    assert doc["enrolment"]["task_name"] == "breast_cancer"
    assert "PRIVATE" not in (cfg.data_dir / "silo.toml").read_text()
    again = SiloConfig.load(cfg.data_dir, environ={})
    assert again == cfg


def test_init_refuses_data_that_does_not_fit_the_federation_model(tmp_path, fake):
    bad = tmp_path / "three_columns.csv"
    bad.write_text("a,b,c,target\n1,2,3,0\n4,5,6,1\n")
    result = enrol(tmp_path, fake, data_path=str(bad))
    assert result.data_error is not None
    assert "not expected: a, b, c" in result.data_error and "expects these 30 feature columns" in result.data_error


def test_a_bundled_task_without_data_uses_the_bundled_set(tmp_path, fake):
    result = enrol(tmp_path, fake)
    assert result.data_error is None and result.num_samples == round(569 * 0.8)


def test_init_with_a_malformed_expected_fingerprint_sends_nothing(tmp_path, fake):
    with pytest.raises(ConfigError, match="is not a fingerprint") as info:
        enrol(tmp_path, fake, expected_fingerprint="SHA256:00:11")
    assert info.value.reason == ConfigReason.INVALID
    assert fake.requests == [] and not SiloConfig.exists(tmp_path / "silo")


def test_init_refuses_a_coordinator_that_ignores_the_expected_fingerprint(tmp_path, fake):
    """This fake coordinator does not check coordinator_fingerprint (as an old or hostile one would)."""
    wrong = "SHA256:" + ":".join(["00"] * 16)
    with pytest.raises(Untrusted) as info:
        enrol(tmp_path, fake, expected_fingerprint=wrong)
    assert fake.identity.public().fingerprints()["signing"] in info.value.message
    assert "did not refuse as asked" in info.value.message and "Nothing was pinned" in info.value.message
    assert not SiloConfig.exists(tmp_path / "silo")
    keys = {p.name: p.read_bytes() for p in (tmp_path / "silo" / "keys").iterdir()}
    # The retry reuses (never replaces) the keys; this fake enrols again with a new token.
    enrol(tmp_path, fake, expected_fingerprint=fake.identity.public().fingerprints()["signing"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "silo" / "keys").iterdir()} == keys


def test_an_enrolment_whose_answer_was_lost_says_to_rerun_and_keeps_the_keys(tmp_path, fake):
    def processed_then_lost(request):
        fake._enroll(request)  # the coordinator enrols ...
        raise httpx.ReadTimeout("the answer never came", request=request)  # ... and the answer is lost

    fake.faults.append(processed_then_lost)
    with pytest.raises(Unreachable, match="run the same init again: it reuses the keys"):
        enrol(tmp_path, fake)
    assert not SiloConfig.exists(tmp_path / "silo")
    assert Identity.load(tmp_path / "silo" / "keys").public() in fake.silos.values()


@pytest.mark.parametrize("tamper", [
    lambda answer: answer["budget"].update(epsilon_cap=1000.0),  # what a man in the middle might raise
    lambda answer: answer["federation"]["task"]["options"].update(hidden=[4]),
    lambda answer: answer.update(silo_id="silo-someone-else"),
    lambda answer: answer.update(signature=answer["signature"][:-4] + "AAAA"),
    lambda answer: answer.pop("statement"),
])
def test_init_refuses_an_enrolment_answer_that_is_not_what_the_coordinator_signed(tmp_path, fake, tamper):
    def altered(request):
        answer = json.loads(fake._enroll(request).content)
        tamper(answer)
        return httpx.Response(200, json=answer)

    fake.faults.append(altered)
    with pytest.raises((Untrusted, BadResponse)) as info:
        enrol(tmp_path, fake, expected_fingerprint=fake.identity.public().fingerprints()["signing"])
    assert "enrolment answer" in info.value.message
    assert not SiloConfig.exists(tmp_path / "silo")


def test_init_refuses_half_a_key_pair(tmp_path, fake):
    keys = tmp_path / "silo" / "keys"
    Identity.generate().save(keys)
    (keys / "hpke_key.pem").unlink()
    with pytest.raises(ConfigError, match="only one of the silo's two key files"):
        enrol(tmp_path, fake)
    assert fake.requests == [] and [p.name for p in keys.iterdir()] == ["signing_key.pem"]


def test_a_delta_not_below_one_over_n_is_refused_where_n_is_known(tmp_path, fake):
    from dataclasses import replace

    from silo_node.commands import DataRefused, check_data

    config = enrol(tmp_path, fake).config  # the bundled set: 455 training records
    assert check_data(config.with_(enrolment=replace(config.enrolment, delta=1 / 456))) == 455
    with pytest.raises(DataRefused, match=r"delta 0.00219.* not below 1/n for this silo's n = 455"):
        check_data(config.with_(enrolment=replace(config.enrolment, delta=1 / 455)))


def test_init_again_with_a_token_is_refused_without_one_it_repoints_the_data(tmp_path, fake, partitions):
    first = enrol(tmp_path, fake)
    with pytest.raises(ConfigError) as info:
        enrol(tmp_path, fake)
    assert info.value.reason == ConfigReason.ALREADY_INITIALISED
    moved = init_silo(data_dir=first.config.data_dir, data_path=str(partitions.paths[1]), environ={})
    assert not moved.enrolled and moved.config.data_path == str(partitions.paths[1].resolve())
    assert SiloConfig.load(first.config.data_dir, environ={}).data_path == str(partitions.paths[1].resolve())


# --------------------------------------------------------------------------- configuration


def test_environment_overrides_operational_settings_only(tmp_path, fake):
    cfg = enrol(tmp_path, fake).config
    env = {"FEDSILO_SILO_LR": "0.5", "FEDSILO_SILO_WINDOW": "22:00-06:00", "FEDSILO_SILO_CA_BUNDLE": "",
           "FEDSILO_SILO_LOCAL_EPSILON_CAP": "2.5", "FEDSILO_SILO_DATA_DIR": "/ignored"}
    loaded = SiloConfig.load(cfg.data_dir, environ=env)
    assert loaded.training.lr == 0.5 and loaded.schedule.window == "22:00-06:00"
    assert loaded.epsilon_cap == 2.5  # the lower of the federation's 10 and the local 2.5
    with pytest.raises(ConfigError) as info:
        SiloConfig.load(cfg.data_dir, environ={"FEDSILO_SILO_EPSILON_CAP": "100"})
    assert info.value.reason == ConfigReason.PINNED_SETTING
    with pytest.raises(ConfigError) as info:
        SiloConfig.load(cfg.data_dir, environ={"FEDSILO_SILO_LRR": "0.1"})
    assert info.value.reason == ConfigReason.UNKNOWN_SETTING and "FEDSILO_SILO_LRR" in info.value.message


def test_edited_coordinator_keys_no_longer_match_their_fingerprints(tmp_path, fake):
    cfg = enrol(tmp_path, fake).config
    path = cfg.data_dir / "silo.toml"
    other = Identity.generate().public().to_json()["signing_key"]
    path.write_text(path.read_text().replace(cfg.enrolment.coordinator_signing_key, other))
    with pytest.raises(ConfigError) as info:
        SiloConfig.load(cfg.data_dir, environ={})
    assert "do not match the fingerprints" in info.value.message


@pytest.mark.parametrize("text,inside,outside,wait", [
    ("22:00-06:00", ["22:00", "23:59", "00:00", "05:59"], ["06:00", "12:00", "21:59"], ("12:00", 10 * 3600)),
    ("09:30-17:00", ["09:30", "16:59"], ["17:00", "09:29", "00:00"], ("17:00", 16.5 * 3600)),
])
def test_training_windows(text, inside, outside, wait):
    from datetime import time

    window = TrainingWindow.parse(text)
    assert str(window) == text
    for t in inside:
        assert window.contains(time.fromisoformat(t)) and window.seconds_until_open(time.fromisoformat(t)) == 0
    for t in outside:
        assert not window.contains(time.fromisoformat(t))
    assert window.seconds_until_open(time.fromisoformat(wait[0])) == wait[1]


@pytest.mark.parametrize("text", ["22-06", "25:00-06:00", "10:00-10:00", "22:00 to 06:00"])
def test_a_malformed_window_is_refused_when_configured_not_at_22h(text):
    with pytest.raises(ConfigError):
        TrainingWindow.parse(text)


# --------------------------------------------------------------------------- status and ledger


def test_status_of_a_silo_that_never_ran_exits_0(tmp_path, fake, capsys):
    cfg = enrol(tmp_path, fake).config
    assert main(["status", "--data-dir", str(cfg.data_dir)]) == 0
    out = capsys.readouterr().out
    assert "epsilon 0 spent of 10" in out and cfg.enrolment.silo_id in out
    assert main(["status", "--data-dir", str(cfg.data_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["epsilon_remaining"] == 10 and status["counts"] == {}


def test_status_and_ledger_report_what_left(tmp_path, fake, capsys):
    cfg = enrol(tmp_path, fake).config
    key = fake.identity.signing
    with Ledger(cfg.ledger_path) as ledger:
        for i, status in enumerate(("accepted", "rejected")):
            uid = f"{i:02d}" * 16
            ledger.record_sealed(update_id=uid, base_version=i, num_samples=300, payload_digest="ab" * 32,
                                 envelope_digest="cd" * 32, envelope=b"x", accountant="rdp",
                                 dp={"noise_multiplier": 1.5, "sample_rate": 0.1, "steps": 10,
                                     "max_grad_norm": 1.0, "delta": 1e-5},
                                 epsilon_before=0.0, epsilon_after=0.7, epsilon_cap=10.0)
            data, sig = sign_statement("receipt", {"update_id": uid, "silo_id": cfg.enrolment.silo_id,
                                                   "status": status, "envelope_digest": "cd" * 32,
                                                   "resulting_version": 1 if status == "accepted" else None}, key)
            ledger.record_receipt(uid, Receipt.verify(data, sig, key.public_key()), key.public_key())
        ledger.record_stop("budget_exhausted", "nearly spent", epsilon_spent=0.7, epsilon_cap=10.0)
    status = silo_status(cfg.data_dir, environ={})
    assert status["counts"]["accepted"] == 1 and status["counts"]["rejected"] == 1
    assert status["epsilon_spent"] == pytest.approx(0.7) and status["last_version"] == 1
    assert status["last_stop"]["reason"] == "budget_exhausted"

    assert main(["ledger", "--data-dir", str(cfg.data_dir), "--format", "jsonl"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["kind"] for r in rows] == ["update", "update", "stop"]
    assert [r["status"] for r in rows] == ["accepted", "rejected", "stopped"]
    assert main(["ledger", "--data-dir", str(cfg.data_dir), "--format", "csv"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4  # header + 3


# --------------------------------------------------------------------------- errors


def test_user_errors_print_one_line_and_exit_1(tmp_path, capsys):
    assert main(["status", "--data-dir", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "fedsilo-silo init" in err
    assert "Traceback" not in err


def test_a_misspelt_environment_variable_is_a_clear_error(tmp_path, fake, capsys, monkeypatch):
    cfg = enrol(tmp_path, fake).config
    monkeypatch.setenv("FEDSILO_SILO_PAUSE", "10")
    assert main(["status", "--data-dir", str(cfg.data_dir)]) == 1
    assert "FEDSILO_SILO_PAUSE" in capsys.readouterr().err


def test_usage_errors_exit_2_and_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--data-dir", "x", "--rounds", "zero"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("init", "run", "status", "ledger"):
        assert command in out
