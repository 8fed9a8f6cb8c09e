"""How the demo shows itself: a live ``rich`` display on a terminal, plain lines otherwise.

:class:`LiveView` redraws a table a few times a second: the global version and its
held-out accuracy (with a sparkline of every version so far), updates accepted and
rejected, and per silo its pace, its data, its epsilon spent against its cap (the
coordinator's figure) and what its process is doing. :class:`PlainView` prints a
few timestamped lines (``--quiet``, CI, or output that is not a terminal).
:func:`print_summary` renders ``summary.json`` for people.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .orchestration import DemoRun, SiloRun

__all__ = ["LiveView", "PlainView", "print_summary", "sparkline"]

_BARS = "▁▂▃▄▅▆▇█"
_PLAIN_EVERY = 15.0  # seconds between two progress lines in plain mode


def sparkline(values: list[float], width: int = 40) -> str:
    """The last ``width`` values in [0, 1] as block characters."""
    tail = values[-width:]
    return "".join(_BARS[min(len(_BARS) - 1, max(0, int(v * len(_BARS) - 1e-9)))] for v in tail)


def _labels(counts: dict[int, int]) -> str:
    total = sum(counts.values()) or 1
    if len(counts) <= 3:
        return " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:3]
    return " ".join(f"{k}:{100 * v / total:.0f}%" for k, v in top)


_STATES = {
    None: ("running", "green"),
    "budget_spent": ("budget spent", "yellow"),
    "stopped_by_demo": ("stopped", "dim"),
    "stopped": ("stopped", "dim"),
}
#: Below this console width the silo table drops the data column and narrows its bars.
_WIDE = 110


def _state(s: SiloRun) -> Text:
    if s.child is None:
        return Text("enrolled", style="dim")
    reason = s.stop_reason()
    if reason == "failed":
        return Text(f"exit {s.child.exit_code}", style="bold red")
    text, style = _STATES[reason]
    return Text(text, style=style)


def _header(run: DemoRun) -> Text:
    o = run.options
    strategy = {"fedasync": "FedAsync", "fedbuff": "FedBuff"}[o.strategy]
    strategy += " + CA2FL" if o.calibration == "ca2fl" else ""
    secure = " · secure aggregation" if o.secure_aggregation else ""
    return Text.assemble(("fedsilo demo", "bold"),
                         f" {_clock(run.elapsed())} · {o.task} · {strategy}{secure} · {o.silos} silos")


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m:02d}:{s:02d}"


def _global(run: DemoRun) -> Table:
    snap = run.snapshot
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    cur = snap.current
    first = snap.points[0] if snap.points else None
    if cur is None:
        grid.add_row("model", "-")
    else:
        acc = "-" if cur.accuracy is None else f"{cur.accuracy:.3f}"
        base = "" if first is None or first.accuracy is None else f" (initial {first.accuracy:.3f})"
        grid.add_row("model", Text.assemble(f"version {cur.version}, held-out accuracy ", (acc, "bold green"), base))
        history = [p.accuracy for p in snap.points if p.accuracy is not None]
        grid.add_row("history", Text.assemble((sparkline(history), "green"), (" accuracy, version by version", "dim")))
    grid.add_row("updates", Text.assemble((f"{snap.accepted}", "bold"), " accepted (the demo stops at ",
                                          f"{run.options.updates}), ",
                                          (f"{snap.rejected}", "bold red" if snap.rejected else "bold"), " rejected"))
    grid.add_row("now", Text(run.phase, style="italic"))
    if run.base_url:
        grid.add_row("coordinator", Text.assemble((run.base_url, "cyan"), " (loopback; logs in ", str(run.out / "logs"), ")"))
    if run.helper is not None:
        grid.add_row("secure agg.", Text.assemble(
            "helper aggregator at ", (run.helper.url, "cyan"), f" ({run.helper.fingerprints['hpke'][:23]}...): "
            f"every update leaves in shares; the coordinator opens only sums of buffers of >= {run.helper.k_min} "
            "silos"))
    return grid


def _silos(run: DemoRun, width: int) -> Table:
    wide = width >= _WIDE
    table = Table(box=box.SIMPLE_HEAVY, expand=False, pad_edge=False)
    table.add_column("silo", no_wrap=True)
    table.add_column("rests", justify="right", no_wrap=True)
    table.add_column("update every" if wide else "every", justify="right", no_wrap=True)
    if wide:
        table.add_column("rows · labels", justify="right", no_wrap=True)
    table.add_column("ε spent of its cap" if wide else "ε spent/cap", no_wrap=True)
    table.add_column("acc", justify="right", no_wrap=True)
    table.add_column("rej", justify="right", no_wrap=True)
    table.add_column("process", no_wrap=True)
    for s in run.silos:
        rec = run.snapshot.silo(s.silo_id) or {}
        spent, cap = float(rec.get("epsilon_spent", 0.0)), s.plan.epsilon_cap
        bar = ProgressBar(total=cap, completed=min(spent, cap), width=12 if wide else 6,
                          complete_style="red" if spent > cap else "yellow", finished_style="yellow")
        eps = Table.grid(padding=(0, 1))
        eps.add_row(bar, Text(f"{spent:4.2f}/{cap:g}"))
        pace = run.snapshot.seconds_per_update(s.silo_id)
        style = "magenta" if s.plan.slow else ""
        row = [
            Text(s.plan.name + (" slow" if s.plan.slow else ""), style="bold " + style),
            Text(s.plan.rest + (f", trains +{s.plan.extra_training_seconds:g} s" if s.plan.slow else ""), style=style),
            Text("-" if pace is None else f"{pace:.1f} s", style=style),
        ]
        if wide:
            row.append(Text(f"{sum(s.label_counts.values())} · {_labels(s.label_counts)}"))
        row += [eps, Text(str(rec.get("updates_accepted", 0))), Text(str(rec.get("updates_rejected", 0))), _state(s)]
        table.add_row(*row)
    return table


def _notes(run: DemoRun) -> Text:
    slow = next((s for s in run.silos if s.plan.slow), None)
    fast = next((s for s in run.silos if not s.plan.slow), None)
    lines = ["ε: the coordinator's own figure (RDP), recomputed from every update it accepted from the silo. "
             "Each silo stops by itself before its cap."]
    if slow is not None and fast is not None:
        lines.append(f"{slow.plan.name} is slow on purpose: each of its rounds trains "
                     f"{slow.plan.extra_training_seconds:g} s longer (the others train at full speed; all rest "
                     f"{fast.plan.rest}), so its updates arrive against newer versions. Nobody waits for it.")
    lines.append(f"Ctrl-C stops the demo and every process it started. Output: {run.out}")
    return Text("\n".join(lines), style="dim")


class LiveView:
    """A live table on a terminal (``rich.live.Live``)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._run: DemoRun | None = None
        self._live = Live(console=console, refresh_per_second=4, transient=False,
                          get_renderable=self._render, redirect_stdout=False, redirect_stderr=False)
        self._live.start()

    def _render(self) -> Any:
        run = self._run
        if run is None:
            return Text("fedsilo demo: starting", style="bold")
        parts: list[Any] = [_global(run)]
        if run.silos:
            parts.append(_silos(run, self.console.width))
        parts.append(_notes(run))
        return Panel(Group(*parts), title=_header(run), title_align="left", border_style="blue")

    def phase(self, run: DemoRun, text: str) -> None:
        self._run = run
        run.phase = text
        self._live.refresh()

    def refresh(self, run: DemoRun) -> None:
        self._run = run

    def close(self) -> None:
        self._live.stop()


