"""Start-up checks, light enough for a supervisor process that never serves itself.

``serve --workers N`` checks the data directory once in the parent (readable errors,
before any worker is spawned) without importing the model-handling modules (torch,
the accountants): only the configuration, the key files and the database revision.
"""

from __future__ import annotations

import logging
from pathlib import Path

from privacy.errors import KeyFileError
from privacy.keys import Identity, ensure_private

from . import db
from .config import CONFIG_FILE, ConfigError, CoordinatorConfig

log = logging.getLogger("fedsilo.coordinator")

__all__ = ["DATA_DIR_ENV", "StartupError", "check_schema", "check_startable", "load_config", "load_identity"]

#: The data directory of the coordinator an app-factory process serves (set by ``serve``).
DATA_DIR_ENV = "FEDSILO_DATA_DIR"


class StartupError(Exception):
    """The coordinator cannot start; the message says what to do."""


def load_config(data_dir: Path | str) -> CoordinatorConfig:
    """The configuration of an initialised data directory, or StartupError."""
    data_dir = Path(data_dir)
    if not (data_dir / CONFIG_FILE).exists():
        raise StartupError(
            f"{data_dir} is not a coordinator data directory; run: fedsilo-coordinator init --data-dir {data_dir}"
        )
    # The directory holds the keys and the (SQLite) audit log, the file maybe a database
    # password: owner-only, tightened loudly if a copy or a umask loosened them.
    for path in (data_dir, data_dir / CONFIG_FILE):
        try:
            repaired = ensure_private(path)
        except KeyFileError as exc:
            raise StartupError(exc.message) from None
        if repaired:
            log.warning("%s (the coordinator's files are private to its user)", repaired)
    try:
        return CoordinatorConfig.load(data_dir)
    except ConfigError as exc:
        raise StartupError(str(exc)) from None


def load_identity(config: CoordinatorConfig) -> Identity:
    try:
        return Identity.load(config.keys_dir)
    except KeyFileError as exc:
        raise StartupError(f"cannot load the coordinator's keys: {exc.message}") from None


def check_schema(engine) -> None:
    """Refuse a database that is unreachable or not at this version's schema."""
    try:
        current, head = db.current_revision(engine), db.head_revision()
    except Exception as exc:  # driver errors: unreachable, bad credentials, ...
        raise StartupError(f"cannot reach the database: {exc}") from None
    if current != head:
        raise StartupError(
            f"the database schema is at {current!r}, this coordinator needs {head!r}; "
            "run: fedsilo-coordinator migrate --data-dir DIR"
        )


def limit_torch_threads(n: int) -> None:
    """Set torch's intra-op thread count for this serving process (0 keeps torch's default)."""
    if n > 0:
        import torch  # only serving processes pay for this import

        torch.set_num_threads(n)


def check_startable(data_dir: Path | str) -> CoordinatorConfig:
    """Everything ``serve`` needs is in place: config, keys, database at head."""
    config = load_config(data_dir)
    load_identity(config)
    engine = db.make_engine(config.database_url)
    try:
        check_schema(engine)
    finally:
        engine.dispose()
    return config
