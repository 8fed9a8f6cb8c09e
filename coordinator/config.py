"""The coordinator's configuration: one frozen object, read and checked once at start-up.

Sources, later ones winning: defaults below, ``DIR/coordinator.toml`` (written by
``fedsilo-coordinator init``), then environment variables ``FEDSILO_<FIELD>`` (e.g.
``FEDSILO_DATABASE_URL``) so containers and CI can override without editing files.

Every value is checked here (type, range, choice), so a typo stops the coordinator at
start-up with a message saying what to write, instead of turning every update into a
rejection later. The ``FEDSILO_`` namespace is the coordinator's: a variable in it that
names no setting is refused too (a misspelt override would otherwise be ignored), except

* ``FEDSILO_DATA_DIR`` -- the data directory of an app-factory process (set by ``serve``);
* ``FEDSILO_SILO_*`` -- the silo's own settings, checked by the silo (silo_node/config.py);
* ``FEDSILO_TEST_*`` -- test and benchmark hooks, never read by a serving coordinator;
* ``FEDSILO_ADMIN_*`` -- the admin command line's own (URL, token, token file): a client
  of the coordinator, so an operator's shell may hold them where the coordinator runs.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import tomli_w
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

CONFIG_FILE = "coordinator.toml"
KEYS_DIR = "keys"
ENV_PREFIX = "FEDSILO_"
#: Names under ENV_PREFIX that are not coordinator settings (see the module docstring).
ENV_NOT_SETTINGS = frozenset({"FEDSILO_DATA_DIR"})
ENV_FOREIGN_PREFIXES = ("FEDSILO_SILO_", "FEDSILO_TEST_", "FEDSILO_ADMIN_")
#: The accountants ``accountant`` may name: privacy.accounting.ACCOUNTANTS (a test keeps
#: them equal; not imported, so that start-up checks do not load the accounting maths).
ACCOUNTANT_CHOICES = ("rdp", "prv", "pld")


class ConfigError(Exception):
    """The configuration file or a ``FEDSILO_*`` variable is invalid; the message says how."""


@dataclass(frozen=True)
class CoordinatorConfig:
    """The coordinator's settings (docs/operations.md has the table of them all)."""

    data_dir: Path
    database_url: str = ""  # default: SQLite file in data_dir
    federation_name: str = "fedsilo"
    host: str = "127.0.0.1"
    port: int = 8600
    public_url: str = ""  # how silos reach us (behind a proxy); default http://host:port
    max_update_bytes: int = 512 * 1024 * 1024
    max_clock_skew_seconds: int = 300  # signed requests, and updates dated in the future
    max_update_age_seconds: int = 7 * 24 * 3600  # an update older than this is a replay
    enrolment_token_ttl_seconds: int = 7 * 24 * 3600
    # a fetch of the newest checkpoint issues a new one when the log grew and this passed
    checkpoint_interval_seconds: int = 10
    retain_versions: int = 0  # 0: keep every version's weights; N: keep the newest N + staleness window
    ingest_workers: int = 2  # threads for verify/decrypt/decode outside the fold lock
    fold_workers: int = 4  # threads per process that may queue for the fold lock
    max_request_bytes: int = 64 * 1024  # JSON bodies: enrolment, admin API
    accountant: str = "rdp"  # how the coordinator composes a silo's epsilon (ACCOUNTANT_CHOICES)
    # torch intra-op threads per process: updates are already processed in parallel by the
    # ingest workers, and torch's own pool only contends with them (measured 3-4x slower checks).
    torch_threads: int = 1
    # Uploads (protocol.md §5): authenticated before the body is read, then streamed.
    max_uploads_in_flight: int = 8  # per process, all silos; more -> 429 too_many_uploads
    max_uploads_per_silo: int = 2  # per process and silo
    upload_spool_bytes: int = 8 * 1024 * 1024  # an upload past this is spooled to disk
    upload_dir: str = ""  # where spooled uploads go; default DIR/uploads
    upload_read_timeout_seconds: int = 30  # longest wait for the next piece of a body
    upload_min_bytes_per_second: int = 16 * 1024  # slower bodies are cut off (408)
    header_timeout_seconds: int = 30  # a request head must arrive whole within this
    retry_after_seconds: int = 5  # Retry-After of 429 and 503 answers
    ingest_memory_bytes: int = 0  # envelope bytes checked or folding at once; 0: max_update_bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        for f in fields(self):
            if f.name != "data_dir":
                _check(f.name, getattr(self, f.name), where=f"setting {f.name}")
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{Path(self.data_dir).resolve() / 'coordinator.db'}")

    @property
    def upload_path(self) -> Path:
        return Path(self.upload_dir) if self.upload_dir else self.data_dir / "uploads"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / KEYS_DIR

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"

    @classmethod
    def load(cls, data_dir: Path | str, environ: Mapping[str, str] | None = None, **overrides) -> CoordinatorConfig:
        """Read ``data_dir/coordinator.toml`` then ``FEDSILO_*`` variables, then ``overrides``.

        Raises ConfigError naming the file or variable at fault and what to write instead.
        """
        data_dir = Path(data_dir)
        environ = os.environ if environ is None else environ
        values: dict = {}
        path = data_dir / CONFIG_FILE
        if path.exists():
            try:
                values.update(tomllib.loads(path.read_text()).get("coordinator", {}))
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        unknown = set(values) - set(_RULES)
        if unknown:
            raise ConfigError(f"{path}: unknown settings {sorted(unknown)}; the settings are {sorted(_RULES)}")
        for name, value in values.items():
            _check(name, value, where=str(path))
        values.update(_env_values(environ))
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["data_dir"] = data_dir
        return cls(**values)

    def save(self) -> Path:
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k != "data_dir"}
        path = self.data_dir / CONFIG_FILE
        # 0600: the database URL may carry a password.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(tomli_w.dumps({"coordinator": data}))
        return path

    def with_(self, **changes) -> CoordinatorConfig:
        return replace(self, **changes)


