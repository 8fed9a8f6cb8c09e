"""What the demo leaves behind: ``summary.json`` and ``accuracy.png``.

The summary states the demo's three claims and the evidence for each: the global
model improved on data no silo had (held-out accuracy of version 0 and of the final
version), the audit chain verifies (online and from its export), and no silo went past
its privacy cap (the coordinator's own epsilon, recomputed from each silo's accepted
history, against the cap the operator set). It also carries each silo's reconciliation of its
ledger with the audit export (``fedsilo-silo reconcile``), as a compliance officer would.
With ``--secure-aggregation`` it adds a fourth claim: every update left its silo in
shares (each ledger's ``payload_kind``), with the buffers the helper opened.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from .orchestration import DemoRun, Finale

__all__ = ["SUMMARY_FORMAT", "build_summary", "plot_accuracy", "write_summary"]

SUMMARY_FORMAT = 1
#: Relative slack when comparing epsilon with its cap (float noise of the accountant).
_CAP_RTOL = 1e-9


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _seconds(run: DemoRun, when: datetime) -> float:
    if run.training_started_at is None:
        return 0.0
    return max(0.0, (when - run.training_started_at).total_seconds())


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)


def _last_stop(ledger: list[dict]) -> dict | None:
    stops = [e for e in ledger if e.get("kind") == "stop"]
    return {"reason": stops[-1]["reason"], "detail": stops[-1]["detail"]} if stops else None


def _secure_aggregation(run: DemoRun, finale: Finale) -> dict[str, Any] | None:
    """--secure-aggregation: the helper, the buffers it opened, and the ledgers' word that
    every update left its silo in shares (``payload_kind`` ``masked_delta``)."""
    if run.helper is None:
        return None
    rows = [e for ledger in finale.ledgers.values() for e in ledger["entries"] if e.get("kind") == "update"]
    return {**run.helper.summary(), "openings": finale.helper_openings, "updates_sent": len(rows),
            "updates_in_shares": sum(e.get("payload_kind") == "masked_delta" for e in rows)}


def build_summary(run: DemoRun, finale: Finale) -> dict[str, Any]:
    """The JSON summary of a finished demo (see the module docstring)."""
    o = run.options
    points = run.snapshot.points
    first, last = points[0], points[-1]
    budgets = {b["silo_id"]: b for b in finale.budgets}
    records = {s["silo_id"]: s for s in finale.silos}
    reasons_by_silo: dict[str, Counter] = {}
    for u in finale.updates:
        if u["status"] == "rejected":
            reasons_by_silo.setdefault(u["silo_id"], Counter())[u["reason"] or "unknown"] += 1

    silos = []
    for s in run.silos:
        b, r = budgets.get(s.silo_id, {}), records.get(s.silo_id, {})
        ledger = finale.ledgers.get(s.silo_id, {"path": None, "entries": []})
        last_stop = _last_stop(ledger["entries"])
        stop_reason = s.stop_reason()
        if last_stop is not None and last_stop["reason"].startswith("budget"):
            stop_reason = "budget_spent"  # the silo's own record says so, whatever its exit looked like
        spent = b.get("epsilon_spent")
        recorded = r.get("epsilon_spent", 0.0)
        worst = max(recorded, spent if spent is not None else math.inf)
        silos.append({
            "name": s.plan.name,
            "silo_id": s.silo_id,
            "slow": s.plan.slow,
            "pace": s.plan.pace,
            "pause_seconds": s.plan.pause_seconds,
            "jitter_seconds": s.plan.jitter_seconds,
            "extra_training_seconds": s.plan.extra_training_seconds,
            "partition_rows": sum(s.label_counts.values()),
            "label_counts": {str(k): v for k, v in sorted(s.label_counts.items())},
            "train_samples": s.train_samples,  # after the silo's own validation split
            "epsilon_cap": s.plan.epsilon_cap,
            "epsilon_spent": _round(spent, 6),  # recomputed by the coordinator from the silo's whole history
            "epsilon_recorded": _round(recorded, 6),  # what it recorded at its last acceptance
            "epsilon_consistent": bool(b.get("consistent", False)),
            "within_cap": worst <= s.plan.epsilon_cap * (1 + _CAP_RTOL),
            "delta": b.get("delta"),
            "accountant": b.get("accountant"),
            "updates_accepted": int(r.get("updates_accepted", 0)),
            "updates_buffered": int(r.get("updates_buffered", 0)),
            "updates_rejected": int(r.get("updates_rejected", 0)),
            "rejections": dict(sorted(reasons_by_silo.get(s.silo_id, Counter()).items())),
            "exit_code": s.child.exit_code if s.child is not None else None,
            "stop_reason": stop_reason,
            "stopped_with": last_stop["detail"] if last_stop else (s.child.last_line() if s.child is not None else ""),
            "ledger": ledger["path"],
            "ledger_entries": len(ledger["entries"]),
            "ledger_reconciled": ledger["reconciled"],  # fedsilo-silo reconcile against the audit export
        })

    initial, final = first.accuracy, last.accuracy
    checks = {
        "accuracy_improved": initial is not None and final is not None and final > initial,
        "audit_verified": bool(finale.verify.get("ok")) and bool(finale.export_verify.get("ok")),
        "within_caps": all(s["within_cap"] for s in silos),
        "ledgers_reconciled": all(s["ledger_reconciled"]["ok"] for s in silos),
    }
    secure = _secure_aggregation(run, finale)
    if secure is not None:
        checks["updates_in_shares"] = secure["updates_in_shares"] == secure["updates_sent"]
    all_reasons = sum(reasons_by_silo.values(), Counter())
    return {
        "format": SUMMARY_FORMAT,
        "ok": all(checks.values()),
        "checks": checks,
        "task": o.task,
        "strategy": o.strategy,
        "strategy_settings": dict(o.strategy_settings),
        "seed": o.seed,
        "silo_count": o.silos,
        "training": {"epochs": o.training.epochs, "batch_size": o.training.batch_size, "lr": o.training.lr,
                     "max_grad_norm": o.training.max_grad_norm, "round_epsilon": o.training.round_epsilon,
                     "delta": silos[0]["delta"] if silos else None},
        "partition": {"kind": "dirichlet", "alpha": o.alpha, "holdout_fraction": 0.2},
        "ended_because": run.ended_because.value if run.ended_because else None,
        "updates_target": o.updates,
        "accuracy": {
            "initial": _round(initial),
            "final": _round(final),
            "initial_version": first.version,
            "final_version": last.version,
            "holdout_samples": run.holdout_samples,
            "evaluated_versions": sum(p.accuracy is not None for p in points),
        },
        "versions": {"initial": first.version, "final": last.version, "created": last.version - first.version},
        "updates": {
            "accepted": sum(s["updates_accepted"] for s in silos),
            "buffered_at_end": sum(s["updates_buffered"] for s in silos),
            "rejected": sum(s["updates_rejected"] for s in silos),
            "rejections": dict(sorted(all_reasons.items())),
        },
        "silos": silos,
        "secure_aggregation": secure,
        "audit": {
            "verify": finale.verify,
            "export": {
                "path": str(finale.export_path.relative_to(run.out)),
                "entries": finale.export_lines,
                "verify_offline": finale.export_verify,
            },
        },
        "training_started_at": run.training_started_at.isoformat() if run.training_started_at else None,
        "wall_time_seconds": round(run.elapsed(), 1),
        "training_seconds": round(run.training_seconds(), 1),
        "coordinator": {"url": run.base_url, "data_dir": "coordinator", "database_url": run.database_url},
        "timeline": [
            {"version": p.version, "seconds": round(_seconds(run, p.created_at), 2), "accuracy": _round(p.accuracy),
             "silo": run.name_of(p.silo_id), "update_id": p.update_id}
            for p in points
        ],
        "files": {
            "summary": "summary.json",
            "plot": "accuracy.png",
            "audit_export": str(finale.export_path.relative_to(run.out)),
            "ledgers": [s["ledger"] for s in silos],
            "logs": "logs/",
        },
    }


def write_summary(run: DemoRun, summary: dict[str, Any]) -> Path:
    path = run.out / "summary.json"
    path.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def plot_accuracy(run: DemoRun, finale: Finale, path: Path) -> Path:
    """Held-out accuracy against wall time (a marker per fold, coloured by silo) above
    each silo's epsilon against its cap."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    o = run.options
    colours = plt.get_cmap("tab10" if len(run.silos) <= 10 else "tab20")
    colour = {s.silo_id: colours(i % colours.N) for i, s in enumerate(run.silos)}
    label = {s.silo_id: f"{s.plan.name}: cap ε={s.plan.epsilon_cap:g}, rests {s.plan.rest} between rounds"
                        + (f", trains {s.plan.extra_training_seconds:g} s longer (slow on purpose)" if s.plan.slow else "")
             for s in run.silos}

    fig, (ax, bx) = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True, height_ratios=(3, 2),
                                 layout="constrained")
    points = [p for p in run.snapshot.points if p.accuracy is not None]
    xs = [_seconds(run, p.created_at) for p in points]
    ax.step(xs, [p.accuracy for p in points], where="post", color="0.75", linewidth=1.2, zorder=1)
    handles = []
    for x, p in zip(xs, points):
        if p.silo_id is None and p.version == 0:
            handles.insert(0, ax.scatter([x], [p.accuracy], marker="*", s=160, color="black", zorder=3,
                                         label=f"version {p.version}: the initial model"))
    opened = [(x, p.accuracy) for x, p in zip(xs, points) if p.silo_id is None and p.version > 0]
    if opened:  # secure aggregation: a version is an opened buffer sum, no one silo's update
        handles.append(ax.scatter([x for x, _ in opened], [a for _, a in opened], marker="D", s=34, color="0.2",
                                  zorder=2, label="a buffer sum the helper helped open (secure aggregation)"))
    for s in run.silos:
        mine = [(x, p.accuracy) for x, p in zip(xs, points) if p.silo_id == s.silo_id]
        handles.append(ax.scatter([x for x, _ in mine], [a for _, a in mine], s=38, color=colour[s.silo_id],
                                  edgecolor="white", linewidth=0.5, zorder=2, label=label[s.silo_id]))
    arrivals = [_seconds(run, _time(u["received_at"])) for u in finale.updates]
    folds = sorted(arrivals + [x for x, p in zip(xs, points) if p.silo_id is not None])
    if folds and folds[0] > 0:
        # Honest about the flat start: the silo processes are loading torch and Opacus and
        # training their first DP round; nothing reached the coordinator yet.
        ax.axvspan(0, folds[0], color="0.93", zorder=0)
        ax.text(folds[0] / 2, 0.04, "silos start:\nload torch + Opacus,\nfirst DP round", ha="center",
                va="bottom", fontsize=8, color="0.4")
    if points:
        last = points[-1]
        ax.annotate(f"version {last.version}: {last.accuracy:.3f}", (xs[-1], last.accuracy),
                    xytext=(-8, 10), textcoords="offset points", ha="right", fontsize=9)
    strategy = {"fedasync": "FedAsync", "fedbuff": "FedBuff"}[o.strategy]
    strategy += " + CA2FL" if o.calibration == "ca2fl" else ""
    made_by = "the silo whose update completed the buffer" if o.strategy == "fedbuff" else "the silo whose update it folded"
    secure = " + secure aggregation" if o.secure_aggregation else ""
    ax.set_title(f"fedsilo demo: {o.task}, {strategy}{secure}, {o.silos} silos with DP-SGD, non-IID "
                 f"(Dirichlet α={o.alpha:g})",
                 fontsize=12)
    ax.set_ylabel(f"held-out accuracy ({run.holdout_samples} samples no silo has)")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, loc="lower right", fontsize=8, title=f"a marker per new version, coloured by {made_by}",
              title_fontsize=8, ncols=2 if len(run.silos) > 6 else 1)

    # Epsilon spent over time, from the coordinator's record of each accepted update.
    by_silo: dict[str, list[tuple[float, float]]] = {}
    rejected: dict[str, list[float]] = {}
    for u in finale.updates:
        t = _seconds(run, _time(u["decided_at"]))
        if u["status"] in ("accepted", "buffered") and u["epsilon_computed"] is not None:
            by_silo.setdefault(u["silo_id"], []).append((t, float(u["epsilon_computed"])))
        elif u["status"] == "rejected":
            rejected.setdefault(u["silo_id"], []).append(t)
    end = max([run.training_seconds(), *xs, 1.0])
    for s in run.silos:
        c = colour[s.silo_id]
        steps = sorted(by_silo.get(s.silo_id, []))
        tx, ty = [0.0] + [t for t, _ in steps] + [end], [0.0] + [e for _, e in steps]
        ty.append(ty[-1])
        bx.step(tx, ty, where="post", color=c, linewidth=1.6)
        bx.axhline(s.plan.epsilon_cap, color=c, linestyle=":", linewidth=1)
        for t in rejected.get(s.silo_id, []):
            level = max([e for te, e in steps if te <= t], default=0.0)
            bx.scatter([t], [level], marker="x", color=c, s=40, zorder=3)
    if rejected:
        bx.scatter([], [], marker="x", color="0.3", label="update rejected (e.g. too stale)")
        bx.legend(loc="upper left", fontsize=8)
    bx.set_ylabel("ε spent (coordinator's RDP)\ndotted: each silo's cap")
    bx.set_xlabel("seconds since the silos started")
    bx.set_ylim(0, max(s.plan.epsilon_cap for s in run.silos) * 1.1)
    bx.grid(True, alpha=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
