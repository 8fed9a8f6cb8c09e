"""Secure aggregation end to end, with real processes (issue 12, "Done when", item 3).

Two runs of the same federation, one after the other, on the same partitions: a real
coordinator (``fedsilo-coordinator serve``, FedBuff, K = 3), six real silo daemons
(``fedsilo-silo run`` subprocesses, real Opacus DP-SGD on breast_cancer, non-IID
Dirichlet partitions, a fixed training seed per silo) -- and, in the second run, a real
helper aggregator (``fedsilo-helper serve``) with ``secure_aggregation`` on. In both,
one silo is killed with SIGKILL once its first update has a receipt. The claims:

- the model learns as well: the held-out accuracy of the final version with secure
  aggregation is within 2 points of the run without it;
- every update left its silo in shares (each ledger row: ``masked_delta``, the helper's
  key), and every model version after 0 came from one opening by the helper of a
  buffer of at least K_min = 3 distinct silos (the helper's own records);
- the coordinator's database holds no unmasked individual update. Every stored blob is
  read and classified (:func:`classify_blob`): model versions are whole models (floats:
  a version after 0 is the previous model plus one opened SUM -- see above); the
  FedBuff buffer's slices and any stored share or mask sum are integers mod 2^32, and
  must look uniform: an unmasked quantized update has every element within
  ``|q| <= ceil(c * s) = 2^16`` of zero, a share (``q - PRG mod 2^32``) has about
  ``2^17 / 2^32`` of them there, so a blob with more than 1 % of its elements within
  ``2^20`` of zero is reported; a float tensor anywhere but in ``model_versions`` is
  reported; JSON (headers, signed statements, sealed seeds) and short binary values
  (keys, signatures, hashes) are metadata; anything else is reported by table and column.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sqlalchemy.engine import make_url

from privacy import codec
from privacy.errors import PrivacyError
from privacy.keys import Identity
from silo_node.commands import helper_enrol, init_silo
from silo_node.ledger import Ledger
from silo_node.partition import write_partitions
from tests.support.coordinator import create_silo, running_coordinator
from tests.support.helper import running_helper

from .test_silos import SILO, child_env, holdout_accuracy

TASK_OPTIONS = {"hidden": [8]}
SILOS = 6
K = 3
K_MIN = 3
ROUNDS = 8
VICTIM = "silo-6"
MASK = {"clip": 1.0, "scale": 65536, "max_updates": 64, "max_weight": 256}
TRAIN = ["--epochs", "3", "--batch-size", "16", "--lr", "0.2", "--round-epsilon", "4.0", "--pause", "0",
         "--jitter", "0"]
#: |signed value| at or below this is "near zero" for the uniformity check (16 x q_max).
NEAR_ZERO = 1 << 20
MODULUS = 1 << 32


# --------------------------------------------------------------------------- running one arm


def _wait_for_receipt(data_dir: Path, process: subprocess.Popen, deadline: float) -> None:
    """Until the silo's ledger holds a receipt (buffered or accepted)."""
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{data_dir.name} exited early: {process.communicate()}"
        if (data_dir / "ledger.db").exists():
            try:
                with Ledger(data_dir / "ledger.db", readonly=True) as ledger:
                    if any(e.status in ("buffered", "accepted") for e in ledger.entries("update")):
                        return
            except Exception:  # the daemon is creating it right now
                pass
        time.sleep(0.5)
    raise AssertionError(f"{data_dir.name} never got a receipt")


def _settle(server, deadline: float) -> None:
    """Let a last opening in flight finish: until the buffer holds fewer than K updates."""
    while time.monotonic() < deadline:
        if server.admin("GET", "/federation").json().get("buffered_updates", 0) < K:
            return
        time.sleep(1.0)


def _holdout_accuracy(server, holdout: Path) -> tuple[int, float]:
    versions = server.admin("GET", "/versions", params={"limit": 1000}).json()["versions"]
    latest = max(v["version"] for v in versions)
    return latest, holdout_accuracy(server, latest, holdout)