# --------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class _Rule:
    kind: type
    ok: Callable[[Any], bool]
    expect: str  # completes "NAME must be ..."
    example: str  # a value that would do


def _url(value: str) -> bool:
    if not value:
        return True  # the default: SQLite in the data directory
    try:
        return make_url(value).get_backend_name() in ("sqlite", "postgresql")
    except (ArgumentError, ValueError):
        return False


def _at_least(lo: int) -> Callable[[int], bool]:
    return lambda v: v >= lo


_RULES: dict[str, _Rule] = {
    "database_url": _Rule(str, _url, "a SQLite or PostgreSQL SQLAlchemy URL, or empty for SQLite in the data directory",
                          "postgresql+psycopg://fedsilo@db.internal/fedsilo"),
    "federation_name": _Rule(str, lambda v: bool(v.strip()), "a non-empty name", "fedsilo"),
    "host": _Rule(str, lambda v: bool(v.strip()), "an address to listen on", "127.0.0.1"),
    "port": _Rule(int, lambda v: 1 <= v <= 65535, "an integer from 1 to 65535", "8600"),
    "public_url": _Rule(str, lambda v: v == "" or v.startswith(("https://", "http://")),
                        "empty or an http(s):// URL", "https://fl.example.org"),
    "max_update_bytes": _Rule(int, _at_least(1024), "an integer number of bytes >= 1024", str(512 * 1024 * 1024)),
    "max_clock_skew_seconds": _Rule(int, _at_least(0), "an integer >= 0", "300"),
    "max_update_age_seconds": _Rule(int, _at_least(1), "an integer >= 1", str(7 * 24 * 3600)),
    "enrolment_token_ttl_seconds": _Rule(int, _at_least(1), "an integer >= 1", str(7 * 24 * 3600)),
    "checkpoint_interval_seconds": _Rule(int, _at_least(0), "an integer >= 0 (0: on every fetch after growth)",
                                         "10"),
    "retain_versions": _Rule(int, _at_least(0), "an integer >= 0 (0 keeps every version)", "0"),
    "ingest_workers": _Rule(int, _at_least(1), "an integer >= 1", "2"),
    "fold_workers": _Rule(int, _at_least(1), "an integer >= 1", "4"),
    "max_request_bytes": _Rule(int, _at_least(1024), "an integer number of bytes >= 1024", str(64 * 1024)),
    "accountant": _Rule(str, lambda v: v in ACCOUNTANT_CHOICES, f"one of {', '.join(ACCOUNTANT_CHOICES)}", "rdp"),
    "torch_threads": _Rule(int, _at_least(0), "an integer >= 0 (0 keeps torch's default)", "1"),
    "max_uploads_in_flight": _Rule(int, _at_least(1), "an integer >= 1", "8"),
    "max_uploads_per_silo": _Rule(int, _at_least(1), "an integer >= 1", "2"),
    "upload_spool_bytes": _Rule(int, _at_least(0), "an integer number of bytes >= 0", str(8 * 1024 * 1024)),
    "upload_dir": _Rule(str, lambda v: "\0" not in v, "empty or a directory path", "/var/lib/fedsilo/uploads"),
    "upload_read_timeout_seconds": _Rule(int, lambda v: 1 <= v <= 3600, "an integer from 1 to 3600", "30"),
    "upload_min_bytes_per_second": _Rule(int, _at_least(1), "an integer >= 1", str(16 * 1024)),
    "header_timeout_seconds": _Rule(int, lambda v: 1 <= v <= 3600, "an integer from 1 to 3600", "30"),
    "retry_after_seconds": _Rule(int, lambda v: 1 <= v <= 3600, "an integer from 1 to 3600", "5"),
    "ingest_memory_bytes": _Rule(int, _at_least(0), "an integer number of bytes >= 0 (0: max_update_bytes)", "0"),
}


def _check(name: str, value: Any, *, where: str) -> None:
    rule = _RULES[name]
    # bool is an int subclass, but `port = true` is a mistake, not port 1.
    typed = isinstance(value, rule.kind) and not isinstance(value, bool)
    if not (typed and rule.ok(value)):
        # A database URL may carry a password: never echo it.
        given = "the value given" if name == "database_url" else repr(value)
        raise ConfigError(f"{where}: {name} must be {rule.expect}, not {given}; "
                          f"write e.g. {_hint(name, rule, where)}")


def _hint(name: str, rule: _Rule, where: str) -> str:
    if where.startswith(ENV_PREFIX):
        return f"{env_name(name)}={rule.example}"
    return f"{name} = {rule.example}" if rule.kind is int else f'{name} = "{rule.example}"'


def env_name(setting: str) -> str:
    """The environment variable that overrides ``setting``."""
    return f"{ENV_PREFIX}{setting.upper()}"


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings ``FEDSILO_*`` variables override, typed and checked; unknown names refused."""
    by_env = {env_name(name): name for name in _RULES}
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key in ENV_NOT_SETTINGS or key.startswith(ENV_FOREIGN_PREFIXES):
            continue
        name = by_env.get(key)
        if name is None:
            close = difflib.get_close_matches(key, by_env, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"unknown environment variable {key}; {hint}unset it, or use one of "
                              f"{', '.join(sorted(by_env))} (see docs/operations.md)")
        value: Any = raw
        if _RULES[name].kind is int:
            try:
                value = int(raw)
            except ValueError:
                pass  # _check names the variable and what it must be
        _check(name, value, where=key)
        out[name] = value
    return out
