"""The coordinator's secure-aggregation rules, as pure functions the pipeline calls.

Called by coordinator.admin (settings changes), coordinator.ingest and coordinator.fold
(the masked path) and coordinator.opening (the opened sum). In the order the masked
path uses them:

- :func:`parse_settings`   the federation's ``secure_aggregation`` setting, refused when
                           it could wrap, is not FedBuff, or K_min > K
- :func:`check_masked`     ingest step 8 for ``payload_kind = "masked_delta"``: the
                           silo's statement says what its header says, for this
                           federation and helper; the payload is the schema's names and
                           shapes as int32 shares (no norm check is possible)
- :func:`check_room`       a buffer at the mask's ``max_updates`` while the other waits
                           for the helper: 503
- :func:`seal_if_ready`    a ready buffer (:func:`ready`) is sealed for the opener while
                           the next fills in the other slot
- :func:`integer_weight`   the public integer staleness weight ``w_i``
- :func:`opened_delta`     the opened buffer as FedBuff's float sum, checked (finite, norm)

Errors are the privacy library's (translated at the ingest boundary as today), IngestRejected
(``unavailable``, from :func:`check_room`), or
:class:`privacy.secagg.UnsafeSettings` for settings.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from sqlalchemy import event
from sqlalchemy.orm import Session

from privacy import codec, masked_update, secagg
from privacy.envelope import UpdateHeader
from privacy.errors import CodecError, Reason
from privacy.keys import b64d, fingerprint, hpke_public_from_raw, signing_public_from_raw

from . import buffers
from .errors import IngestRejected, Reason as WireReason
from .strategies import StrategySettings, fedbuff_weight

__all__ = ["SecaggSettings", "parse_settings", "settings_of", "ready", "check_room", "seal_if_ready", "check_masked",
           "integer_weight", "opened_delta"]

MODE_HELPER = "helper"
_URL = re.compile(r"https?://[\x21-\x7e]{1,2000}")


@dataclass(frozen=True)
class SecaggSettings:
    """``secure_aggregation = "helper"`` and what it needs: where the helper is, its pinned
    keys (base64url raw), K_min, and the mask settings."""

    helper_url: str
    helper_signing_key: str
    helper_hpke_key: str
    k_min: int
    mask: secagg.MaskSettings

    @property
    def helper_fingerprint(self) -> str:
        """The fingerprint a silo's statement must name (its seed is sealed to this key)."""
        return fingerprint(hpke_public_from_raw(b64d(self.helper_hpke_key)))


def parse_settings(obj: Mapping, *, strategy: str, buffer_k: int) -> SecaggSettings:
    """Validate a federation's secure-aggregation settings; raise UnsafeSettings.

    ``obj`` holds ``mode`` (``"helper"``), ``helper_url``, ``helper_signing_key``,
    ``helper_hpke_key``, ``k_min`` and ``mask`` (clip, scale, max_updates, max_weight).
    """
    expected = {"mode", "helper_url", "helper_signing_key", "helper_hpke_key", "k_min", "mask"}
    if not isinstance(obj, Mapping) or set(obj) != expected:
        raise secagg.UnsafeSettings(f"secure_aggregation holds exactly {sorted(expected)}")
    if obj["mode"] != MODE_HELPER:
        raise secagg.UnsafeSettings(f"secure_aggregation mode must be {MODE_HELPER!r}")
    if strategy != "fedbuff":
        raise secagg.UnsafeSettings("secure aggregation needs the fedbuff strategy (it opens buffers, not updates)")
    if not isinstance(obj["helper_url"], str) or not _URL.fullmatch(obj["helper_url"]):
        raise secagg.UnsafeSettings("helper_url must be an http(s) URL")
    try:
        signing_public_from_raw(b64d(obj["helper_signing_key"]))
        hpke_public_from_raw(b64d(obj["helper_hpke_key"]))
    except Exception:
        raise secagg.UnsafeSettings("the helper's keys must be base64url raw Ed25519 and X25519 keys") from None
    mask = obj["mask"]
    if not isinstance(mask, Mapping) or set(mask) != {"clip", "scale", "max_updates", "max_weight"}:
        raise secagg.UnsafeSettings("mask holds exactly clip, scale, max_updates and max_weight")
    settings = secagg.check_settings(secagg.MaskSettings(**mask))
    k_min = obj["k_min"]
    if not isinstance(k_min, int) or isinstance(k_min, bool) or not 2 <= k_min <= buffer_k <= settings.max_updates:
        raise secagg.UnsafeSettings(
            f"need 2 <= k_min <= buffer_k <= max_updates; have k_min={k_min!r}, buffer_k={buffer_k}, "
            f"max_updates={settings.max_updates}"
        )
    return SecaggSettings(obj["helper_url"], obj["helper_signing_key"], obj["helper_hpke_key"], k_min, settings)


def settings_of(strategy: StrategySettings) -> SecaggSettings | None:
    """The federation's secure-aggregation settings in force (None: off). Stored settings
    were checked when they were set; they are parsed again, so a bad row fails loudly."""
    if strategy.secure_aggregation is None:
        return None
    return parse_settings(strategy.secure_aggregation, strategy=strategy.strategy, buffer_k=strategy.buffer_k)


