"""What the demo knows of the federation: the coordinator's own figures, over its admin API.

The demo is the operator's tool, so it watches the way an operator would -- through
``/api/admin`` and ``/api/audit`` with the admin token -- and never opens the database.
Held-out accuracy is the one figure the coordinator cannot give (it never runs model
code): the demo downloads each version's weights (``GET /api/admin/versions/{v}/weights``)
and evaluates them here, on the held-out split that no silo has.

The held-out features are standardised with their own statistics, as each silo
standardises its own data with its own (the statistics never leave a silo).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from privacy import codec

from .processes import DemoError

__all__ = ["AdminClient", "Holdout", "Observer", "Snapshot", "VersionPoint"]


class AdminClient:
    """The admin and audit APIs with the operator's token (``Authorization: Bearer``)."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 30.0) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout, trust_env=False,
                                  headers={"Authorization": f"Bearer {token}"})

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, expect: int = 200, **kwargs: Any) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise DemoError(f"the coordinator stopped answering ({type(exc).__name__}: {exc}); "
                            "see logs/coordinator.log") from None
        if r.status_code != expect:
            raise DemoError(f"{method} {path} answered {r.status_code}: {r.text[:300]}")
        return r

    def _get(self, path: str, **params: Any) -> httpx.Response:
        return self._request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def create_silo(self, name: str, epsilon_cap: float, delta: float) -> dict:
        """``POST /api/admin/silos``: ``{silo_id, name, enrolment_token, expires_at}``."""
        return self._request("POST", "/api/admin/silos", expect=201,
                             json={"name": name, "epsilon_cap": epsilon_cap, "delta": delta}).json()

    def change_settings(self, settings: dict) -> dict:
        """``PATCH /api/admin/federation``: a settings change (validated as a whole, audited)."""
        return self._request("PATCH", "/api/admin/federation", json={"settings": settings}).json()

    def federation(self) -> dict:
        """``GET /api/admin/federation``: settings, current version, ``buffered_updates``."""
        return self._get("/api/admin/federation").json()

    def silos(self) -> list[dict]:
        return self._get("/api/admin/silos").json()["silos"]

    def versions(self, after: int | None = None) -> Iterator[dict]:
        """Every version after ``after``, oldest first (all pages)."""
        while True:
            page = self._get("/api/admin/versions", after=after, limit=1000).json()
            yield from page["versions"]
            if page["next_after"] is None:
                return
            after = page["next_after"]

    def weights(self, version: int) -> bytes:
        return self._get(f"/api/admin/versions/{version}/weights").content

    def update(self, update_id: str) -> dict:
        return self._get(f"/api/admin/updates/{update_id}").json()

    def updates(self) -> list[dict]:
        """Every update in the order received (all pages)."""
        out: list[dict] = []
        after = None
        while True:
            page = self._get("/api/admin/updates", after=after, limit=1000).json()
            out += page["updates"]
            if page["next_after"] is None:
                return out
            after = page["next_after"]

    def budgets(self) -> list[dict]:
        return self._get("/api/audit/budgets").json()["budgets"]

    def verify(self) -> dict:
        return self._get("/api/audit/verify").json()

    def export_audit(self, path: Path) -> int:
        """Stream ``/api/audit/export?format=jsonl`` into ``path``; returns the line count."""
        lines = 0
        try:
            with self._http.stream("GET", "/api/audit/export", params={"format": "jsonl"}) as r:
                if r.status_code != 200:
                    raise DemoError(f"GET /api/audit/export answered {r.status_code}")
                with path.open("w", encoding="utf-8") as fh:
                    for chunk in r.iter_text():
                        fh.write(chunk)
                        lines += chunk.count("\n")
        except httpx.TransportError as exc:
            raise DemoError(f"the audit export was cut off ({type(exc).__name__}: {exc})") from None
        return lines


class Holdout:
    """The held-out split and the task's model, to score any version of the global model."""

    def __init__(self, task_name: str, task_options: dict, path: Path) -> None:
        # Task code in the operator's tool, never in the serving coordinator.
        from silo_node.tabular import Standardizer
        from silo_node.tasks import get_task

        self.task = get_task(task_name, task_options)
        data = self.task.load_data(path, "target")
        scaled = Standardizer.fit(data.features).apply(data)
        self.features, self.labels = scaled.features, scaled.labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def accuracy(self, safetensors: bytes) -> float:
        model = self.task.build_model()
        model.load_state_dict(codec.decode(safetensors), strict=True)
        return float(self.task.evaluate(model, self.features, self.labels)["accuracy"])


@dataclass(frozen=True)
class VersionPoint:
    """One model version: when the coordinator made it, its accuracy, whose update made it."""

    version: int
    created_at: datetime
    accuracy: float | None  # None if its weights were pruned before the demo could score them
    update_id: str | None
    silo_id: str | None


@dataclass
class Snapshot:
    """The federation as last observed."""

    silos: list[dict] = field(default_factory=list)
    points: list[VersionPoint] = field(default_factory=list)
    updates: list[dict] = field(default_factory=list)  # every update, in the order received

    @property
    def current(self) -> VersionPoint | None:
        return self.points[-1] if self.points else None

    @property
    def accepted(self) -> int:
        return sum(int(s["updates_accepted"]) for s in self.silos)

    @property
    def rejected(self) -> int:
        return sum(int(s["updates_rejected"]) for s in self.silos)

    def silo(self, silo_id: str) -> dict | None:
        return next((s for s in self.silos if s["silo_id"] == silo_id), None)

    def seconds_per_update(self, silo_id: str) -> float | None:
        """The silo's measured pace: mean seconds between its updates reaching the coordinator."""
        times = sorted(_time(u["received_at"]) for u in self.updates if u["silo_id"] == silo_id)
        if len(times) < 2:
            return None
        return (times[-1] - times[0]).total_seconds() / (len(times) - 1)


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class Observer:
    """Polls the coordinator and scores every new version on the holdout."""

    def __init__(self, admin: AdminClient, holdout: Holdout) -> None:
        self.admin = admin
        self.holdout = holdout
        self.snapshot = Snapshot()
        self._update_silo: dict[str, str] = {}

    def poll(self) -> Snapshot:
        """Fetch silos, updates and any versions made since the last poll (scoring each)."""
        self.snapshot.updates = self.admin.updates()
        self._update_silo.update((u["update_id"], u["silo_id"]) for u in self.snapshot.updates)
        after = self.snapshot.current.version if self.snapshot.current else None
        for v in self.admin.versions(after=after):
            self.snapshot.points.append(self._point(v))
        self.snapshot.silos = self.admin.silos()
        return self.snapshot

    def _point(self, v: dict) -> VersionPoint:
        update_id = v.get("produced_by_update")
        silo_id = None
        if update_id:
            if update_id not in self._update_silo:  # folded after the updates listing was read
                self._update_silo[update_id] = self.admin.update(update_id)["silo_id"]
            silo_id = self._update_silo[update_id]
        accuracy = self.holdout.accuracy(self.admin.weights(v["version"])) if v.get("retained", True) else None
        return VersionPoint(int(v["version"]), _time(v["created_at"]), accuracy, update_id, silo_id)
