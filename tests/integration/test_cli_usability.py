"""Small things users hit with both programs: help, --version, --debug, pipes, migrate.

* every option of every (sub)command of ``fedsilo-coordinator`` and ``fedsilo-silo`` has
  help text (the parsers are walked, so a new option without help fails here);
* ``--version`` works on both; ``--debug`` is accepted after the command too;
* ``status --json | head -1`` ends quietly (a real pipe whose reader leaves early);
* ``migrate`` refuses a directory ``init`` never made, creating nothing;
* a task option the task does not have is named in plain words.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from coordinator import cli as coordinator_cli
from silo_node import cli as silo_cli


def _walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


@pytest.mark.parametrize("make", [coordinator_cli._parser, silo_cli.build_parser], ids=["coordinator", "silo"])
def test_every_option_has_help_text(make):
    missing = [f"{path}: {'/'.join(a.option_strings) or a.dest}" for path, a in _walk(make(), make().prog)
               if not (a.help and a.help.strip())]
    assert missing == []


@pytest.mark.parametrize("program", ["coordinator.cli", "silo_node.cli"])
def test_version(program):
    done = subprocess.run([sys.executable, "-m", program, "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    name, version = done.stdout.split()
    assert name.startswith("fedsilo-") and version[0].isdigit()


def test_debug_after_the_command_shows_the_traceback(tmp_path, capsys):
    assert silo_cli.main(["status", "--data-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    for argv in (["--debug", "status", "--data-dir", str(tmp_path)], ["status", "--data-dir", str(tmp_path), "--debug"]):
        with pytest.raises(Exception, match="no silo configuration"):
            silo_cli.main(argv)
    args = coordinator_cli._parser().parse_args(["admin", "silos", "list", "--debug"])
    assert args.debug is True
    assert coordinator_cli._parser().parse_args(["--debug", "migrate", "--data-dir", "x"]).debug is True
    assert coordinator_cli._parser().parse_args(["migrate", "--data-dir", "x"]).debug is False


def test_migrate_refuses_a_directory_init_never_made(tmp_path, capsys):
    target = tmp_path / "never"
    assert coordinator_cli.main(["migrate", "--data-dir", str(target)]) == 2
    err = capsys.readouterr().err
    assert "is not a coordinator data directory; run: fedsilo-coordinator init" in err
    assert not target.exists()


@pytest.mark.parametrize("options, expected", [
    (["features=4", "classes=2", "bogus=1"], "task 'csv' has no option 'bogus' (its options: features, classes"),
    (["classes=2"], "task 'csv' needs feature_names: the names of the CSV's feature columns"),
])
def test_task_option_errors_in_plain_words(tmp_path, capsys, options, expected):
    argv = ["init", "--data-dir", str(tmp_path / "c"), "--task", "csv"]
    for option in options:
        argv += ["--task-option", option]
    assert coordinator_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "argument" not in err and err.count("task 'csv'") == 1


def _into_a_closed_pipe(*argv: str) -> subprocess.CompletedProcess:
    """Run a program whose standard output is a pipe nobody reads any more (`| head` gone)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", *argv], stdout=write_end, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(write_end)


def test_json_into_a_pipe_that_closed_ends_quietly(tmp_path):
    from tests.support.fake_coordinator import FakeCoordinator

    fake = FakeCoordinator()
    silo_cli.init_silo(data_dir=tmp_path / "silo", coordinator_url="https://coordinator.example",
                       token=fake.create_token("hospital-a"), transport=fake.transport, environ={})
    done = _into_a_closed_pipe("silo_node.cli", "status", "--json", "--data-dir", str(tmp_path / "silo"))
    assert (done.returncode, done.stderr) == (0, b"")
    export = tmp_path / "audit.jsonl"
    export.write_text("")
    done = _into_a_closed_pipe("coordinator.cli", "verify", "--export", str(export), "--json")
    assert (done.returncode, done.stderr) == (0, b"")
