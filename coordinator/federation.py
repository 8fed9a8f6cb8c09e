"""The federation: its row, its settings and its creation.

A federation is created once (:func:`init_federation`) with its task, its tensor schema
(fixed for good) and model version 0; its model versions live in
:mod:`coordinator.model_store`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from privacy import codec

from . import audit
from .model_store import write_version
from .models import Federation, ModelVersion
from .strategies import StrategySettings

__all__ = [
    "ACTION_FEDERATION_CREATED",
    "current_version",
    "init_federation",
    "settings_of",
]

ACTION_FEDERATION_CREATED = "federation_created"


def current_version(session: Session, federation_id: int = 1) -> int:
    """The federation's current model version (raises if the federation does not exist)."""
    return int(session.execute(select(Federation.current_version).where(Federation.id == federation_id)).scalar_one())


def settings_of(fed: Federation) -> StrategySettings:
    """The federation's strategy settings as a validated object."""
    return StrategySettings.from_stored(fed.settings)


# --------------------------------------------------------------------------- creation


def init_federation(
    session: Session,
    *,
    name: str,
    task: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor],
    settings: StrategySettings,
    now: datetime,
    federation_id: int = 1,
    actor: str = "system",
) -> ModelVersion:
    """Create the federation row and model version 0 from ``weights``; audit both.

    ``task`` is the task spec ``{"name", "options"}`` handed to silos at enrolment.
    The schema (names, shapes, dtypes in the model's order) is fixed here for good.
    """
    schema = codec.Schema.of(weights)
    fed = Federation(
        id=federation_id,
        name=name,
        task_name=task["name"],
        task_options=dict(task.get("options") or {}),
        schema=schema.to_json(),
        schema_digest=schema.digest,
        settings=settings.to_dict(),
        current_version=0,
        created_at=now,
    )
    session.add(fed)
    session.flush()
    audit.append(
        session,
        actor=actor,
        action=ACTION_FEDERATION_CREATED,
        subject=f"federation:{federation_id}",
        details={
            "name": name,
            "task": {"name": fed.task_name, "options": fed.task_options},
            "schema_digest": schema.digest,
            "tensors": len(schema.tensors),
            "parameters": schema.numel(),
            "settings": fed.settings,
        },
        now=now,
    )
    row, _ = write_version(session, fed, tensors=dict(weights), parent=None, produced_by=None, now=now, actor=actor)
    return row
