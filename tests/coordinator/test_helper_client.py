"""The coordinator asks a real helper (subprocess, real HTTP) and verifies its signed answers."""

from __future__ import annotations

import pytest

from coordinator.helper_client import HelperError, HelperErrorReason, ask_helper, backoff, buffer_id, open_request
from privacy import secagg
from privacy.keys import Identity, b64d, signing_public_from_raw
from tests.helper.test_helper_http import (  # noqa: F401  (fixtures)
    FEDERATION, MASK, SCHEMA, SILOS, coordinator, helper, masked, silos,
)
from tests.support.coordinator import free_port


def _pinned(helper):
    return signing_public_from_raw(b64d(helper.init["helper_keys"]["signing_key"]))


def _buffer(helper, silos, n: int):
    updates, total, plain = [], None, {}
    for i, silo_id in enumerate(SILOS):
        member, share, q = masked(helper, silo_id, silos[silo_id], n)
        uid = f"{n:016x}{i:016x}"
        updates.append((uid, member, i + 1))
        total = secagg.add_weighted(total, share, i + 1)
        plain = {k: plain.get(k, 0) + (i + 1) * v for k, v in q.items()}
    return updates, total, plain


def test_the_coordinator_opens_a_buffer_and_a_retry_is_identical(helper, silos, coordinator) -> None:
    updates, total, plain = _buffer(helper, silos, 100)
    request = open_request(FEDERATION, SCHEMA, updates)
    assert request == open_request(FEDERATION, SCHEMA, updates)  # deterministic: a retry is the same bytes
    assert request.buffer_id == buffer_id(FEDERATION, [u for u, _, _ in updates])
    mask_sum = ask_helper(helper.base_url, request, SCHEMA, signer=coordinator.signing, helper_key=_pinned(helper))
    opened = secagg.open_sum(total, mask_sum, MASK.scale)
    for name, q in plain.items():
        assert (opened[name] * MASK.scale).equal(q.double())
    again = ask_helper(helper.base_url, request, SCHEMA, signer=coordinator.signing, helper_key=_pinned(helper))
    assert all(again[n].equal(mask_sum[n]) for n in mask_sum)


def test_a_refusal_carries_the_helpers_reason(helper, silos, coordinator) -> None:
    updates, _, _ = _buffer(helper, silos, 101)
    one_silo = updates[:1]
    with pytest.raises(HelperError) as err:
        ask_helper(helper.base_url, open_request(FEDERATION, SCHEMA, one_silo), SCHEMA,
                   signer=coordinator.signing, helper_key=_pinned(helper))
    assert err.value.reason is HelperErrorReason.REFUSED and err.value.helper_reason == "too_few_silos"


def test_an_answer_not_signed_by_the_pinned_helper_is_refused(helper, silos, coordinator) -> None:
    updates, _, _ = _buffer(helper, silos, 102)
    with pytest.raises(HelperError) as err:
        ask_helper(helper.base_url, open_request(FEDERATION, SCHEMA, updates), SCHEMA,
                   signer=coordinator.signing, helper_key=Identity.generate().signing.public_key())
    assert err.value.reason is HelperErrorReason.BAD_ANSWER


def test_a_helper_that_is_down_is_unavailable_and_backoff_grows_to_a_cap() -> None:
    request = open_request(FEDERATION, SCHEMA, [("0" * 32, {"statement": "a", "signature": "b"}, 1)])
    with pytest.raises(HelperError) as err:
        ask_helper(f"http://127.0.0.1:{free_port()}", request, SCHEMA, signer=Identity.generate().signing,
                   helper_key=Identity.generate().signing.public_key(), timeout=5)
    assert err.value.reason is HelperErrorReason.UNAVAILABLE
    assert [backoff(i) for i in range(4)] == [1, 2, 4, 8] and backoff(100) == 300
