"""Compressed updates over real HTTP: decoded before the checks, folded like a delta."""

from __future__ import annotations

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from coordinator.strategies import StrategySettings, fedasync_fold, fedasync_weight
from privacy import codec, compression
from tests.support.coordinator import FakeSilo, init_coordinator, serve_coordinator


def test_an_int8_update_is_accepted_and_folded_and_other_kinds_are_refused(db_url, tmp_path):
    data_dir = tmp_path / "coordinator"
    init = init_coordinator(data_dir, database_url=db_url, settings={"compression": "int8"})
    with serve_coordinator(data_dir, init=init) as server:
        silo = FakeSilo.create(server, "hospital-a", epsilon_cap=50.0)
        _, w0, _ = silo.fetch_model(0)
        delta = silo.delta(seed=3)
        payload = codec.encode(compression.quantize_int8(delta))
        assert len(payload) < len(codec.encode(delta))

        # Top-k is not this federation's compression: refused at step 4, nothing folded.
        topk = codec.encode(compression.top_k(delta, 0.1))
        r = silo.push(silo.seal(payload=topk, base_version=0, payload_kind="delta_topk"))
        assert r.status_code == 400 and r.json()["reason"] == "unsupported_version", r.text
        r = silo.push(silo.seal(payload=payload, base_version=0, payload_kind="delta_topk"))
        assert r.status_code == 400 and r.json()["reason"] == "unsupported_version", r.text
        # An int8 payload that does not hold its encoding's tensors: 422 schema_mismatch.
        bad = codec.encode({k: v for k, v in compression.quantize_int8(delta).items() if k != "scales"})
        r = silo.push(silo.seal(payload=bad, base_version=0, payload_kind="delta_int8"))
        assert r.status_code == 422 and r.json()["reason"] == "schema_mismatch", r.text

        envelope = silo.seal(payload=payload, base_version=0, payload_kind="delta_int8")
        r = silo.push(envelope)
        assert r.status_code == 200 and r.json()["status"] == "accepted", r.text
        version, w1, _ = silo.fetch_model()
        metrics = httpx.get(f"{server.base_url}/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(metrics) for s in fam.samples}
    assert samples[("fedsilo_update_bytes_total", (("outcome", "accepted"),))] == len(envelope)
    assert version == 1
    received = compression.decode("delta_int8", codec.decode(payload), codec.Schema.of(w0))
    expected = fedasync_fold(w0, w0, received, fedasync_weight(StrategySettings(), 0))
    for name in w0:
        torch.testing.assert_close(w1[name], expected[name])
