"""The silo's side of secure aggregation: its pin of the helper, and whether a round masks.

A federation with ``secure_aggregation = "helper"`` (docs/secure-aggregation.md) needs
every silo to send its update in shares: the coordinator's share as the payload, the
seed sealed to the helper aggregator. The silo

- enrols its existing Ed25519 key with the helper under the silo id the coordinator
  gave it (the helper's own one-time token: :func:`enrol_with_helper`) and pins the
  helper's public keys (``[helper]`` in silo.toml: :class:`HelperPin`);
- takes the setting ONLY from the coordinator's signed statements (the enrolment
  statement and each model release, never the unsigned ``GET /federation``), and for
  each round decides with :func:`masking_for`: plain, masked with the pinned helper
  key, or refused -- the helper keys the coordinator signed differ from the pinned
  ones (two independent sources disagree: stop loudly), compression is on (its
  arithmetic does not compose with masking), or the silo is not enrolled with the
  helper yet (wait: it must never fall back to a plain update).

The masking itself is :func:`privacy.masked_update.mask_for_helper`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from privacy.errors import PrivacyError, ReasonedError
from privacy.keys import PublicIdentity, b64d, fingerprint, hpke_public_from_raw, signing_public_from_raw

if TYPE_CHECKING:  # privacy.secagg loads torch: `status` and `ledger` read the pin without it
    from privacy import secagg

__all__ = ["HelperPin", "MaskPlan", "SecaggError", "SecaggReason", "masking_for", "parse_setting", "pin_helper"]

MODE_HELPER = "helper"


class SecaggReason(StrEnum):
    """Why a round cannot be sent in shares (stable codes, shown in the ledger's stops)."""

    NOT_ENROLLED = "helper_not_enrolled"  # the federation masks; this silo has no helper pin yet
    KEY_MISMATCH = "helper_key_mismatch"  # the coordinator signed other helper keys than we pinned
    COMPRESSION = "compression_with_secure_aggregation"
    BAD_SETTING = "bad_secure_aggregation_setting"  # the signed object is not one we can use
    BAD_ANSWER = "bad_helper_answer"  # the helper's enrolment answer is not what we asked for


class SecaggError(ReasonedError):
    """A round cannot be sent in shares, or the helper's enrolment answer is unusable."""

    reasons = SecaggReason
    reason: SecaggReason


@dataclass(frozen=True)
class HelperPin:
    """The helper aggregator this silo enrolled with: where, and its public keys (base64url raw).

    Written by ``fedsilo-silo helper-enrol`` (``[helper]`` in silo.toml, with the
    fingerprints beside the keys, as for the coordinator's).
    """

    url: str
    signing_key: str  # Ed25519: signs the helper's answers
    hpke_key: str  # X25519: the silo seals each update's seed to it

    def __post_init__(self) -> None:
        try:
            self.keys  # both parse, or the file was damaged
        except (PrivacyError, ValueError) as exc:
            raise SecaggError(SecaggReason.BAD_ANSWER, f"the pinned helper keys are unreadable: {exc}") from None

    @property
    def keys(self) -> PublicIdentity:
        return PublicIdentity(b64d(self.signing_key), b64d(self.hpke_key))

    def fingerprints(self) -> dict[str, str]:
        return self.keys.fingerprints()


@dataclass(frozen=True)
class MaskPlan:
    """How this round's update is masked: the federation's mask settings and the helper key."""

    settings: secagg.MaskSettings
    helper_key: X25519PublicKey

    @property
    def helper_fingerprint(self) -> str:
        """What the ledger records and the masked statement names."""
        return fingerprint(self.helper_key)


def parse_setting(value: object) -> tuple[secagg.MaskSettings, str, str] | None:
    """A signed ``secure_aggregation`` member: None (off), or (mask settings, helper
    signing key, helper HPKE key). Refuses what the silo cannot use: another mode,
    unreadable keys, mask settings that could wrap."""
    from privacy import secagg

    if value is None:
        return None
    if not isinstance(value, Mapping) or value.get("mode") != MODE_HELPER:
        raise SecaggError(SecaggReason.BAD_SETTING,
                          f"the coordinator's secure_aggregation setting is not one this silo knows: {value!r}; "
                          "upgrade fedsilo-silo")
    try:
        signing, hpke = value["helper_signing_key"], value["helper_hpke_key"]
        signing_public_from_raw(b64d(signing))
        hpke_public_from_raw(b64d(hpke))
        mask = value["mask"]
        settings = secagg.check_settings(secagg.MaskSettings(
            clip=mask["clip"], scale=mask["scale"], max_updates=mask["max_updates"], max_weight=mask["max_weight"]))
    except (KeyError, TypeError, ValueError, PrivacyError, secagg.UnsafeSettings) as exc:
        raise SecaggError(SecaggReason.BAD_SETTING,
                          f"the coordinator's secure_aggregation setting is unusable: {exc}") from None
    return settings, signing, hpke


def masking_for(setting: object, pin: HelperPin | None, *, compression: str) -> MaskPlan | None:
    """Decide this round from the release's signed ``secure_aggregation`` member.

    None: send a plain delta. A MaskPlan: mask with the pinned helper key. Raises
    SecaggError (never silently plain): ``helper_not_enrolled``, ``helper_key_mismatch``,
    ``compression_with_secure_aggregation`` or ``bad_secure_aggregation_setting``.
    """
    parsed = parse_setting(setting)
    if parsed is None:
        return None
    settings, signing, hpke = parsed
    if compression != "none":
        raise SecaggError(
            SecaggReason.COMPRESSION,
            f"the federation uses secure aggregation, and this silo's compression is {compression!r}: the two do "
            "not compose (the helper's masks are added to exact integers, a compressed update is not one). Set "
            "compression = \"none\" in [training] of silo.toml (or unset FEDSILO_SILO_COMPRESSION) and start again",
        )
    if pin is None:
        raise SecaggError(
            SecaggReason.NOT_ENROLLED,
            "the federation now uses secure aggregation, and this silo is not enrolled with its helper "
            "aggregator: nothing is sent until it is. Ask the helper's operator for a one-time token, then run "
            "`fedsilo-silo helper-enrol --helper-url URL --helper-token TOKEN` (docs/silo.md); the running daemon "
            "picks it up at its next round",
        )
    if (pin.signing_key, pin.hpke_key) != (signing, hpke):
        signed = PublicIdentity(b64d(signing), b64d(hpke)).fingerprints()
        raise SecaggError(
            SecaggReason.KEY_MISMATCH,
            f"the helper keys the coordinator signed ({signed['signing']}, {signed['hpke']}) are not the keys "
            f"this silo pinned when it enrolled with the helper at {pin.url} ({pin.fingerprints()['signing']}, "
            f"{pin.fingerprints()['hpke']}): one of them is not the federation's helper. Nothing was sent. "
            "Compare the fingerprints with the helper's operator and the coordinator's, out of band",
        )
    return MaskPlan(settings, pin.keys.hpke_key)


def pin_helper(answer: Mapping[str, Any], *, url: str, silo_id: str, expected_fingerprint: str | None = None,
               signed_setting: object = None) -> HelperPin:
    """Check the helper's ``POST /enrol`` answer and return the pin to save.

    The answer must name this silo and carry two readable keys whose stated fingerprints
    are theirs; with ``expected_fingerprint`` (the helper operator's, read out of band)
    the helper's signing key must have it; with ``signed_setting`` (the coordinator's
    signed secure_aggregation object, when the federation already has one) the keys must
    be the ones the coordinator signed.
    """
    try:
        keys = PublicIdentity.from_json(dict(answer["helper_keys"]))
        stated = dict(answer.get("helper_fingerprints") or {})
        named = answer["silo_id"]
    except (KeyError, TypeError, ValueError, PrivacyError) as exc:
        raise SecaggError(SecaggReason.BAD_ANSWER, f"the helper's enrolment answer is incomplete: {exc}") from None
    if named != silo_id:
        raise SecaggError(SecaggReason.BAD_ANSWER, f"the helper enrolled silo {named!r}, not {silo_id!r}")
    if stated and stated != keys.fingerprints():
        raise SecaggError(SecaggReason.BAD_ANSWER, "the helper's stated fingerprints do not match the keys it sent")
    if expected_fingerprint and expected_fingerprint not in keys.fingerprints().values():
        raise SecaggError(SecaggReason.KEY_MISMATCH,
                          f"the helper at {url} has signing key {keys.fingerprints()['signing']}, not "
                          f"{expected_fingerprint}; nothing was pinned")
    pin = HelperPin(url, **keys.to_json())
    masking_for(signed_setting, pin, compression="none")  # KEY_MISMATCH when the coordinator signed others
    return pin
