"""The fold's large-model paths, taken by a model of a few kilobytes.

A 100M-parameter model is too big for a test, so the thresholds are lowered instead:
the new version is computed slice by slice straight into the buffer that is stored;
a fold whose current version was not cached writes the new version over the buffer it
loaded; blobs are read in slices (SQLite incremental blob I/O, PostgreSQL substring)
and, on SQLite, large ones are written as zeros plus incremental writes. Whatever the
path, the stored version is bit for bit what the strategy computes on whole tensors,
and byte for byte what ``codec.encode`` writes.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
import torch
from sqlalchemy import select

from coordinator import enrolment, federation, fold, ingest, model_store, silos, strategies
from coordinator.app import open_coordinator
from coordinator.bootstrap import initialize
from coordinator.models import ModelVersion
from coordinator.strategies import (
    StrategySettings,
    fedasync_fold,
    fedasync_weight,
    fedbuff_accumulate,
    fedbuff_apply,
)
from privacy import codec
from privacy.keys import Identity
from tests.support.coordinator import FakeSilo

# 16 -> 40 -> 3: tensors of 640, 40, 120 and 3 elements, a 3.3 kB blob.
TASK_OPTIONS = {"classes": 3, "hidden": [40], "feature_names": [f"f{i}" for i in range(16)]}


@pytest.fixture(autouse=True)
def small_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_store, "_BLOB_SLICE", 100)  # bytes per database read
    monkeypatch.setattr(model_store, "_STREAM_MIN", 1000)  # SQLite: zeros + incremental writes
    monkeypatch.setattr(strategies, "FOLD_SLICE", 64)  # elements per fold slice (a SIMD multiple)


def make(root: Path, db_url: str, strategy: str = "fedasync", **settings):
    initialize(root, task="csv", task_options=TASK_OPTIONS, database_url=db_url, strategy=strategy,
               settings=settings)
    return open_coordinator(root)


def enrol(ctx, name: str) -> FakeSilo:
    with ctx.transaction() as s:
        new = enrolment.create_silo(s, name=name, epsilon_cap=100.0, delta=1e-5, actor="token:test", now=ctx.clock())
    identity = Identity.generate()
    return FakeSilo("", identity, silos.enroll(ctx, {"token": new.enrolment_token, **identity.public().to_json()}))


def submit(ctx, envelope: bytes) -> fold.Outcome:
    return anyio.run(ingest.ingest, ctx, bytearray(envelope))  # a bytearray, as the HTTP route passes


def stored(ctx, version: int) -> tuple[bytes, str]:
    with ctx.read() as s:
        row = s.execute(select(ModelVersion.blob, ModelVersion.digest).where(ModelVersion.version == version)).one()
    return bytes(row[0]), row[1]


def assert_stored(ctx, version: int, expected: dict[str, torch.Tensor]) -> None:
    blob, digest = stored(ctx, version)
    got = codec.decode(blob)
    for name, t in expected.items():
        assert torch.equal(got[name], t), f"version {version}: {name}"
    assert blob == codec.encode(expected)
    assert codec.digest(blob) == digest


def test_fedasync_folds_through_every_large_model_path(tmp_path: Path, db_url: str) -> None:
    ctx = make(tmp_path / "coord", db_url)
    other = None
    try:
        silo = enrol(ctx, "hospital-a")
        weight = lambda staleness: fedasync_weight(StrategySettings(), staleness)  # noqa: E731
        w0 = codec.decode(stored(ctx, 0)[0])

        # Cold cache: version 0 is loaded for this fold alone and overwritten by version 1.
        d1 = silo.delta(seed=1)
        assert submit(ctx, silo.seal(d1, base_version=0)).version == 1
        w1 = fedasync_fold(w0, w0, d1, weight(0))
        assert_stored(ctx, 1, w1)

        # Warm current (version 1, cached), stale base (version 0, read back in slices).
        d2 = silo.delta(seed=2)
        assert submit(ctx, silo.seal(d2, base_version=0)).version == 2
        w2 = fedasync_fold(w1, w0, d2, weight(1))
        assert_stored(ctx, 2, w2)

        # Another process on the same database: its cache is cold, so it owns what it loads.
        other = open_coordinator(tmp_path / "coord")
        d3 = silo.delta(seed=3)
        assert submit(other, silo.seal(d3, base_version=1)).version == 3
        w3 = fedasync_fold(w2, w1, d3, weight(1))
        assert_stored(ctx, 3, w3)

        # ... and the first process's cached versions were not touched by it.
        d4 = silo.delta(seed=4)
        assert submit(ctx, silo.seal(d4, base_version=2)).version == 4
        assert_stored(ctx, 4, fedasync_fold(w3, w2, d4, weight(1)))
        with ctx.read() as s:
            for version, expected in ((1, w1), (2, w2)):
                cached = ctx.cache.weights(s, ctx.federation_id, version)
                assert all(torch.equal(cached[n], t) for n, t in expected.items())
    finally:
        ctx.close()
        if other is not None:
            other.close()


def test_fedbuff_applies_its_buffer_into_the_stored_buffer(tmp_path: Path, db_url: str) -> None:
    ctx = make(tmp_path / "coord", db_url, strategy="fedbuff", buffer_k=2, server_lr=0.5)
    try:
        a, b = enrol(ctx, "a"), enrol(ctx, "b")
        w0 = codec.decode(stored(ctx, 0)[0])
        da, db_ = a.delta(seed=5), b.delta(seed=6)
        assert submit(ctx, a.seal(da, base_version=0)).status == "buffered"
        assert submit(ctx, b.seal(db_, base_version=0)).version == 1
        buffer = fedbuff_accumulate(fedbuff_accumulate(None, da, 0), db_, 0)
        assert_stored(ctx, 1, fedbuff_apply(w0, buffer, 2, 0.5))
    finally:
        ctx.close()


def test_a_pruned_version_reads_as_absent(tmp_path: Path, db_url: str) -> None:
    ctx = make(tmp_path / "coord", db_url)
    try:
        silo = enrol(ctx, "a")
        submit(ctx, silo.seal(silo.delta(seed=1), base_version=0))
        with ctx.transaction() as s:
            s.execute(ModelVersion.__table__.update().where(ModelVersion.version == 0).values(blob=None))
        with ctx.read() as s:
            assert model_store.version_state(s, ctx.federation_id, 0).retained is False
            assert model_store.version_state(s, ctx.federation_id, 1).retained is True
            assert model_store.read_blob(s, ctx.federation_id, 0) is None
            assert bytes(model_store.read_blob(s, ctx.federation_id, 1)) == stored(ctx, 1)[0]
    finally:
        ctx.close()
