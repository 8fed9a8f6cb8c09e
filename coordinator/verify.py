"""Verify the audit chain: the live log of a data directory, or a JSONL export of it.

Shared by ``fedsilo-coordinator verify`` and the demo's offline check; it owns nothing
but the reading (data directory -> configured database, or export file -> entries) and
hands the entries to :func:`coordinator.audit.verify`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .audit import VerifyResult

__all__ = ["VerifyError", "verify_log"]


class VerifyError(Exception):
    """The log cannot be read at all (no such export, not a data directory, bad config)."""


def _jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield {}  # verify reports it as malformed, at its position in the chain


def verify_log(*, data_dir: Path | None = None, export: Path | None = None) -> VerifyResult:
    """Verify the live log (``data_dir``) or a JSONL export; :class:`VerifyError` if unreadable."""
    from . import audit, db
    from .config import ConfigError, CoordinatorConfig

    if export is not None:
        if not export.exists():
            raise VerifyError(f"{export} does not exist")
        return audit.verify(_jsonl(export))
    if data_dir is None or not (data_dir / "coordinator.toml").exists():
        raise VerifyError(f"{data_dir} is not a coordinator data directory (no coordinator.toml)")
    try:
        config = CoordinatorConfig.load(data_dir)
    except ConfigError as exc:
        raise VerifyError(str(exc)) from None
    engine = db.make_engine(config.database_url)
    try:
        with db.transaction(engine, read_only=True) as s:
            return audit.verify(s)
    finally:
        engine.dispose()
