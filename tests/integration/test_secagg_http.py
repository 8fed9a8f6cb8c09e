"""Secure aggregation end to end over real HTTP: a served coordinator, a REAL helper
process (``fedsilo-helper init``/``serve``) and silos that enrolled with both and mask
their updates with :func:`privacy.masked_update.mask_for_helper`.

- an opened buffer folds to exactly what FedBuff makes of the plain quantized weighted
  sum (bit for bit), and a plain delta is refused ``masking_required``;
- the helper down: the sealed buffer waits, ``/healthz`` says why, the next buffer fills
  meanwhile, a masked update beyond it is ``503 unavailable`` (nothing decided), and both
  buffers open, in order, once the helper is back;
- the coordinator's database never holds one silo's unmasked update (every stored value
  of every table is searched for the bytes of each plain delta).

SQLite and PostgreSQL (``db_url``).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import torch

from coordinator import secagg as csa
from coordinator.strategies import fedbuff_apply
from privacy import codec, masked_update, secagg
from privacy.envelope import seal_update
from privacy.keys import b64d, hpke_public_from_raw
from tests.support.coordinator import (
    FakeSilo, _stop, init_coordinator, open_context, serve_coordinator, verify_receipt,
)
from tests.support.helper import CLI as HELPER_CLI
from tests.support.helper import running_helper

NAME = "secagg-federation"
# max_updates = K: a buffer holds K updates at most, so the second slot is full at K too
MASK = {"clip": 1.0, "scale": 65536, "max_updates": 3, "max_weight": 256}
K = 3

pytestmark = pytest.mark.slow


def _wait(predicate, what: str, timeout: float = 120.0):
    """Poll ``predicate`` until it returns something truthy (the test's bound, not a measurement)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _exact_delta(silo: FakeSilo, seed: int) -> dict[str, torch.Tensor]:
    """A delta of multiples of 1/scale: quantizing it is exact (no stochastic rounding)."""
    g = torch.Generator().manual_seed(seed)
    return {s.name: (torch.randint(-500, 500, s.shape, generator=g).double() / MASK["scale"]).to(torch.float32)
            for s in silo.schema.tensors}


def _masked_envelope(silo: FakeSilo, delta, helper_hpke, *, base_version: int = 0) -> bytes:
    header = silo.header(b"", base_version=base_version)
    header, payload = masked_update.mask_for_helper(
        delta, header, federation=NAME, settings=secagg.MaskSettings(**MASK), helper=helper_hpke,
        signer=silo.identity.signing)
    return seal_update(header, payload, recipient=silo.coordinator.hpke_key, signer=silo.identity.signing)


def _enrol_with_helper(helper, silo: FakeSilo) -> None:
    token = helper.admin("POST", "/admin/silos", json={"silo_id": silo.silo_id}).json()["token"]
    with httpx.Client(base_url=helper.base_url) as c:
        r = c.post("/enrol", json={"silo_id": silo.silo_id, "signing_key": silo.identity.public().to_json()["signing_key"]},
                   headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text


def _setting(helper) -> dict:
    keys = helper.init["helper_keys"]
    return {"mode": "helper", "helper_url": helper.base_url, "helper_signing_key": keys["signing_key"],
            "helper_hpke_key": keys["hpke_key"], "k_min": K, "mask": dict(MASK)}


def _version(server) -> int:
    return server.admin("GET", "/federation").json()["current_version"]


def _expected(w0, deltas, weights, server_lr: float = 1.0) -> dict[str, torch.Tensor]:
    """FedBuff's step on the PLAIN quantized weighted sum (no masks anywhere)."""
    settings = csa.SecaggSettings("http://x", "", "", K, secagg.MaskSettings(**MASK))
    q = [secagg.quantize(d, settings.mask) for d in deltas]
    plain = None
    for qi, w in zip(q, weights):
        plain = secagg.add_weighted(plain, qi, w)
    zero = {n: torch.zeros_like(t) for n, t in plain.items()}
    schema = codec.Schema.of(w0)
    opened = csa.opened_delta(plain, zero, settings, schema, count=len(deltas), max_update_norm=None)
    return fedbuff_apply(w0, opened, len(deltas), server_lr)


def _stored_values(data_dir: Path):
    """Every bytes or text value of every table of the coordinator's database."""
    ctx = open_context(data_dir)
    try:
        meta = sa.MetaData()
        meta.reflect(ctx.engine)
        with ctx.engine.connect() as conn:
            for table in meta.sorted_tables:
                for row in conn.execute(sa.select(table)):
                    for value in row:
                        if isinstance(value, (bytes, memoryview)):
                            yield bytes(value)
                        elif isinstance(value, str):
                            yield value.encode()
    finally:
        ctx.close()


@pytest.fixture
def federation(db_url, tmp_path):
    """A served FedBuff coordinator (K = 3), three silos enrolled with it and with a real
    helper, and secure aggregation turned on through the admin API."""
    data_dir = tmp_path / "coordinator"
    init = init_coordinator(data_dir, database_url=db_url, name=NAME, strategy="fedbuff",
                            settings={"buffer_k": K})
    with serve_coordinator(data_dir, init=init) as server:
        silos = [FakeSilo.create(server, f"hospital-{i}", epsilon_cap=100.0) for i in range(K)]
        coordinator_key = silos[0].enrolment["coordinator"]["signing_key"]
        with running_helper(tmp_path / "helper", federation=NAME, coordinator_key=coordinator_key,
                            k_min=K) as helper:
            for silo in silos:
                _enrol_with_helper(helper, silo)
            r = server.admin("PATCH", "/federation", json={"settings": {"secure_aggregation": _setting(helper)}})
            assert r.status_code == 200, r.text
            yield server, helper, silos, data_dir


def test_an_opened_buffer_folds_the_plain_quantized_sum_and_plain_deltas_are_refused(federation):
    server, helper, silos, data_dir = federation
    helper_hpke = hpke_public_from_raw(b64d(helper.init["helper_keys"]["hpke_key"]))
    _, w0, release = silos[0].fetch_model(0)
    assert release["secure_aggregation"] == _setting(helper)  # signed: the silo learns it here

    plain = silos[0].push(silos[0].seal(silos[0].delta(), base_version=0))
    assert plain.status_code == 400 and plain.json()["reason"] == "masking_required", plain.text
    assert plain.json()["charged"] is False

    deltas = [_exact_delta(silo, i) for i, silo in enumerate(silos)]
    for silo, delta in zip(silos, deltas):
        r = silo.push(_masked_envelope(silo, delta, helper_hpke))
        assert r.status_code == 200, r.text
        receipt = verify_receipt(r.json(), silo.coordinator)
        assert receipt["status"] == "buffered" and receipt["weight"] == 256  # staleness 0: W_max

    _wait(lambda: _version(server) == 1, "the opening")
    _, w1, _ = silos[0].fetch_model(1)
    expected = _expected(w0, deltas, [256] * K)
    for name in w0:
        assert torch.equal(w1[name], expected[name]), name
    assert server.admin("GET", "/federation").json()["buffered_updates"] == 0
    with server.client() as c:
        audit = c.get("/api/audit/events", params={"action": "buffer_opened"}, headers=server.admin_headers)
    assert audit.status_code == 200, audit.text
    [opened] = audit.json()["events"]
    assert opened["actor"] == "system" and opened["details"]["resulting_version"] == 1
    assert opened["details"]["weights"] == [256] * K and len(opened["details"]["updates"]) == K
    # the opening's two phases are timed in the opener's /metrics (recorded just after its commit)
    with server.client() as c:
        _wait(lambda: all(f'fedsilo_secagg_opening_seconds_count{{phase="{phase}"}} 1.0' in c.get("/metrics").text
                          for phase in ("helper", "fold")), "the opening's timings in /metrics")

    # the coordinator's database holds no silo's unmasked update, in any table
    # (the raw bytes of each delta's tensors, in every dtype it could have been stored in)
    needles = [t.to(dtype).numpy().tobytes()[:64] for d in deltas for t in d.values() if t.numel() >= 16
               for dtype in (torch.float32, torch.float64)]
    needles += [secagg.quantize(d, secagg.MaskSettings(**MASK))[n].numpy().tobytes()[:128]
                for d in deltas for n in d if d[n].numel() >= 16]  # nor its quantized form
    for value in _stored_values(data_dir):
        for needle in needles:
            assert needle not in value


def test_a_damped_opening_steps_by_the_noise_its_members_declared(federation):
    server, helper, silos, _ = federation
    r = server.admin("PATCH", "/federation", json={"settings": {"step_damping": "noise"}})
    assert r.status_code == 200, r.text
    helper_hpke = hpke_public_from_raw(b64d(helper.init["helper_keys"]["hpke_key"]))
    _, w0, _ = silos[0].fetch_model(0)
    deltas = [_exact_delta(silo, 10 + i) for i, silo in enumerate(silos)]
    for silo, delta in zip(silos, deltas):  # each declares noise 1.0 (FakeSilo's DP): half a step
        assert silo.push(_masked_envelope(silo, delta, helper_hpke)).status_code == 200
    _wait(lambda: _version(server) == 1, "the opening")
    _, w1, _ = silos[0].fetch_model(1)
    expected = _expected(w0, deltas, [256] * K, server_lr=0.5)
    for name in w0:
        torch.testing.assert_close(w1[name], expected[name])


def _serve_helper(helper, port: int) -> subprocess.Popen:
    with (helper.data_dir / "serve-again.log").open("wb") as log:
        return subprocess.Popen([*HELPER_CLI, "serve", "--dir", str(helper.data_dir), "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_with_the_helper_down_the_buffers_wait_and_open_when_it_is_back(federation):
    server, helper, silos, data_dir = federation
    helper_hpke = hpke_public_from_raw(b64d(helper.init["helper_keys"]["hpke_key"]))
    port = int(helper.base_url.rsplit(":", 1)[1])
    _stop(helper.process)  # the helper goes down

    deltas = [_exact_delta(silo, 10 + i) for i, silo in enumerate(silos)]
    for silo, delta in zip(silos, deltas):  # the first buffer: ready, sealed, waits for the helper
        assert silo.push(_masked_envelope(silo, delta, helper_hpke)).status_code == 200
    following = [_exact_delta(silo, 20 + i) for i, silo in enumerate(silos)]
    for silo, delta in zip(silos, following):  # the next buffer fills meanwhile: no silo is turned away
        r = silo.push(_masked_envelope(silo, delta, helper_hpke))
        assert r.status_code == 200 and r.json()["status"] == "buffered", r.text

    def degraded():
        with server.client() as c:
            r = c.get("/healthz")
        return r if r.status_code == 503 else None

    health = _wait(degraded, "/healthz to report the helper")
    assert health.json()["status"] == "degraded" and health.json()["reason"] == "helper_unavailable"
    assert "Retry-After" in health.headers
    late = silos[0].push(_masked_envelope(silos[0], deltas[0], helper_hpke))
    assert late.status_code == 503 and late.json()["reason"] == "unavailable", late.text
    assert "Retry-After" in late.headers
    assert _version(server) == 0 and server.admin("GET", "/federation").json()["buffered_updates"] == 2 * K

    again = _serve_helper(helper, port)  # back, same keys, same database, same address
    try:
        _wait(lambda: _version(server) == 2, "both openings after the helper came back", timeout=300)
        with server.client() as c:
            _wait(lambda: c.get("/healthz").status_code == 200, "/healthz to recover")
        _, w0, _ = silos[0].fetch_model(0)
        _, w1, _ = silos[0].fetch_model(1)
        _, w2, _ = silos[0].fetch_model(2)
        expected = _expected(w0, deltas, [256] * K)  # version 1: exactly the first buffer
        then = _expected(w1, following, [256] * K)  # version 2: the second (staleness 0 when sent)
        for name in w0:
            assert torch.equal(w1[name], expected[name]), name
            assert torch.equal(w2[name], then[name]), name
    finally:
        _stop(again)


def test_an_opened_sum_over_the_norm_bound_discards_the_buffer(federation):
    """No per-update norm check is possible on shares; the SUM's is, and a sum that fails
    it can never be opened otherwise: the buffer is discarded, audited, nothing folded."""
    server, helper, silos, data_dir = federation
    helper_hpke = hpke_public_from_raw(b64d(helper.init["helper_keys"]["hpke_key"]))
    assert server.admin("PATCH", "/federation", json={"settings": {"max_update_norm": 1e-6}}).status_code == 200
    for i, silo in enumerate(silos):
        assert silo.push(_masked_envelope(silo, _exact_delta(silo, 30 + i), helper_hpke)).status_code == 200

    def discarded():
        with server.client() as c:
            r = c.get("/api/audit/events", params={"action": "buffer_discarded"}, headers=server.admin_headers)
        return r.json()["events"]

    [entry] = _wait(discarded, "the buffer to be discarded")
    assert entry["details"]["reason"] == "norm_exceeded" and len(entry["details"]["updates"]) == K
    assert _version(server) == 0 and server.admin("GET", "/federation").json()["buffered_updates"] == 0
    rows = server.admin("GET", "/updates").json()["updates"]
    assert len(rows) == K and {u["status"] for u in rows} == {"rejected"}