def run_arm(tmp: Path, parts, *, secure: bool) -> dict:
    """One federation run; returns what the tests look at (the processes are gone by then)."""
    with running_coordinator(tmp / "coordinator", task="breast_cancer", task_options=TASK_OPTIONS,
                             strategy="fedbuff", settings={"buffer_k": K}) as server:
        helper_cm = None
        helper = None
        if secure:
            key = Identity.load(Path(server.init["data_dir"]) / "keys").public().to_json()["signing_key"]
            helper_cm = running_helper(tmp / "helper", federation=server.init["federation"], coordinator_key=key,
                                       k_min=K_MIN)
            helper = helper_cm.__enter__()
        try:
            if helper is not None:
                value = {"mode": "helper", "helper_url": helper.base_url,
                         "helper_signing_key": helper.init["helper_keys"]["signing_key"],
                         "helper_hpke_key": helper.init["helper_keys"]["hpke_key"], "k_min": K_MIN, "mask": MASK}
                r = server.admin("PATCH", "/federation", json={"settings": {"secure_aggregation": value}})
                assert r.status_code == 200, r.text
            dirs: dict[str, Path] = {}
            for i, path in enumerate(parts.paths, start=1):
                name = f"silo-{i}"
                created = create_silo(server, name, epsilon_cap=100.0)
                helper_token = None if helper is None else helper.admin(
                    "POST", "/admin/silos", json={"silo_id": created["silo_id"]}).json()["token"]
                dirs[name] = tmp / name
                if helper is not None and i == 1:
                    # One silo enrols with both, as its operator would: `fedsilo-silo init` with the helper options.
                    done = subprocess.run(
                        [*SILO, "init", "--data-dir", str(dirs[name]), "--coordinator", server.base_url, "--token",
                         created["enrolment_token"], "--data", str(path), "--helper-url", helper.base_url,
                         "--helper-token", helper_token, "--helper-fingerprint",
                         helper.init["helper_fingerprints"]["signing"], "--json"],
                        capture_output=True, text=True, env=child_env(), timeout=300)
                    assert done.returncode == 0, done.stderr
                    assert json.loads(done.stdout)["helper_fingerprints"] == helper.init["helper_fingerprints"]
                    continue
                result = init_silo(data_dir=dirs[name], coordinator_url=server.base_url,
                                   token=created["enrolment_token"], data_path=str(path), environ={})
                assert result.data_error is None
                if helper_token is not None:
                    helper_enrol(dirs[name], helper_url=helper.base_url, token=helper_token,
                                 expected_fingerprint=helper.init["helper_fingerprints"]["signing"], environ={})
            processes = {
                name: subprocess.Popen(
                    [*SILO, "run", "--data-dir", str(d), "--rounds", str(ROUNDS), *TRAIN],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    env=child_env(FEDSILO_SILO_SEED=str(1000 + i)))
                for i, (name, d) in enumerate(dirs.items(), start=1)
            }
            try:
                deadline = time.monotonic() + 600
                _wait_for_receipt(dirs[VICTIM], processes[VICTIM], deadline)
                os.kill(processes[VICTIM].pid, signal.SIGKILL)  # kill -9, mid-run
                outputs = {}
                for name, process in processes.items():
                    out, err = process.communicate(timeout=900)
                    outputs[name] = (process.returncode, out, err)
            finally:
                for process in processes.values():
                    if process.poll() is None:
                        process.kill()
                        process.communicate()
            assert outputs[VICTIM][0] == -signal.SIGKILL
            for name, (code, _out, err) in outputs.items():
                if name != VICTIM:
                    assert code == 0, f"{name}: {err[-3000:]}"
            _settle(server, time.monotonic() + 180)
            latest, accuracy = _holdout_accuracy(server, parts.holdout_path)
            ledgers = {}
            for name, d in dirs.items():
                with Ledger(d / "ledger.db", readonly=True) as ledger:
                    ledgers[name] = [e.to_json() for e in ledger.entries("update")]
            helper_db = None if helper is None else _helper_records(helper.data_dir)
            helper_verify = None if helper is None else _helper_audit_verify(helper.data_dir)
            fingerprint = None if helper is None else helper.init["helper_fingerprints"]["hpke"]
            with server.client() as client:
                health = client.get("/healthz").json()
        finally:
            if helper_cm is not None:
                helper_cm.__exit__(None, None, None)
        database = make_url(server.init["database_url"]).database
    return {"latest": latest, "accuracy": accuracy, "ledgers": ledgers, "database": database, "helper": helper_db,
            "helper_verify": helper_verify, "helper_fingerprint": fingerprint, "healthz": health}