class PlainView:
    """Timestamped lines: each phase, then a progress line every few seconds."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._last = 0.0

    def _line(self, run: DemoRun, text: str) -> None:
        print(f"[{_clock(run.elapsed())}] {text}", file=self.stream, flush=True)

    def phase(self, run: DemoRun, text: str) -> None:
        run.phase = text
        self._line(run, text)
        if text.startswith("starting the silos") and run.base_url:
            self._line(run, f"coordinator {run.base_url}; output and logs in {run.out}")
            if run.helper is not None:
                self._line(run, f"helper aggregator {run.helper.url}: updates leave in shares, buffers open as sums")

    def refresh(self, run: DemoRun) -> None:
        now = time.monotonic()
        if now - self._last < _PLAIN_EVERY:
            return
        self._last = now
        snap = run.snapshot
        cur = snap.current
        if cur is None:
            return
        acc = "-" if cur.accuracy is None else f"{cur.accuracy:.3f}"
        eps = " ".join(f"{s.plan.name}={float((snap.silo(s.silo_id) or {}).get('epsilon_spent', 0.0)):.2f}/{s.plan.epsilon_cap:g}"
                       for s in run.silos)
        waiting = " (waiting for the first update)" if snap.accepted == 0 and run.silos else ""
        self._line(run, f"version {cur.version} accuracy {acc}; {snap.accepted} accepted, {snap.rejected} rejected; "
                        f"epsilon {eps}{waiting}")

    def close(self) -> None:
        pass


def _stopped(silo: dict) -> str:
    """Why a silo's process ended, in a few words."""
    reason = silo["stop_reason"]
    if reason == "budget_spent":
        return "its budget was spent"
    if reason == "stopped_by_demo":
        return "stopped by the demo"
    if reason == "failed":
        return f"exit {silo['exit_code']}: {silo['stopped_with'][:60]}"
    return silo["stopped_with"][:60]