def ready(count: int, silos: int, *, buffer_k: int, settings: SecaggSettings) -> bool:
    """Whether a masked buffer is to be opened: at least K updates from at least K_min
    distinct silos (the helper refuses fewer silos: the buffer waits for more)."""
    return count >= buffer_k and silos >= settings.k_min


def check_room(count: int, *, settings: SecaggSettings) -> None:
    """Refuse a masked update the filling buffer cannot take with ``503 unavailable``
    (Retry-After), deciding nothing: it holds the most updates the mask arithmetic
    allows (``max_updates``), which happens only while the other buffer waits for the
    helper (a ready buffer is sealed at once when the other slot is free).

    A sealed buffer never grows: the helper's request names exactly its updates, and a
    sum that grew while the helper was being asked would no longer match its mask sum.
    The silo keeps the sealed update and resends it byte for byte (docs/protocol.md §5):
    nothing acknowledged is lost, and nothing is charged.
    """
    if count >= settings.mask.max_updates:
        raise IngestRejected(WireReason.UNAVAILABLE, f"the secure-aggregation buffer holds {count} update(s), "
                             f"the most its masks allow (the previous buffer still waits for the helper, or these "
                             f"updates come from fewer than k_min silos); retry after the Retry-After delay")


def seal_if_ready(session: Session, federation_id: int, *, buffer_k: int, settings: SecaggSettings,
                  arriving: str | None = None, wake: threading.Event | None = None) -> bool:
    """Seal the filling masked buffer for the opener if it is ready and no other buffer
    is sealed; return whether one was (call under the fold lock). ``arriving`` is the
    silo of an update just summed whose row is not written yet. The opener
    (coordinator.opening) asks the helper for exactly the sealed buffer's updates; it is
    woken through ``wake`` once ``session`` commits, rather than at its next look."""
    if buffers.sealed(session, federation_id) is not None:
        return False
    st = buffers.state(session, federation_id)
    silos = buffers.silos_of(session, st.updates) | ({arriving} if arriving else set())
    if not ready(st.count, len(silos), buffer_k=buffer_k, settings=settings):
        return False
    buffers.seal(session, federation_id, st)
    if wake is not None:
        event.listen(session, "after_commit", lambda _session: wake.set(), once=True)
    return True


def check_masked(
    header: UpdateHeader, payload: bytes, *, silo_key, federation: str, settings: SecaggSettings,
    schema: codec.Schema,
) -> dict[str, torch.Tensor]:
    """Ingest step 8 for a masked update; return its shares (int64 in ``[0, 2**32)``).

    Raises EnvelopeError (the statement: ``bad_signature``, ``malformed``) or CodecError
    (the payload: ``malformed_payload``, ``schema_mismatch``).
    """
    if header.masked is None:
        raise CodecError(Reason.MALFORMED_PAYLOAD, "a masked update's header carries no statement")
    statement = masked_update.verify_masked(header.masked, silo_key)
    masked_update.check_against_header(statement, header, federation=federation,
                                       helper_key=settings.helper_fingerprint)
    shares = secagg.from_wire(codec.decode(payload))
    got = {name: tuple(t.shape) for name, t in shares.items()}
    want = {spec.name: spec.shape for spec in schema.tensors}
    if got != want:
        raise CodecError(Reason.SCHEMA_MISMATCH, "the shares are not the schema's tensors and shapes")
    return shares


def integer_weight(staleness: int, max_weight: int) -> int:
    """The public integer weight: ``max(1, round(W_max / sqrt(1 + staleness)))``.

    FedBuff's staleness weight scaled to integers (the helper checks ``[1, W_max]``);
    :func:`opened_delta` divides by ``W_max`` again, so the fold sees FedBuff's sum up
    to this rounding.
    """
    return max(1, min(max_weight, round(max_weight * fedbuff_weight(staleness))))


def opened_delta(
    share_sum: Mapping[str, torch.Tensor], mask_sum: Mapping[str, torch.Tensor], settings: SecaggSettings,
    schema: codec.Schema, *, count: int, max_update_norm: float | None,
) -> dict[str, torch.Tensor]:
    """The opened buffer as FedBuff's float sum ``sum (w_i / W_max) * delta_i`` in the schema's dtypes.

    Checks the SUM, the one thing that can be checked: finite, and (when the federation
    bounds update norms) its L2 norm at most ``count * max_update_norm`` -- each of the
    ``count`` updates could have contributed up to the bound with weight at most 1.
    Raises CodecError ``non_finite`` or ``norm_exceeded``.
    """
    opened = secagg.open_sum(share_sum, mask_sum, settings.mask.scale)
    # schema dtype names are torch's own ("float32", "bfloat16", ...)
    out = {spec.name: opened[spec.name].div_(settings.mask.max_weight).to(getattr(torch, spec.dtype))
           for spec in schema.tensors}
    squares = sum(float(t.double().pow(2).sum()) for t in out.values())
    if not math.isfinite(squares):
        raise CodecError(Reason.NON_FINITE, "the opened sum is not finite")
    if max_update_norm is not None and math.sqrt(squares) > count * max_update_norm:
        raise CodecError(Reason.NORM_EXCEEDED, f"the opened sum's norm {math.sqrt(squares):.4g} exceeds "
                                                f"{count} x {max_update_norm:g}")
    return out