def _helper_records(data_dir: Path) -> dict:
    db = sqlite3.connect(f"file:{data_dir / 'helper.db'}?mode=ro", uri=True)
    try:
        openings = {row[0]: row[1] for row in db.execute("SELECT buffer_id, updates FROM helper_openings")}
        silos: dict[str, set[str]] = {b: set() for b in openings}
        for buffer_id, silo_id in db.execute("SELECT buffer_id, silo_id FROM helper_opened_updates"):
            silos[buffer_id].add(silo_id)
    finally:
        db.close()
    return {"openings": openings, "silos": silos}


def _helper_audit_verify(data_dir: Path) -> dict:
    from tests.support.helper import helper_cli

    return helper_cli("audit", "verify", "--dir", str(data_dir))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return write_partitions("breast_cancer", tmp_path_factory.mktemp("partitions"), SILOS, alpha=5.0, seed=7)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, parts) -> dict:
    return run_arm(tmp_path_factory.mktemp("plain"), parts, secure=False)


@pytest.fixture(scope="module")
def secure(tmp_path_factory, parts) -> dict:
    return run_arm(tmp_path_factory.mktemp("secure"), parts, secure=True)


# --------------------------------------------------------------------------- the blob classifier


def _near_zero_fraction(values: torch.Tensor) -> float:
    """Share of elements (read mod 2^32 as signed 32-bit) within NEAR_ZERO of zero."""
    v = values.to(torch.int64).flatten() % MODULUS
    signed = torch.where(v >= MODULUS // 2, v - MODULUS, v)
    return float((signed.abs() <= NEAR_ZERO).double().mean()) if v.numel() else 0.0


def classify_blob(table: str, column: str, value: bytes, buffer_kind: str | None) -> tuple[str, str | None]:
    """(kind, problem): problem is None when the blob cannot be an unmasked individual update."""
    where = f"{table}.{column}"
    if table == "fedbuff_slices":
        if buffer_kind != "int":
            return "float sum", f"{where}: a float FedBuff buffer under secure aggregation"
        elements = torch.frombuffer(bytearray(value), dtype=torch.int64)
        fraction = _near_zero_fraction(elements)
        return "share sum", None if fraction <= 0.01 else f"{where}: {fraction:.1%} of elements near zero"
    try:
        tensors = codec.decode(value)
    except (PrivacyError, ValueError, Exception):  # not safetensors: metadata or something unknown
        tensors = None
    if tensors:
        floats = [t for t in tensors.values() if t.is_floating_point()]
        if floats:
            return "model", None if table == "model_versions" else f"{where}: float tensors outside model_versions"
        fraction = _near_zero_fraction(torch.cat([t.flatten() for t in tensors.values()]))
        return "int tensors", None if fraction <= 0.01 else f"{where}: {fraction:.1%} of elements near zero"
    try:
        json.loads(value)
        return "json", None
    except (ValueError, UnicodeDecodeError):
        pass
    if len(value) <= 128:
        return "key/signature/hash", None
    return "unknown", f"{where}: {len(value)} bytes of unknown content"


def stored_blobs(database: str) -> Iterator[tuple[str, str, bytes, str | None]]:
    """Every BLOB value of every table, and every long TEXT value as bytes."""
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        kinds = {}
        try:
            kinds = dict(db.execute("SELECT federation_id, kind FROM fedbuff_buffers"))
        except sqlite3.OperationalError:
            pass
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            cursor = db.execute(f'SELECT * FROM "{table}"')
            columns = [d[0] for d in cursor.description]
            for row in cursor:
                record = dict(zip(columns, row))
                kind = kinds.get(record.get("federation_id")) if table == "fedbuff_slices" else None
                for column, value in record.items():
                    if isinstance(value, bytes):
                        yield table, column, value, kind
                    elif isinstance(value, str) and len(value) > 4096:
                        yield table, column, value.encode(), kind
    finally:
        db.close()


# --------------------------------------------------------------------------- the claims


@pytest.mark.slow
def test_accuracy_with_secure_aggregation_is_within_two_points_of_plain_fedbuff(plain, secure):
    print(f"\nheld-out accuracy: plain FedBuff version {plain['latest']} {plain['accuracy']:.4f}, "
          f"secure aggregation version {secure['latest']} {secure['accuracy']:.4f}")
    assert plain["latest"] >= 4 and secure["latest"] >= 4  # both learned over several folds
    assert abs(secure["accuracy"] - plain["accuracy"]) <= 0.02


@pytest.mark.slow
def test_every_update_left_in_shares_and_every_version_is_an_opened_sum_of_k_min_silos(secure, plain):
    for name, rows in secure["ledgers"].items():
        assert rows, name
        assert {(r["payload_kind"], r["helper_key"]) for r in rows} == {("masked_delta", secure["helper_fingerprint"])}
        assert all(r["status"] in ("buffered", "accepted", "sealed", "sent") for r in rows)
    assert all(r["payload_kind"] == "delta" for rows in plain["ledgers"].values() for r in rows)
    helper = secure["helper"]
    # One version per opening, none other: the coordinator changed the model only with opened sums.
    assert len(helper["openings"]) == secure["latest"]
    assert all(len(silos) >= K_MIN for silos in helper["silos"].values())
    assert secure["helper_verify"] == {"ok": True, "first_bad_seq": None}
    # The killed silo's receipted updates count like anyone's; it sent at least one.
    assert any(r["status"] == "buffered" for r in secure["ledgers"][VICTIM])


@pytest.mark.slow
def test_the_coordinator_database_holds_no_unmasked_individual_update(secure):
    seen: dict[str, int] = {}
    problems = []
    for table, column, value, kind in stored_blobs(secure["database"]):
        what, problem = classify_blob(table, column, value, kind)
        seen[f"{table}.{column}:{what}"] = seen.get(f"{table}.{column}:{what}", 0) + 1
        if problem:
            problems.append(problem)
    print("\nstored blobs:", json.dumps(seen, indent=1, sort_keys=True))
    assert not problems, problems
    assert any(key.startswith("model_versions.blob:model") for key in seen)


def test_the_classifier_would_catch_an_unmasked_update():
    # The check above is only as good as its classifier: an individual update, quantized or
    # not, is caught; a share of it is not.
    from privacy import secagg

    delta = {"w": torch.randn(30, 8) * 0.05, "b": torch.randn(8) * 0.05}
    settings = secagg.MaskSettings(**MASK)
    q = secagg.quantize(delta, settings)
    share = secagg.to_wire(secagg.mask_update(q, secagg.new_seed(), "u1"))
    assert classify_blob("updates", "payload", codec.encode(delta), None)[1] is not None
    assert classify_blob("updates", "payload", codec.encode(secagg.to_wire(q)), None)[1] is not None
    assert classify_blob("updates", "payload", codec.encode(share), None)[1] is None
    raw_q = torch.cat([t.flatten() for t in q.values()]).to(torch.int64).numpy().tobytes()
    assert classify_blob("fedbuff_slices", "data", raw_q, "int")[1] is not None
