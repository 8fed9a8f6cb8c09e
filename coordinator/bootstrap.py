"""``fedsilo-coordinator init``: a new coordinator, from nothing to ready to serve.

In order, refusing before it writes anything it cannot finish:

1. build the task's model (the only time the coordinator imports task code) and
   validate the strategy settings;
2. migrate the database (any SQLAlchemy URL; default SQLite in the data directory)
   and check that it holds no federation yet;
3. generate the coordinator's Ed25519 and X25519 keys (files 0600 in ``DIR/keys``);
4. in one transaction: the audit entry for the keys, the federation row and model
   version 0 (audited), the first admin token (audited, stored hashed);
5. write ``DIR/coordinator.toml`` last -- its presence means "initialised".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import make_url

from privacy.keys import Identity
from privacy.secagg import UnsafeSettings

from . import audit, db, federation, secagg, tokens
from .config import CONFIG_FILE, ConfigError, CoordinatorConfig
from .models import Federation
from .strategies import StrategyError, StrategySettings

__all__ = ["ACTION_COORDINATOR_INITIALIZED", "InitError", "InitResult", "default_configuration", "initialize"]

ACTION_COORDINATOR_INITIALIZED = "coordinator_initialized"
ADMIN_TOKEN_NAME = "admin"


class InitError(Exception):
    """``init`` cannot proceed; the message says why and what to do."""


@dataclass(frozen=True)
class InitResult:
    """What ``init`` made; ``admin_token`` is shown once and stored only hashed."""

    config: CoordinatorConfig
    admin_token: str
    fingerprints: dict[str, str]
    task: dict[str, Any]
    model_digest: str
    parameters: int

    def to_json(self) -> dict[str, Any]:
        base = self.config.base_url.rstrip("/")
        return {
            "admin_token": self.admin_token,
            "base_url": base,
            "api": {
                "silo": f"{base}/api/v1",
                "admin": f"{base}/api/admin",
                "audit": f"{base}/api/audit",
                "healthz": f"{base}/healthz",
                "metrics": f"{base}/metrics",
                "openapi": f"{base}/openapi.json",
            },
            "fingerprints": self.fingerprints,
            "data_dir": str(self.config.data_dir.resolve()),
            "database_url": make_url(self.config.database_url).render_as_string(hide_password=True),
            "federation": self.config.federation_name,
            "task": self.task,
            "current_version": 0,
            "model_digest": self.model_digest,
            "parameters": self.parameters,
        }


def _model_weights(task: str, options: Mapping[str, Any]) -> tuple[dict[str, Any], dict]:
    # Imported here: serving never needs task code, and must not load it.
    from silo_node.tabular import TaskError
    from silo_node.tasks import get_task, task_spec

    try:
        t = get_task(task, options)
        model = t.build_model()
    except TaskError as exc:
        raise InitError(str(exc)) from None  # its message names the task
    weights = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
    return task_spec(t), weights


#: The staleness bound of the default configuration: with CA2FL a slow silo's one
#: accepted update keeps counting in every step, so refusing it costs more than with a
#: plain buffer; at 200 simulated silos 64 against 16 cut stale refusals from 51% to 8%
#: and raised the final accuracy from 0.88-0.92 to 0.94-0.96 (docs/benchmarks.md §8).
DEFAULT_CA2FL_MAX_STALENESS = 64

#: The server step's damping in the default configuration. CA2FL re-applies each silo's
#: latest (DP-noised) update in every step until its next one, so a full step re-applies
#: its noise too: under DP (noise 1.0) a full step levelled off about three points below
#: synchronous FedAvg (0.836 against 0.869, 300 s) while half a step reached the race's
#: target; at the smallest noise (0.1) the full step was the faster. ``noise`` scales
#: ``server_lr`` (1.0) by ``1 / (1 + sigma ** 2)`` over the step's updates
#: (strategies.noise_gain): half a step at noise 1.0, 0.99 of one at 0.1
#: (docs/benchmarks.md §9).
DEFAULT_CA2FL_STEP_DAMPING = "noise"

#: Budget fairness in the default configuration (coordinator/pacing.py): pacing holds a
#: silo whose spent epsilon is more than 1.5x the median silo's. Unheld, the fastest
#: silos ran up to 2.5x synchronous FedAvg's rounds by the target; in the race (ten
#: runs, five seeds, both modes) the largest per-silo epsilon at the target fell 5-45%
#: and issue 14's goal held in nine runs instead of seven, at a time to target from 15%
#: shorter to 19% longer (docs/benchmarks.md §9).
DEFAULT_EPSILON_LEAD = 1.5


def default_configuration(settings: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The strategy and settings ``fedsilo-coordinator init`` sets up when no strategy is
    named: FedBuff (K=5) with CA2FL's cached-update calibration, a staleness bound of
    :data:`DEFAULT_CA2FL_MAX_STALENESS` and a server step damped by the updates' DP noise
    (:data:`DEFAULT_CA2FL_STEP_DAMPING`), paced so that no silo's spent epsilon runs
    ahead of the median silo's by more than :data:`DEFAULT_EPSILON_LEAD`, chosen by the
    race of docs/benchmarks.md §9. The
    operator's own ``settings`` win; with secure aggregation (which never shows the
    coordinator a silo's own update) plain FedBuff."""
    out = dict(settings)
    if "secure_aggregation" not in out and out.setdefault("calibration", "ca2fl") == "ca2fl":
        out.setdefault("max_staleness", DEFAULT_CA2FL_MAX_STALENESS)
        out.setdefault("step_damping", DEFAULT_CA2FL_STEP_DAMPING)
        out.setdefault("epsilon_lead", DEFAULT_EPSILON_LEAD)
    return "fedbuff", out


