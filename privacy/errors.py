"""The privacy library's error tree.

    PrivacyError                 root; carries a stable ``reason`` code
    ├── KeyFileError             a key file is missing, malformed or readable by others
    ├── CodecError               tensors do not decode or do not match the model schema
    ├── EnvelopeError            an envelope, statement or signed request is refused
    ├── JsonError                a JSON document is refused by the strict reader
    └── AccountingError          DP parameters are invalid or a budget cannot be met

Reason codes are part of the wire protocol (the coordinator returns them to silos):
a code is never renamed, and a retired one is never reused.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # keys
    KEY_PERMISSIONS = "key_permissions"
    KEY_MALFORMED = "key_malformed"
    KEY_EXISTS = "key_exists"
    # codec
    MALFORMED_PAYLOAD = "malformed_payload"
    SCHEMA_MISMATCH = "schema_mismatch"
    NON_FINITE = "non_finite"
    NORM_EXCEEDED = "norm_exceeded"
    # envelope and signed statements
    MALFORMED = "malformed"
    UNSUPPORTED_VERSION = "unsupported_version"
    BAD_SIGNATURE = "bad_signature"
    DECRYPT_FAILED = "decrypt_failed"
    DIGEST_MISMATCH = "digest_mismatch"
    # accounting
    INVALID_DP_PARAMETERS = "invalid_dp_parameters"
    BUDGET_EXHAUSTED = "budget_exhausted"


class ReasonedError(Exception):
    """An error that carries a stable ``reason`` code from its class's ``reasons`` enum.

    The one shape of every domain error in fedsilo (privacy, strategies, the silo's
    config, ledger, tasks, trainer): ``message`` is for people and defaults to the code
    in words; ``reason`` is for programs. Subclasses name their enum in ``reasons``.
    """

    reasons: type[StrEnum]
    reason: StrEnum

    def __init__(self, reason: StrEnum | str, message: str = "") -> None:
        self.reason = self.reasons(reason)
        self.message = message or self.reason.value.replace("_", " ")
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason.value!r}, {self.message!r})"


class PrivacyError(ReasonedError):
    """Root of every error raised by ``privacy``; ``reason`` is a stable code."""

    reasons = Reason
    reason: Reason


class KeyFileError(PrivacyError):
    """A key file cannot be used (permissions too open, wrong format)."""


class CodecError(PrivacyError):
    """Tensor bytes do not decode, or tensors do not fit the model schema.

    ``tensor`` names the offending tensor when there is one.
    """

    def __init__(self, reason: Reason | str, message: str = "", *, tensor: str | None = None):
        super().__init__(reason, message)
        self.tensor = tensor


class EnvelopeError(PrivacyError):
    """An envelope, signed statement or signed request is refused."""


class JsonError(PrivacyError):
    """A JSON document is refused by :mod:`privacy.strict_json` (reason ``malformed``)."""


class AccountingError(PrivacyError):
    """DP parameters are invalid, or no noise level fits the remaining budget."""
