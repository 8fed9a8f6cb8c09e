"""The model store on SQLite and PostgreSQL: versions written and read in slices,
releases streamed from one snapshot, signed once per version, pruning and the
weights cache.

The slice sizes are lowered so that a model of a few kilobytes takes every sliced path
(SQLite zeros-plus-incremental writes, chunked reads on both databases).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
import torch
from sqlalchemy import update

from coordinator import federation, model_store, optimizer_state, weights_cache
from coordinator.db import transaction
from coordinator.errors import ApiError, Reason
from coordinator.models import Federation, ModelVersion, OptimizerState
from coordinator.strategies import StrategySettings
from privacy import codec
from privacy.envelope import utc_timestamp, verify_release
from privacy.errors import EnvelopeError
from privacy.errors import Reason as WireReason
from privacy.keys import Identity

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
FED = 1


@pytest.fixture(autouse=True)
def small_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_store, "_BLOB_SLICE", 100)  # bytes per read into a buffer
    monkeypatch.setattr(model_store, "_STREAM_CHUNK", 64)  # bytes per chunk sent to a client
    monkeypatch.setattr(model_store, "_STREAM_MIN", 1000)  # SQLite: zeros + incremental writes


def weights(value: float) -> dict[str, torch.Tensor]:
    return {"a": torch.full((20, 20), value), "b": torch.arange(7, dtype=torch.float32) + value}


@pytest.fixture
def engine(migrated_engine):
    """A federation with versions 0..3 (version v holds ``weights(v)``)."""
    with transaction(migrated_engine) as s:
        federation.init_federation(s, name="fed", task={"name": "csv", "options": {}}, weights=weights(0.0),
                                   settings=StrategySettings(), now=T0)
    for v in range(1, 4):
        with transaction(migrated_engine) as s:
            fed = s.get(Federation, FED)
            model_store.write_version(s, fed, tensors=weights(float(v)), parent=v - 1, produced_by=None,
                                      now=T0 + timedelta(minutes=v))
    return migrated_engine


def snapshot(engine):
    return partial(transaction, engine, read_only=True)


def streamed(stream: model_store.ReleaseStream) -> bytes:
    try:
        chunks = list(iter(stream.read, b""))
    finally:
        stream.close()
    assert len(chunks) > 1 and max(map(len, chunks)) <= model_store._STREAM_CHUNK
    return b"".join(chunks)


def test_versions_round_trip_through_sliced_reads_and_writes(engine):
    with transaction(engine, read_only=True) as s:
        for v in range(4):
            blob = model_store.read_blob(s, FED, v)
            assert bytes(blob) == codec.encode(weights(float(v)))
            state = model_store.version_state(s, FED, v)
            assert state == model_store.VersionState(v, codec.digest(blob), True)
        assert model_store.version_state(s, FED, 4) is None
        assert model_store.read_blob(s, FED, 4) is None


def test_a_pull_streams_the_stored_bytes_with_a_release_over_the_stored_digest(engine):
    ident, releases = Identity.generate(), model_store.ReleaseCache()
    for version in (None, 1):
        stream = model_store.open_release(snapshot(engine), ident, releases, FED, version)
        expected = 3 if version is None else version
        body = streamed(stream)
        assert body == codec.encode(weights(float(expected)))
        rel = stream.release
        assert (rel.version, rel.size, rel.digest) == (expected, len(body), codec.digest(body))
        statement = verify_release(rel.statement, rel.signature, body, ident.signing.public_key())
        with transaction(engine, read_only=True) as s:
            fed = s.get(Federation, FED)
            created = s.get(ModelVersion, (FED, expected)).created_at
        assert statement == {"kind": "model_release", "federation": "fed", "version": expected,
                             "digest": rel.digest, "size": len(body), "schema_digest": fed.schema_digest,
                             "created_at": utc_timestamp(created), "secure_aggregation": None}


def test_a_release_is_signed_once_per_version_and_digest(engine):
    ident, releases = Identity.generate(), model_store.ReleaseCache(capacity=2)
    first = model_store.open_release(snapshot(engine), ident, releases, FED, 2)
    first.close()
    again = model_store.open_release(snapshot(engine), ident, releases, FED, 2)
    again.close()
    assert again.release is first.release
    for v in (0, 1):  # push version 2 out of a cache of two
        model_store.open_release(snapshot(engine), ident, releases, FED, v).close()
    later = model_store.open_release(snapshot(engine), ident, releases, FED, 2)
    later.close()
    assert later.release is not first.release and later.release == first.release  # Ed25519 is deterministic


def test_a_release_signs_the_secure_aggregation_setting_in_force_and_the_cache_keys_on_it(engine):
    from tests.coordinator.test_secagg import SETTINGS as HELPER_SETTINGS

    ident, releases = Identity.generate(), model_store.ReleaseCache()

    def statement() -> dict:
        stream = model_store.open_release(snapshot(engine), ident, releases, FED, 2)
        stream.close()
        return json.loads(stream.release.statement)

    assert statement()["secure_aggregation"] is None
    with transaction(engine) as s:
        fed = s.get(Federation, FED)
        fed.settings = {**fed.settings, "strategy": "fedbuff", "secure_aggregation": HELPER_SETTINGS}
    assert statement()["secure_aggregation"] == HELPER_SETTINGS  # not the cached release of "off"
    with transaction(engine) as s:
        fed = s.get(Federation, FED)
        fed.settings = {**fed.settings, "secure_aggregation": None}
    assert statement()["secure_aggregation"] is None


def test_the_served_digest_is_the_stored_one_not_a_fresh_hash(engine):
    """Pulls never re-hash an immutable version: bytes damaged in the database are sent
    under the digest recorded when the version was written, so the silo's check
    (digest and size against the signed release) refuses them."""
    ident, releases = Identity.generate(), model_store.ReleaseCache()
    good = codec.encode(weights(1.0))
    damaged = bytes([good[0] ^ 1]) + good[1:]
    with transaction(engine) as s:
        s.execute(update(ModelVersion).where(ModelVersion.version == 1).values(blob=damaged))
    stream = model_store.open_release(snapshot(engine), ident, releases, FED, 1)
    body = streamed(stream)
    assert body == damaged and stream.release.digest == codec.digest(good)
    with pytest.raises(EnvelopeError) as info:
        verify_release(stream.release.statement, stream.release.signature, body, ident.signing.public_key())
    assert info.value.reason is WireReason.DIGEST_MISMATCH
    # The operator's whole-version download re-checks the digest.
    with transaction(engine, read_only=True) as s, pytest.raises(model_store.StorageCorrupted):
        model_store.release(s, ident, releases, FED, 1)


def test_a_pull_started_before_a_prune_finishes_from_its_snapshot(engine):
    ident, releases = Identity.generate(), model_store.ReleaseCache()
    stream = model_store.open_release(snapshot(engine), ident, releases, FED, 0)
    try:
        first = stream.read()
        with transaction(engine) as s:
            pruned = model_store.prune(s, s.get(Federation, FED), retain=1, max_staleness=0, now=T0)
        assert pruned == [0, 1, 2]
        rest = b"".join(iter(stream.read, b""))
    finally:
        stream.close()
    assert first + rest == codec.encode(weights(0.0))
    # A pull that starts after the prune is refused.
    with pytest.raises(ApiError) as info:
        model_store.open_release(snapshot(engine), ident, releases, FED, 0)
    assert info.value.reason is Reason.UNKNOWN_VERSION
    with transaction(engine, read_only=True) as s:
        assert model_store.version_state(s, FED, 0) == model_store.VersionState(0, stream.release.digest, False)
        assert model_store.read_blob(s, FED, 0) is None
        assert bytes(model_store.read_blob(s, FED, 3)) == codec.encode(weights(3.0))


@pytest.mark.parametrize("version", [4, 99])
def test_a_version_that_does_not_exist_yet_is_unknown(engine, version):
    with pytest.raises(ApiError) as info:
        model_store.open_release(snapshot(engine), Identity.generate(), model_store.ReleaseCache(), FED, version)
    assert info.value.reason is Reason.UNKNOWN_VERSION


def test_prune_keeps_the_staleness_window_and_is_audited_once(engine):
    with transaction(engine) as s:
        fed = s.get(Federation, FED)
        assert model_store.prune(s, fed, retain=0, max_staleness=0, now=T0) == []  # 0 keeps everything
        assert model_store.prune(s, fed, retain=1, max_staleness=1, now=T0) == [0, 1]
        assert model_store.prune(s, fed, retain=1, max_staleness=1, now=T0) == []
    with transaction(engine, read_only=True) as s:
        assert [model_store.version_state(s, FED, v).retained for v in range(4)] == [False, False, True, True]


def test_the_weights_cache_reuses_decoded_versions_by_digest(engine):
    cache = weights_cache.ModelCache(capacity=2)
    with transaction(engine, read_only=True) as s:
        w1 = cache.weights(s, FED, 1)
        assert torch.equal(w1["a"], weights(1.0)["a"]) and (cache.hits, cache.misses) == (0, 1)
        assert cache.weights(s, FED, 1) is w1 and cache.hits == 1
        tensors, buffer = cache.checkout(s, FED, 3)  # a miss: loaded, not cached, with its buffer
        assert buffer is not None and torch.equal(tensors["b"], weights(3.0)["b"])
        assert cache.checkout(s, FED, 1) == (w1, None)
        assert cache.weights(s, FED, 9) is None


def test_a_new_version_reaches_the_weights_cache_once_committed_never_when_undone(engine):
    put: list[tuple[int, str]] = []

    def write(s):
        fed = s.get(Federation, FED)
        row, _ = model_store.write_version(s, fed, tensors=weights(9.0), parent=fed.current_version, produced_by=None,
                                           now=T0, cached=lambda v, digest, tensors: put.append((v, digest)))
        return row.version, row.digest

    with transaction(engine) as s:  # its savepoint rolls back; the transaction commits
        with pytest.raises(RuntimeError), s.begin_nested():
            write(s)
            raise RuntimeError
    with pytest.raises(RuntimeError), transaction(engine) as s:  # the whole transaction rolls back
        write(s)
        raise RuntimeError
    assert put == []
    with transaction(engine) as s:
        with s.begin_nested():
            written = write(s)
        assert put == []  # a savepoint released: nothing is durable yet
    assert put == [written] and written[0] == 4


def test_optimizer_moments_round_trip_with_their_version_and_are_pruned_with_its_weights(engine):
    like = weights(0.0)
    moments = ({n: t + 1 for n, t in like.items()}, {n: t + 2 for n, t in like.items()})
    with transaction(engine) as s:
        for v in (1, 3):
            optimizer_state.store(s, FED, v, "fedadam", moments)
    with transaction(engine, read_only=True) as s:
        m, v = optimizer_state.load(s, FED, 3, like, 1e-3)
        assert all(torch.equal(m[n], moments[0][n]) and torch.equal(v[n], moments[1][n]) for n in like)
        m, v = optimizer_state.load(s, FED, 2, like, 0.5)  # none stored: FedOpt's initial state
        assert all(torch.equal(m[n], torch.zeros_like(t)) and torch.equal(v[n], torch.full_like(t, 0.25))
                   for n, t in like.items())
    with transaction(engine) as s:
        assert model_store.prune(s, s.get(Federation, FED), retain=1, max_staleness=1, now=T0) == [0, 1]
    with transaction(engine, read_only=True) as s:
        assert s.get(OptimizerState, (FED, 1)) is None and s.get(OptimizerState, (FED, 3)) is not None
        with pytest.raises(model_store.StorageCorrupted):  # a state that does not fit the model
            optimizer_state.load(s, FED, 3, {"a": like["a"]}, 1e-3)