def initialize(
    data_dir: Path | str,
    *,
    task: str,
    task_options: Mapping[str, Any] | None = None,
    database_url: str | None = None,
    name: str = "fedsilo",
    strategy: str = "fedasync",
    settings: Mapping[str, Any] | None = None,
    host: str = "127.0.0.1",
    port: int = 8600,
    public_url: str = "",
    config_overrides: Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> InitResult:
    """Initialise a coordinator in ``data_dir`` (see the module docstring); raise InitError."""
    data_dir = Path(data_dir)
    now = now or datetime.now(UTC)
    if (data_dir / CONFIG_FILE).exists():
        raise InitError(f"{data_dir} is already initialised ({CONFIG_FILE} exists); "
                        "use a new --data-dir, or serve this one")
    spec, weights = _model_weights(task, task_options or {})
    try:
        strategy_settings = StrategySettings.from_dict({**(settings or {}), "strategy": strategy})
        secagg.settings_of(strategy_settings)  # the same checks as a settings change
    except StrategyError as exc:
        raise InitError(f"strategy settings: {exc.message}") from None
    except UnsafeSettings as exc:
        raise InitError(f"strategy settings: secure_aggregation: {exc}") from None

    try:
        config = CoordinatorConfig(
            data_dir=data_dir, database_url=database_url or "", federation_name=name,
            host=host, port=port, public_url=public_url, **dict(config_overrides or {}),
        )
    except ConfigError as exc:
        raise InitError(str(exc)) from None

    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        db.upgrade(config.database_url)
        _private_sqlite_file(config.database_url)
        engine = db.make_engine(config.database_url)
    except db.DatabaseError as exc:
        raise InitError(f"database: {exc.message}") from None
    except Exception as exc:  # driver errors: unreachable server, bad credentials ...
        raise InitError(f"cannot migrate the database {_safe(config.database_url)}: {exc}") from None
    try:
        with db.transaction(engine) as s:
            if s.scalar(select(Federation.name)) is not None:
                raise InitError(f"the database {_safe(config.database_url)} already holds a federation; "
                                "give init a fresh database")
        identity = Identity.generate()
        identity.save(config.keys_dir)
        public = identity.public()
        with db.transaction(engine) as s:
            audit.append(
                s, actor="system", action=ACTION_COORDINATOR_INITIALIZED, subject="coordinator",
                details={"fingerprints": public.fingerprints(), "database": make_url(config.database_url).get_backend_name(),
                         "schema_revision": db.head_revision()},
                now=now,
            )
            v0 = federation.init_federation(s, name=name, task=spec, weights=weights, settings=strategy_settings, now=now)
            token, _ = tokens.create_token(s, name=ADMIN_TOKEN_NAME, role="admin", actor="system", now=now)
            digest = v0.digest
    finally:
        engine.dispose()
    config.save()
    return InitResult(config, token, public.fingerprints(), spec, digest, sum(t.numel() for t in weights.values()))


def _private_sqlite_file(url: str) -> None:
    """The embedded database holds the audit log and hashed tokens: owner-only (SQLite
    creates its -wal and -shm files with the database file's permissions)."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        Path(u.database).chmod(0o600)


def _safe(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)
