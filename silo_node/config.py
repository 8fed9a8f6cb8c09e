"""The silo's configuration: one frozen object, written by ``init``, read once at start-up.

It lives in ``DATA_DIR/silo.toml`` beside the silo's keys (``DATA_DIR/keys``) and its
ledger (``DATA_DIR/ledger.db``). Two kinds of setting live there:

- **Pinned at enrolment** (:class:`Enrolment`): the silo id, the coordinator's public
  keys, the federation's task and model schema, the privacy budget the operator granted.
  They come from the coordinator once, over HTTPS, and are compared out of band by
  fingerprint; no environment variable can change them (a variable that could swap the
  coordinator's key would undo the pinning).
- **Operational**: where the coordinator and the data are, a lower local budget cap,
  training options, the training window, the pause between rounds, proxy and CA
  bundle. Each can be overridden by ``FEDSILO_SILO_<NAME>`` (e.g.
  ``FEDSILO_SILO_WINDOW=22:00-06:00``, ``FEDSILO_SILO_CA_BUNDLE=/etc/ssl/corp.pem``) and
  by ``fedsilo-silo run`` options for one run.

A misspelt ``FEDSILO_SILO_*`` variable is refused rather than ignored: a silo left
running for months should not silently train with settings nobody chose.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import time
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tomli_w

from privacy.accounting import MIN_NOISE_MULTIPLIER
from privacy.errors import PrivacyError, ReasonedError
from privacy.keys import PublicIdentity, b64d, ensure_private, fingerprint, make_private_dir, write_private

from .secagg import HelperPin, SecaggError

log = logging.getLogger("fedsilo.silo")

__all__ = [
    "CONFIG_FILE",
    "ENV_PREFIX",
    "KEYS_DIR",
    "LEDGER_FILE",
    "ConfigError",
    "ConfigReason",
    "Enrolment",
    "NetworkOptions",
    "Schedule",
    "SiloConfig",
    "TrainingOptions",
    "TrainingWindow",
    "check_coordinator_url",
]

CONFIG_FILE = "silo.toml"
KEYS_DIR = "keys"
LEDGER_FILE = "ledger.db"
LOCK_FILE = "run.lock"
ENV_PREFIX = "FEDSILO_SILO_"
#: Variables under ENV_PREFIX that are not settings (read by the CLI itself).
_ENV_NOT_SETTINGS = {"DATA_DIR"}


class ConfigReason(StrEnum):
    """Stable reason codes of :class:`ConfigError`."""

    NOT_INITIALISED = "not_initialised"
    ALREADY_INITIALISED = "already_initialised"
    INVALID = "invalid"
    UNKNOWN_SETTING = "unknown_setting"
    PINNED_SETTING = "pinned_setting"


class ConfigError(ReasonedError):
    """The configuration is missing or holds a value that cannot be used."""

    reasons = ConfigReason
    reason: ConfigReason


# --------------------------------------------------------------------------- pieces


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(ConfigReason.INVALID, message)


def _positive(name: str, value: float, *, integer: bool = False, zero: bool = False) -> None:
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    _check(ok and (value >= 0 if zero else value > 0), f"{name} must be a {'whole ' if integer else ''}number "
           f"{'>= 0' if zero else '> 0'}, not {value!r}")


_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True)
class TrainingWindow:
    """Hours of the day (the silo machine's local time) in which a round may start.

    ``"22:00-06:00"`` wraps midnight; an empty string means any time. A round that
    starts inside the window finishes even if the window closes meanwhile.
    """

    start: time | None = None
    end: time | None = None

    @classmethod
    def parse(cls, text: str) -> TrainingWindow:
        if not text or not text.strip():
            return cls()
        m = _WINDOW.match(text)
        if not m:
            raise ConfigError(ConfigReason.INVALID, f"training window {text!r} is not like 22:00-06:00")
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        if not (h1 < 24 and h2 <= 24 and m1 < 60 and m2 < 60) or (h2 == 24 and m2 != 0):
            raise ConfigError(ConfigReason.INVALID, f"training window {text!r} holds an impossible time")
        start = time(h1, m1)
        end = time(0, 0) if h2 == 24 else time(h2, m2)
        if start == end:
            raise ConfigError(ConfigReason.INVALID, f"training window {text!r} is empty; leave it unset to train any time")
        return cls(start, end)

    @property
    def always(self) -> bool:
        return self.start is None

    def contains(self, moment: time) -> bool:
        if self.start is None or self.end is None:
            return True
        t = moment.replace(tzinfo=None)
        if self.start < self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end  # wraps midnight

    def seconds_until_open(self, moment: time) -> float:
        """0 inside the window, else the seconds until it next opens."""
        if self.contains(moment) or self.start is None:
            return 0.0
        now_s = moment.hour * 3600 + moment.minute * 60 + moment.second + moment.microsecond / 1e6
        start_s = self.start.hour * 3600 + self.start.minute * 60
        return (start_s - now_s) % 86400

    def __str__(self) -> str:
        if self.start is None or self.end is None:
            return ""
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


#: The silo's ``compression`` setting -> the payload kind it sends (privacy/compression.py).
COMPRESSION_KINDS = {"none": "delta", "int8": "delta_int8", "topk": "delta_topk"}


@dataclass(frozen=True)
class TrainingOptions:
    """One local round: DP-SGD settings and the per-round privacy target."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    max_grad_norm: float = 1.0  # per-sample clipping norm C
    proximal_rho: float = 0.0  # FedProx (rho/2)||w - w_base||^2; 0 = off
    round_epsilon: float = 1.0  # epsilon one round may add, at most
    # A fixed noise multiplier for every round instead of planning it from round_epsilon
    # (0 = plan): a federation's policy may name sigma; the cap still stops the silo.
    noise_multiplier: float = 0.0
    min_round_epsilon: float = 0.1  # below this remaining budget a round is not worth its noise
    val_fraction: float = 0.2  # local validation split, evaluated on each received model
    split_seed: int = 0  # fixed per silo at init so the validation rows never change
    seed: int | None = None  # training noise/sampling seed; None = fresh randomness (production)
    threads: int = 0  # torch CPU threads for training; 0 = torch's default (all cores)
    compression: str = "none"  # none | int8 | topk: must be the federation's (docs/silo.md)
    topk_fraction: float = 0.1  # top-k keeps this share of each tensor's entries

    def __post_init__(self) -> None:
        _positive("epochs", self.epochs, integer=True)
        _positive("batch_size", self.batch_size, integer=True)
        _positive("lr", self.lr)
        _positive("max_grad_norm", self.max_grad_norm)
        _positive("proximal_rho", self.proximal_rho, zero=True)
        _positive("round_epsilon", self.round_epsilon)
        _positive("min_round_epsilon", self.min_round_epsilon)
        _check(isinstance(self.noise_multiplier, int | float) and not isinstance(self.noise_multiplier, bool)
               and (self.noise_multiplier == 0 or MIN_NOISE_MULTIPLIER <= self.noise_multiplier < math.inf),
               f"noise_multiplier must be 0 (plan it from round_epsilon) or a finite number >= "
               f"{MIN_NOISE_MULTIPLIER}, not {self.noise_multiplier!r}")
        _check(self.min_round_epsilon <= self.round_epsilon,
               f"min_round_epsilon ({self.min_round_epsilon}) must not exceed round_epsilon ({self.round_epsilon})")
        _check(isinstance(self.val_fraction, int | float) and 0 <= self.val_fraction < 1,
               f"val_fraction must be in [0, 1), not {self.val_fraction!r}")
        _check(isinstance(self.split_seed, int), f"split_seed must be an integer, not {self.split_seed!r}")
        _check(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, not {self.seed!r}")
        _positive("threads", self.threads, integer=True, zero=True)
        _check(self.compression in COMPRESSION_KINDS,
               f"compression must be one of {', '.join(COMPRESSION_KINDS)}, not {self.compression!r}")
        _check(isinstance(self.topk_fraction, int | float) and 0 < self.topk_fraction <= 1,
               f"topk_fraction must be in (0, 1], not {self.topk_fraction!r}")


@dataclass(frozen=True)
class Schedule:
    """When rounds may start and how long to rest between them."""

    window: str = ""  # e.g. "22:00-06:00"; "" = any time
    pause_seconds: float = 60.0
    jitter_seconds: float = 30.0  # uniform extra pause, so silos do not stampede the coordinator
    # The longest wait a coordinator's signed pacing hint may impose before we pull again.
    max_pacing_wait_seconds: float = 3600.0

    def __post_init__(self) -> None:
        TrainingWindow.parse(self.window)  # validate now, not at 22:00
        _positive("pause_seconds", self.pause_seconds, zero=True)
        _positive("jitter_seconds", self.jitter_seconds, zero=True)
        _positive("max_pacing_wait_seconds", self.max_pacing_wait_seconds, zero=True)

    @property
    def training_window(self) -> TrainingWindow:
        return TrainingWindow.parse(self.window)


@dataclass(frozen=True)
class NetworkOptions:
    """Outbound HTTPS: proxy, CA bundle, timeouts and the retry bound."""

    ca_bundle: str = ""  # PEM file of CAs to trust instead of the system's (corporate TLS inspection)
    proxy: str = ""  # explicit proxy URL; "" = HTTPS_PROXY/NO_PROXY from the environment
    client_cert: str = ""  # PEM certificate (and key, unless client_key) when the coordinator wants mutual TLS
    client_key: str = ""
    allow_insecure_http: bool = False  # plain http:// to a non-loopback coordinator (never in production)
    timeout_seconds: float = 60.0
    max_attempts: int = 8  # per request, first try included
    max_retry_seconds: float = 900.0  # give up on one request after this long
    # Refusals of our updates without the coordinator's signature (a proxy's 4xx, say), in
    # a row, before the daemon stops (exit 5): each one still costs budget.
    max_unsigned_refusals: int = 3

    def __post_init__(self) -> None:
        _positive("timeout_seconds", self.timeout_seconds)
        _positive("max_unsigned_refusals", self.max_unsigned_refusals, integer=True)
        _positive("max_attempts", self.max_attempts, integer=True)
        _positive("max_retry_seconds", self.max_retry_seconds, zero=True)
        if self.ca_bundle:
            _check(Path(self.ca_bundle).is_file(), f"CA bundle {self.ca_bundle} is not a readable file")
        for what, path in (("client certificate", self.client_cert), ("client key", self.client_key)):
            _check(not path or Path(path).is_file(), f"{what} {path} is not a readable file")
        _check(not self.client_key or bool(self.client_cert), "client_key needs client_cert")
        _check(isinstance(self.allow_insecure_http, bool), "allow_insecure_http must be true or false")


def check_coordinator_url(url: str, allow_insecure_http: bool = False) -> None:
    """Refuse a coordinator URL that would send tokens and signed requests in clear text.

    ``https://`` always passes; ``http://`` only to a loopback address (tests, a
    local proxy) unless ``allow_insecure_http`` says otherwise.
    """
    _check(url.startswith(("https://", "http://")), f"coordinator URL {url!r} must start with https://")
    if url.startswith("https://") or allow_insecure_http:
        return
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    _check(loopback, f"coordinator URL {url!r} is plain HTTP to another machine: the enrolment token and every "
                     "request would cross the network unencrypted; use https:// (or, for a test network only, "
                     "--allow-insecure-http / allow_insecure_http = true in [network])")


@dataclass(frozen=True)
class Enrolment:
    """What the coordinator told the silo at enrolment; pinned, never overridden."""

    silo_id: str
    name: str
    federation: str
    coordinator_signing_key: str  # base64url raw Ed25519 public key
    coordinator_hpke_key: str  # base64url raw X25519 public key
    task_name: str
    task_options: dict
    schema: list  # [{name, shape, dtype}, ...]
    schema_digest: str
    epsilon_cap: float
    delta: float
    accountant: str = "rdp"
    # The federation's secure_aggregation at enrolment, as the coordinator signed it (None:
    # off). Informational: each round follows the value in its signed model release.
    secure_aggregation: dict | None = None

    def __post_init__(self) -> None:
        _check(bool(self.silo_id), "silo id is empty")
        _positive("epsilon_cap", self.epsilon_cap)
        _check(isinstance(self.delta, int | float) and 0 < self.delta < 1, f"delta must be in (0, 1), not {self.delta!r}")
        try:
            self.coordinator_keys  # both keys parse, or the file was damaged
        except (PrivacyError, ValueError) as exc:
            raise ConfigError(ConfigReason.INVALID, f"pinned coordinator keys are unreadable: {exc}") from None

    @property
    def coordinator_keys(self) -> PublicIdentity:
        return PublicIdentity(b64d(self.coordinator_signing_key), b64d(self.coordinator_hpke_key))

    def fingerprints(self) -> dict[str, str]:
        return {
            "signing": fingerprint(b64d(self.coordinator_signing_key)),
            "hpke": fingerprint(b64d(self.coordinator_hpke_key)),
        }


# --------------------------------------------------------------------------- the config

# Operational settings that FEDSILO_SILO_<NAME> may override: name -> (section, type).
_TOP_LEVEL = {"coordinator_url": str, "data_path": str, "target": str, "local_epsilon_cap": float}
_SECTIONS: dict[str, type] = {"training": TrainingOptions, "schedule": Schedule, "network": NetworkOptions}


@dataclass(frozen=True)
class SiloConfig:
    """Everything a silo needs to run; see the module docstring for what may change."""

    data_dir: Path
    coordinator_url: str
    enrolment: Enrolment
    data_path: str = ""  # "" = the task's bundled data set (bundled tasks only)
    target: str = "target"
    label: str = ""  # local display name; "" = the name the operator gave at enrolment
    local_epsilon_cap: float | None = None  # the institution's own, lower cap
    allowed_tasks: tuple[str, ...] = ()  # custom task import paths this silo may load
    training: TrainingOptions = field(default_factory=TrainingOptions)
    schedule: Schedule = field(default_factory=Schedule)
    network: NetworkOptions = field(default_factory=NetworkOptions)
    helper: HelperPin | None = None  # the helper aggregator this silo enrolled with (secure aggregation)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "allowed_tasks", tuple(self.allowed_tasks))
        check_coordinator_url(self.coordinator_url, self.network.allow_insecure_http)
        if self.local_epsilon_cap is not None:
            _positive("local_epsilon_cap", self.local_epsilon_cap)

    # -- derived --

    @property
    def epsilon_cap(self) -> float:
        """The cap this silo plans against: the federation's, or the lower local one."""
        cap = self.enrolment.epsilon_cap
        return cap if self.local_epsilon_cap is None else min(cap, self.local_epsilon_cap)

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / KEYS_DIR

    @property
    def ledger_path(self) -> Path:
        return self.data_dir / LEDGER_FILE

    @property
    def lock_path(self) -> Path:
        return self.data_dir / LOCK_FILE

    @property
    def data_source(self) -> str | None:
        return self.data_path or None

    def with_(self, **changes: Any) -> SiloConfig:
        """A copy with top-level fields changed (use ``training=replace(...)`` for sections)."""
        return replace(self, **changes)

    def with_overrides(self, overrides: Mapping[str, Any]) -> SiloConfig:
        """A copy with operational settings changed by flat name (``lr``, ``window`` ...).

        ``None`` values are ignored, so CLI options that were not given change nothing.
        """
        top: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
        for name, value in overrides.items():
            if value is None:
                continue
            where = _setting_section(name)
            if where is None:
                top[name] = value
            else:
                sections[where][name] = value
        changed = {s: replace(getattr(self, s), **v) for s, v in sections.items() if v}
        return replace(self, **top, **changed)

    # -- files --

    @classmethod
    def exists(cls, data_dir: Path | str) -> bool:
        return (Path(data_dir) / CONFIG_FILE).is_file()

    @classmethod
    def load(cls, data_dir: Path | str, environ: Mapping[str, str] | None = None) -> SiloConfig:
        """Read ``data_dir/silo.toml``, then apply ``FEDSILO_SILO_*`` overrides."""
        data_dir = Path(data_dir)
        path = data_dir / CONFIG_FILE
        _repair_permissions(data_dir, path)
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                ConfigReason.NOT_INITIALISED,
                f"{data_dir} holds no silo configuration ({CONFIG_FILE}); run `fedsilo-silo init` first",
            ) from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(ConfigReason.INVALID, f"{path} cannot be read: {exc}") from None
        config = cls._from_document(data_dir, doc, path)
        env = os.environ if environ is None else environ
        return config.with_overrides(_env_overrides(env))

    @classmethod
    def _from_document(cls, data_dir: Path, doc: dict, path: Path) -> SiloConfig:
        try:
            silo = dict(doc["silo"])
            pinned = dict(doc["enrolment"])
            written = pinned.pop("fingerprints", None)
            enrolment = Enrolment(**pinned)
            sections = {
                name: kind(**doc.get(name, {})) for name, kind in _SECTIONS.items()
            }
            config = cls(
                data_dir=data_dir,
                coordinator_url=silo.pop("coordinator_url"),
                enrolment=enrolment,
                helper=_helper_pin(doc, path),
                **silo,
                **sections,
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(ConfigReason.INVALID, f"{path} is incomplete or has an unknown setting: {exc}") from None
        if written is not None and written != enrolment.fingerprints():
            # The keys or the fingerprints were edited by hand: trust neither.
            raise ConfigError(
                ConfigReason.INVALID,
                f"{path}: the pinned coordinator keys do not match the fingerprints beside them",
            )
        return config

    def to_document(self) -> dict:
        """The TOML document (None values are omitted: TOML has no null)."""

        def clean(obj: dict) -> dict:
            return {k: v for k, v in obj.items() if v is not None}

        silo = clean({
            "coordinator_url": self.coordinator_url,
            "data_path": self.data_path,
            "target": self.target,
            "label": self.label,
            "local_epsilon_cap": self.local_epsilon_cap,
            "allowed_tasks": list(self.allowed_tasks),
        })
        doc = {"silo": silo, "enrolment": clean(asdict(self.enrolment))}
        doc["enrolment"]["fingerprints"] = self.enrolment.fingerprints()
        for name in _SECTIONS:
            doc[name] = clean(asdict(getattr(self, name)))
        if self.helper is not None:
            doc["helper"] = {**asdict(self.helper), "fingerprints": self.helper.fingerprints()}
        return doc

    def save(self) -> Path:
        """Write ``silo.toml`` atomically (a crash never leaves half a file), 0600 in a 0700 directory."""
        prepare_data_dir(self.data_dir)
        doc = self.to_document()
        text = (
            "# fedsilo silo configuration, written by `fedsilo-silo init`.\n"
            "# [enrolment] is pinned: compare the coordinator fingerprints out of band;\n"
            "# do not edit it. Other sections may be edited, or overridden with\n"
            "# FEDSILO_SILO_<NAME> environment variables (see docs/silo.md).\n\n"
            + tomli_w.dumps(doc)
        )
        path = self.data_dir / CONFIG_FILE
        write_private(path, text.encode("utf-8"))
        return path


def _helper_pin(doc: dict, path: Path) -> HelperPin | None:
    """``[helper]``: the pinned helper aggregator (absent: not enrolled with one)."""
    if "helper" not in doc:
        return None
    pinned = dict(doc["helper"])
    written = pinned.pop("fingerprints", None)
    try:
        pin = HelperPin(**pinned)
    except SecaggError as exc:
        raise ConfigError(ConfigReason.INVALID, f"{path} [helper]: {exc.message}") from None
    if written != pin.fingerprints():
        raise ConfigError(ConfigReason.INVALID,
                          f"{path}: the pinned helper keys do not match the fingerprints beside them")
    return pin


def read_helper_pin(data_dir: Path | str) -> HelperPin | None:
    """The ``[helper]`` pin as silo.toml holds it now: the daemon reads it again before each
    masked round, so `fedsilo-silo helper-enrol` takes effect without a restart."""
    return SiloConfig.load(data_dir, environ={}).helper


def prepare_data_dir(data_dir: Path) -> Path:
    """Create the data dir 0700 if needed, or tighten it (loudly) if it is looser."""
    _repair_permissions(make_private_dir(data_dir))
    return Path(data_dir)


def _repair_permissions(*paths: Path) -> None:
    """The data dir (keys, ledger) and silo.toml (it may hold a proxy password) are the
    silo's alone: tighten them if a copy or a umask loosened them, and say so."""
    for path in paths:
        repaired = ensure_private(path)
        if repaired:
            log.warning("%s (the silo's files are private to its user)", repaired)


def _setting_section(name: str) -> str | None:
    """The section holding operational setting ``name`` (None = top level)."""
    if name in _TOP_LEVEL:
        return None
    for section, kind in _SECTIONS.items():
        if name in {f.name for f in fields(kind)}:
            return section
    pinned = {f.name for f in fields(Enrolment)}
    if name in pinned:
        raise ConfigError(
            ConfigReason.PINNED_SETTING,
            f"{name} was fixed at enrolment and cannot be overridden; ask the coordinator's operator",
        )
    raise ConfigError(ConfigReason.UNKNOWN_SETTING, f"unknown setting {name!r}")


def _setting_type(name: str) -> type:
    section = _setting_section(name)
    if section is None:
        return _TOP_LEVEL[name]
    kind = {f.name: f.type for f in fields(_SECTIONS[section])}[name]
    # Field annotations are strings (from __future__ import annotations).
    return {"int": int, "float": float, "str": str, "int | None": int, "bool": _boolean}.get(str(kind), str)


def _boolean(text: str) -> bool:
    """An environment variable's true/false (1/0, yes/no)."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.strip().lower())
    if value is None:
        raise ValueError(text)
    return value


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``FEDSILO_SILO_<NAME>`` variables as typed settings; unknown names are refused."""
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        suffix = key[len(ENV_PREFIX):]
        if suffix in _ENV_NOT_SETTINGS:
            continue
        name = suffix.lower()
        try:
            kind = _setting_type(name)
        except ConfigError as exc:
            raise ConfigError(exc.reason, f"environment variable {key}: {exc.message}") from None
        try:
            out[name] = kind(raw) if kind is not str else raw
        except ValueError:
            raise ConfigError(ConfigReason.INVALID, f"environment variable {key}={raw!r} is not a "
                                                    f"{kind.__name__.strip('_')}") from None
    return out
