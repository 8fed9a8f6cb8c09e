"""The coordinator's configuration: one frozen object, read once at start-up.

Sources, later ones winning: defaults below, ``DIR/coordinator.toml`` (written by
``fedsilo-coordinator init``), then environment variables ``FEDSILO_<FIELD>`` (e.g.
``FEDSILO_DATABASE_URL``) so containers and CI can override without editing files.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import tomli_w

CONFIG_FILE = "coordinator.toml"
KEYS_DIR = "keys"


class ConfigError(Exception):
    """The configuration file or a ``FEDSILO_*`` variable is invalid; the message says how."""


@dataclass(frozen=True)
class CoordinatorConfig:
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
    retain_versions: int = 0  # 0: keep every version's weights; N: keep the newest N + staleness window
    ingest_workers: int = 2  # threads for verify/decrypt/decode outside the fold lock
    fold_workers: int = 4  # threads per process that may queue for the fold lock
    max_request_bytes: int = 64 * 1024  # JSON bodies of the silo API (enrolment)
    accountant: str = "rdp"  # how the coordinator composes a silo's epsilon ("rdp" or "prv")
    # torch intra-op threads per process: updates are already processed in parallel by the
    # ingest workers, and torch's own pool only contends with them (measured 3-4x slower checks).
    torch_threads: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{Path(self.data_dir).resolve() / 'coordinator.db'}")

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / KEYS_DIR

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"

    @classmethod
    def load(cls, data_dir: Path | str, environ: dict[str, str] | None = None, **overrides) -> CoordinatorConfig:
        """Read ``data_dir/coordinator.toml`` then ``FEDSILO_*`` variables, then ``overrides``."""
        data_dir = Path(data_dir)
        environ = os.environ if environ is None else environ
        values: dict = {}
        path = data_dir / CONFIG_FILE
        if path.exists():
            try:
                values.update(tomllib.loads(path.read_text()).get("coordinator", {}))
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        known = {f.name: f for f in fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise ConfigError(f"{path}: unknown settings {sorted(unknown)}")
        for name, f in known.items():
            env = environ.get(f"FEDSILO_{name.upper()}")
            if env is not None and name != "data_dir":
                try:
                    values[name] = int(env) if f.type in ("int", int) else env
                except ValueError:
                    raise ConfigError(f"FEDSILO_{name.upper()} must be an integer, not {env!r}") from None
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
