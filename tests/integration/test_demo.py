"""``fedsilo-coordinator demo`` end to end, as a newcomer runs it, at a small size.

The demo runs as a real subprocess (a coordinator and two silos of its own, on
loopback). The test does not take the demo's word for anything it can check itself:
it re-verifies the exported audit chain offline, reconciles every silo's ledger
export with that chain, and looks in /proc for any process left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator import audit
from coordinator.demo.options import parse_options, silo_plans
from coordinator.demo.processes import Children, signals_deferred

_SCRIPT = Path(sys.executable).with_name("fedsilo-coordinator")
DEMO = [str(_SCRIPT), "demo"] if _SCRIPT.exists() else [sys.executable, "-m", "coordinator.demo"]


def demo_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FEDSILO_")}


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (Linux /proc)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.slow
def test_the_demo_improves_the_model_within_every_cap_and_leaves_verifiable_evidence(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([*DEMO, "--silos", "2", "--updates", "3", "--quiet", "--json", "--out", str(out)],
                          capture_output=True, text=True, env=demo_env(), timeout=600)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    printed = json.loads(done.stdout)  # --json: standard output holds the summary and nothing else
    summary = json.loads((out / "summary.json").read_text())
    assert printed == summary

    # The three claims, and the evidence behind each.
    assert summary["ok"] is True and all(summary["checks"].values()), summary["checks"]
    acc = summary["accuracy"]
    assert acc["final"] > acc["initial"]
    assert acc["initial_version"] == 0 and acc["final_version"] == summary["versions"]["final"] >= 1
    assert summary["updates"]["accepted"] >= 3
    assert summary["ended_because"] in ("target_updates_reached", "all_silos_stopped")
    assert len(summary["silos"]) == 2
    caps = [s["epsilon_cap"] for s in summary["silos"]]
    assert len(set(caps)) == 2  # each silo its own cap
    assert sum(s["slow"] for s in summary["silos"]) == 1
    # The slow silo is slow while training (slow_task's pause per DP-SGD step), not resting longer.
    assert all((s["extra_training_seconds"] > 0) == s["slow"] for s in summary["silos"])
    assert len({(s["pause_seconds"], s["jitter_seconds"]) for s in summary["silos"]}) == 1
    for s in summary["silos"]:
        assert s["epsilon_spent"] is not None and 0 <= s["epsilon_spent"] <= s["epsilon_cap"]
        assert s["within_cap"] and s["epsilon_consistent"]
    assert any(s["epsilon_spent"] > 0 for s in summary["silos"])

    # accuracy.png: a real PNG; the timeline behind it has one point per version, each
    # fold attributed to the silo whose update produced it.
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    timeline = summary["timeline"]
    assert [p["version"] for p in timeline] == list(range(acc["final_version"] + 1))
    assert all(p["accuracy"] is not None for p in timeline)
    names = {s["name"] for s in summary["silos"]}
    assert timeline[0]["silo"] is None and all(p["silo"] in names for p in timeline[1:])

    # The audit export verifies here, independently of the demo, and holds every fold.
    events = read_jsonl(out / summary["audit"]["export"]["path"])
    assert audit.verify(events).ok
    assert summary["audit"]["verify"]["ok"] and summary["audit"]["verify"]["checked"] == len(events)
    accepted = {e["subject"].removeprefix("update:") for e in events if e["action"] == "update_accepted"}
    assert {p["update_id"] for p in timeline[1:]} <= accepted

    # Each silo's ledger export agrees with the audit log, update by update.
    ids = {s["silo_id"] for s in summary["silos"]}
    for s in summary["silos"]:
        rows = read_jsonl(out / s["ledger"])
        assert len(rows) == s["ledger_entries"]
        mine = {e["subject"].removeprefix("update:") for e in events
                if e["action"] in ("update_accepted", "update_buffered") and e["actor"] == s["silo_id"]}
        receipted = {r["update_id"] for r in rows if r["kind"] == "update" and r["status"] in ("accepted", "buffered")}
        assert receipted == mine and s["updates_accepted"] == len(mine)
    assert {e["actor"] for e in events if e["action"] == "update_accepted"} <= ids

    assert processes_mentioning(str(out)) == []  # nothing left running


@pytest.mark.slow
def test_an_interrupted_demo_stops_every_process_it_started(tmp_path):
    out = tmp_path / "demo"
    # As from a terminal: SIGINT not ignored, even when the test run itself was started in
    # the background by a shell (which makes a background job ignore SIGINT, inherited).
    process = subprocess.Popen([*DEMO, "--silos", "2", "--quiet", "--out", str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=demo_env(),
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        # Wait until the silo processes exist, then press Ctrl-C (SIGINT, as a terminal would).
        while len(processes_mentioning(str(out / "silos"))) < 2 and process.poll() is None:
            assert time.monotonic() < deadline, "the demo never started its silos"
            time.sleep(0.2)
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, f"{stdout}\n{stderr}"
    assert processes_mentioning(str(out)) == []
    summary = json.loads((out / "summary.json").read_text())  # what was done so far is kept
    assert summary["ended_because"] == "interrupted"
    assert summary["checks"]["audit_verified"]


@pytest.mark.slow
def test_the_demo_with_secure_aggregation_runs_a_helper_and_every_update_leaves_in_shares(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([*DEMO, "--secure-aggregation", "--silos", "3", "--updates", "3", "--quiet", "--json",
                           "--out", str(out)], capture_output=True, text=True, env=demo_env(), timeout=900)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    summary = json.loads(done.stdout)
    assert summary["ok"] is True and all(summary["checks"].values()), summary["checks"]
    assert summary["strategy"] == "fedbuff" and summary["checks"]["updates_in_shares"]
    secure = summary["secure_aggregation"]
    assert secure["k_min"] == summary["strategy_settings"]["buffer_k"] == 3
    assert secure["openings"] >= 1 and secure["updates_sent"] >= 3
    assert secure["updates_in_shares"] == secure["updates_sent"]
    assert summary["accuracy"]["final_version"] >= 1
    # Every ledger row says so too, naming the helper's key; the coordinator's audit log
    # records the setting change that turned it on.
    for s in summary["silos"]:
        updates = [r for r in read_jsonl(out / s["ledger"]) if r["kind"] == "update"]
        assert updates and {(r["payload_kind"], r["helper_key"]) for r in updates} == \
            {("masked_delta", secure["fingerprints"]["hpke"])}
    events = read_jsonl(out / summary["audit"]["export"]["path"])
    assert audit.verify(events).ok
    assert any("secure_aggregation" in json.dumps(e["details"]) for e in events if "setting" in e["action"])
    assert (out / "logs" / "helper.log").exists() and (out / "helper" / "helper.toml").exists()
    assert processes_mentioning(str(out)) == []  # the helper was stopped too


# --------------------------------------------------------------------------- the pieces, fast


def test_each_silo_gets_its_own_cap_and_exactly_one_is_slow():
    for count in (2, 5, 20):
        plans = silo_plans(count)
        assert len({p.epsilon_cap for p in plans}) == count
        slow = [p for p in plans if p.slow]
        # Slow while training, not by resting: every silo rests alike.
        assert len(slow) == 1 and slow[0].extra_training_seconds > 0
        assert {(p.pause_seconds, p.jitter_seconds) for p in plans} == {(slow[0].pause_seconds, slow[0].jitter_seconds)}
        assert all(p.extra_training_seconds == 0 for p in plans if not p.slow)
        assert "slow on purpose" in slow[0].pace and "training" in slow[0].pace


def test_a_ctrl_c_while_a_child_starts_finds_it_registered_and_stops_it(tmp_path):
    # The race the interrupted-demo test once lost: SIGINT landing between Popen returning
    # and the child being recorded left that child running after the demo exited.
    kids = Children()
    # Ctrl-C raises KeyboardInterrupt, as in a terminal (a test run started in the
    # background by a shell inherits SIGINT ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with kids, signals_deferred():
                child = kids.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)", str(tmp_path)],
                                   tmp_path / "sleeper.log", os.environ)
                signal.raise_signal(signal.SIGINT)  # held until the block ends
                assert child.process.poll() is None
                started = child
    finally:
        signal.signal(signal.SIGINT, previous)
    assert started.process.poll() is not None  # stopped by Children on the way out
    assert processes_mentioning(str(tmp_path)) == []


def test_demo_options_accept_the_separator_make_may_pass_and_refuse_nonsense(capsys):
    options = parse_options(["--", "--silos", "3", "--quiet", "--task", "digits"])
    assert (options.silos, options.quiet, options.task) == (3, True, "digits")
    with pytest.raises(SystemExit):
        parse_options(["--silos", "1"])
    assert "between 2 and 20" in capsys.readouterr().err


def test_secure_aggregation_means_fedbuff_and_refuses_fedasync(capsys):
    options = parse_options(["--secure-aggregation", "--silos", "5"])
    assert (options.secure_aggregation, options.strategy, options.k_min) == (True, "fedbuff", 3)
    assert parse_options(["--secure-aggregation", "--silos", "2"]).k_min == 2
    with pytest.raises(SystemExit):
        parse_options(["--secure-aggregation", "--strategy", "fedasync"])
    assert "--secure-aggregation opens FedBuff buffers" in capsys.readouterr().err


def test_the_demo_helper_runs_as_a_real_process_and_enrols_a_silo(tmp_path):
    # The --secure-aggregation pieces without a coordinator run: fedsilo-helper init and
    # serve as children, a silo (enrolled with the fake coordinator) put on the helper's
    # roster and enrolled, the helper's /metrics read, every child stopped.
    from coordinator.demo.processes import Children
    from coordinator.demo.secagg import enrol_with_helper, openings, setting, start_helper, wait_helper
    from privacy.keys import b64e
    from silo_node.commands import init_silo
    from silo_node.config import SiloConfig
    from tests.support.fake_coordinator import FakeCoordinator

    fake = FakeCoordinator()
    silo = init_silo(data_dir=tmp_path / "silo", coordinator_url="https://c.example", token=fake.create_token("s"),
                     transport=fake.transport, environ={}).config
    with Children() as kids:
        helper = start_helper(tmp_path, kids, federation=fake.federation,
                              coordinator_key=b64e(fake.identity.public().signing), k_min=3)
        wait_helper(helper)
        enrol_with_helper(helper, silo.enrolment.silo_id, silo.data_dir)
        assert openings(helper) == 0
        value = setting(helper)
        assert (value["helper_hpke_key"], value["k_min"]) == (helper.keys["hpke_key"], 3)
    pinned = SiloConfig.load(silo.data_dir, environ={}).helper
    assert pinned.fingerprints() == helper.fingerprints and pinned.url == helper.url
    assert helper.child.exit_code is not None and (tmp_path / "logs" / "helper.log").exists()