def print_summary(summary: dict, out_dir: str, console: Console | None = None) -> None:
    """The summary for people: the checks, the figures, where the files are."""
    console = console or Console(file=sys.stdout)
    acc = summary["accuracy"]
    ok = summary["ok"]
    checks = summary["checks"]

    def mark(good: bool) -> Text:
        return Text("OK  ", style="bold green") if good else Text("FAIL", style="bold red")

    grid = Table.grid(padding=(0, 2))
    grid.add_column()
    grid.add_column()
    initial = "-" if acc["initial"] is None else f"{acc['initial']:.3f}"
    final = "-" if acc["final"] is None else f"{acc['final']:.3f}"
    grid.add_row(mark(checks["accuracy_improved"]),
                 f"held-out accuracy {initial} (version {acc['initial_version']}) -> {final} "
                 f"(version {acc['final_version']}), on {acc['holdout_samples']} samples no silo had")
    audit = summary["audit"]
    grid.add_row(mark(checks["audit_verified"]),
                 f"audit chain verifies: {audit['verify'].get('checked')} entries online, "
                 f"{audit['export']['verify_offline'].get('checked')} from {audit['export']['path']}")
    grid.add_row(mark(checks["within_caps"]), "every silo within its privacy cap (coordinator's recomputed epsilon)")
    reconciled = sum(s["ledger_reconciled"]["updates_checked"] for s in summary["silos"])
    grid.add_row(mark(checks["ledgers_reconciled"]),
                 f"every silo's ledger matches the audit log ({reconciled} updates: digests, outcome, "
                 "inside a checkpoint the silo cosigned)")
    secure = summary.get("secure_aggregation")
    if secure:
        opened = "?" if secure["openings"] is None else secure["openings"]
        grid.add_row(mark(checks["updates_in_shares"]),
                     f"secure aggregation: {secure['updates_in_shares']} of {secure['updates_sent']} updates left "
                     f"their silo in shares; the helper at {secure['url']} opened {opened} buffer sum(s) of >= "
                     f"{secure['k_min']} silos")

    table = Table(box=box.SIMPLE, pad_edge=False)
    for col, just in (("silo", "left"), ("ε spent", "right"), ("cap", "right"), ("accepted", "right"),
                      ("rejected", "right"), ("stopped because", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for s in summary["silos"]:
        rejected = str(s["updates_rejected"])
        if s["rejections"]:
            rejected += " (" + ", ".join(f"{k} {v}" for k, v in s["rejections"].items()) + ")"
        spent = "-" if s["epsilon_spent"] is None else f"{s['epsilon_spent']:.3f}"
        table.add_row(s["name"] + (" (slow)" if s["slow"] else ""), spent, f"{s['epsilon_cap']:g}",
                      str(s["updates_accepted"]), rejected, _stopped(s))

    u = summary["updates"]
    lines = Text(
        f"{summary['versions']['created']} new versions from {u['accepted']} accepted updates "
        f"({u['rejected']} rejected) in {summary['training_seconds']:.0f} s of training, "
        f"{summary['wall_time_seconds']:.0f} s in all; ended because: {summary['ended_because'].replace('_', ' ')}.\n"
        f"Output in {out_dir}: summary.json, accuracy.png, {audit['export']['path']}, ledgers/, logs/"
    )
    if summary["ended_because"] == "interrupted":
        title, colour = "demo interrupted (figures so far)", "yellow"
    else:
        title, colour = ("demo passed", "green") if ok else ("demo FAILED", "red")
    console.print(Panel(Group(grid, table, lines), title=Text(title, style=f"bold {colour}"), title_align="left",
                        border_style=colour))
