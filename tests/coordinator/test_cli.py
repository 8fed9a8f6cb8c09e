"""``fedsilo-coordinator``: init, verify and the errors a user can make (in-process ``main``).

``serve`` runs as a real subprocess in the integration tests (tests/support/coordinator.py).
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from sqlalchemy import select, text

from coordinator import audit, cli
from coordinator.config import CoordinatorConfig
from coordinator.db import make_engine, transaction
from coordinator.federation import settings_of
from coordinator.models import Federation
from coordinator.strategies import StrategySettings
from tests.support.coordinator import DEFAULT_TASK_OPTIONS

INIT = ["init", "--task", "csv", *[a for k, v in DEFAULT_TASK_OPTIONS.items()
                                   for a in ("--task-option", f"{k}={json.dumps(v)}")]]


@pytest.fixture
def initialised(tmp_path, capsys):
    assert cli.main([*INIT, "--data-dir", str(tmp_path / "c"), "--json", "--setting", "alpha=0.5"]) == 0
    return tmp_path / "c", json.loads(capsys.readouterr().out)


def test_init_prints_one_json_object_and_writes_private_files(initialised):
    data_dir, out = initialised
    assert out["admin_token"].startswith("fst_") and out["current_version"] == 0
    assert set(out["api"]) == {"silo", "admin", "audit", "healthz", "metrics", "openapi"}
    assert set(out["fingerprints"]) == {"signing", "hpke"} and out["task"]["name"] == "csv"
    for path in [data_dir / "coordinator.toml", *(data_dir / "keys").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert out["admin_token"] not in (data_dir / "coordinator.toml").read_text()
    assert CoordinatorConfig.load(data_dir).database_url.startswith("sqlite:///")


def test_init_refuses_an_initialised_directory_and_bad_input_without_a_traceback(initialised, tmp_path, capsys):
    data_dir, _ = initialised
    cases = [
        [*INIT, "--data-dir", str(data_dir)],
        ["init", "--data-dir", str(tmp_path / "x"), "--task", "no-such-task"],
        [*INIT, "--data-dir", str(tmp_path / "y"), "--setting", "alpha=7"],
        ["serve", "--data-dir", str(tmp_path / "never-initialised")],
        ["verify", "--export", str(tmp_path / "missing.jsonl")],
    ]
    for argv in cases:
        assert cli.main(argv) == cli.EXIT_USAGE, argv
        err = capsys.readouterr().err
        assert err.startswith(f"fedsilo-coordinator {argv[0]}: error: ") and "Traceback" not in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # refused before writing


def test_init_records_the_csv_feature_names_from_a_header(tmp_path, capsys):
    header = tmp_path / "header.csv"
    header.write_text("\ufeffage, outcome ,bmi\n", encoding="utf-8")
    argv = ["init", "--task", "csv", "--task-option", "classes=2", "--features-from", str(header),
            "--label-column", "outcome", "--data-dir", str(tmp_path / "c"), "--json"]
    assert cli.main(argv) == 0
    task = json.loads(capsys.readouterr().out)["task"]
    assert task == {"name": "csv", "options": {"features": 2, "classes": 2, "hidden": [32],
                                               "feature_names": ["age", "bmi"]}}
    # The federation hands exactly this spec to every silo at enrolment.
    engine = make_engine(CoordinatorConfig.load(tmp_path / "c").database_url)
    with transaction(engine, read_only=True) as s:
        stored = s.execute(text("SELECT task_options FROM federations")).scalar_one()
    engine.dispose()
    assert json.loads(stored)["feature_names"] == ["age", "bmi"]


def test_init_of_a_csv_task_needs_its_feature_names(tmp_path, capsys):
    header = tmp_path / "header.csv"
    header.write_text("age,bmi\n")
    cases = [
        (["--task-option", "features=2"], "needs feature_names"),
        (["--features-from", str(header)], "no label column 'target'"),
        (["--features-from", str(tmp_path / "missing.csv")], "does not exist"),
        (["--features-from", str(header), "--label-column", "bmi", "--task-option", 'feature_names=["age"]'],
         "not both"),
    ]
    for extra, fragment in cases:
        argv = ["init", "--task", "csv", "--task-option", "classes=2", *extra, "--data-dir", str(tmp_path / "c")]
        assert cli.main(argv) == cli.EXIT_USAGE, extra
        err = capsys.readouterr().err
        assert err.startswith("fedsilo-coordinator init: error: ") and fragment in err, err
    assert not (tmp_path / "c").exists()


def test_verify_names_the_first_altered_entry(initialised, capsys, tmp_path):
    data_dir, _ = initialised
    assert cli.main(["verify", "--data-dir", str(data_dir)]) == 0
    assert capsys.readouterr().out.startswith("OK: ")
    # an export verifies too, until a line is altered
    export = tmp_path / "log.jsonl"
    engine = make_engine(CoordinatorConfig.load(data_dir).database_url)
    with transaction(engine, read_only=True) as s, export.open("w") as f:
        audit.export_jsonl(s, f)
    assert cli.main(["verify", "--export", str(export)]) == 0
    lines = export.read_text().splitlines()
    lines[1] = lines[1].replace('"actor":"system"', '"actor":"mallory"')
    export.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert cli.main(["verify", "--export", str(export), "--json"]) == cli.EXIT_BAD_LOG
    assert json.loads(capsys.readouterr().out)["first_bad_seq"] == 2
    # the live log, after someone with database access edits a row behind the triggers' back
    with engine.begin() as conn:
        conn.execute(text("DROP TRIGGER IF EXISTS audit_events_no_update"))
        conn.execute(text("UPDATE audit_events SET details = '{}' WHERE seq = 3"))
    engine.dispose()
    assert cli.main(["verify", "--data-dir", str(data_dir)]) == cli.EXIT_BAD_LOG
    assert "FAILED at seq 3" in capsys.readouterr().out


def test_verify_with_a_checkpoint_needs_an_export_and_inputs_it_can_trust(initialised, capsys, tmp_path):
    data_dir, _ = initialised
    checkpoint = tmp_path / "checkpoint.txt"
    checkpoint.write_text("not a checkpoint\n")
    assert cli.main(["verify", "--data-dir", str(data_dir), "--checkpoint", str(checkpoint)]) == cli.EXIT_USAGE
    assert "give --export FILE" in capsys.readouterr().err
    export = tmp_path / "log.jsonl"
    engine = make_engine(CoordinatorConfig.load(data_dir).database_url)
    with transaction(engine, read_only=True) as s, export.open("w") as f:
        audit.export_jsonl(s, f)
    engine.dispose()
    # handed to the offline verifier: an unusable checkpoint is status 2, never "FAILED"
    assert cli.main(["verify", "--export", str(export), "--checkpoint", str(checkpoint)]) == 2
    assert capsys.readouterr().err.startswith("CANNOT VERIFY: give the coordinator's key")


def test_demo_options_go_to_the_demo_itself(capsys):
    import importlib.util

    if importlib.util.find_spec("coordinator.demo") is None:
        assert cli.main(["demo", "--help"]) == cli.EXIT_USAGE
        assert "not part of this installation" in capsys.readouterr().err
        return
    try:  # the demo's own parser answers --help (returning 0, or exiting with 0)
        status = cli.main(["demo", "--help"])
    except SystemExit as exc:
        status = exc.code
    assert status == 0 and "usage: " in capsys.readouterr().out


def _stored_settings(data_dir: Path) -> StrategySettings:
    engine = make_engine(CoordinatorConfig.load(data_dir).database_url)
    try:
        with transaction(engine) as s:
            return settings_of(s.scalars(select(Federation)).one())
    finally:
        engine.dispose()


@pytest.mark.parametrize(("extra", "expected"), [
    # the default configuration, chosen by the race (docs/benchmarks.md §9)
    ([], ("fedbuff", "ca2fl", 64, 1.0, "noise", 1.5)),
    (["--strategy", "fedbuff"], ("fedbuff", "none", 16, 1.0, "none", None)),  # a named strategy is taken as named
    (["--strategy", "fedasync"], ("fedasync", "none", 16, 1.0, "none", None)),
    (["--setting", "calibration=\"none\""], ("fedbuff", "none", 16, 1.0, "none", None)),  # the operator's win
    (["--setting", "max_staleness=8"], ("fedbuff", "ca2fl", 8, 1.0, "noise", 1.5)),
    (["--setting", "step_damping=\"none\"", "--setting", "server_lr=0.5"], ("fedbuff", "ca2fl", 64, 0.5, "none", 1.5)),
    (["--setting", "epsilon_lead=null"], ("fedbuff", "ca2fl", 64, 1.0, "noise", None)),
    (["--setting", "epsilon_lead=3"], ("fedbuff", "ca2fl", 64, 1.0, "noise", 3.0)),
])
def test_init_without_a_strategy_sets_up_fedbuff_with_calibration(tmp_path, capsys, extra, expected):
    assert cli.main([*INIT, "--data-dir", str(tmp_path / "c"), "--json", *extra]) == 0
    capsys.readouterr()
    settings = _stored_settings(tmp_path / "c")
    assert (settings.strategy, settings.calibration, settings.max_staleness, settings.server_lr,
            settings.step_damping, settings.epsilon_lead, settings.buffer_k) == (*expected, 5)
