"""The coordinator's running state, built once by the composition root.

Routes receive a :class:`Coordinator` through closures (``routes(ctx)``), never through
``app.state`` casts; services take the pieces they need (a Session, a key, the clock).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from privacy.keys import Identity

from .config import CoordinatorConfig


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Coordinator:
    config: CoordinatorConfig
    engine: Engine
    identity: Identity  # the coordinator's signing and HPKE private keys
    clock: Callable[[], datetime] = utc_now
    federation_id: int = 1
    _sessions: sessionmaker = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def open(cls, config: CoordinatorConfig, *, clock: Callable[[], datetime] = utc_now) -> Coordinator:
        from .db import make_engine  # the engine is made here, at start-up, never at import

        return cls(config, make_engine(config.database_url), Identity.load(config.keys_dir), clock)

    def session(self) -> Session:
        """A session for reads; the caller closes it (``with ctx.session() as s``)."""
        return self._sessions()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One write transaction: commits on success, rolls back on any exception."""
        with self._sessions.begin() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()
