"""``fedsilo-coordinator demo``: a whole federation on one machine, in a few minutes.

A real coordinator (``fedsilo-coordinator serve``, SQLite in a fresh directory, HTTP
on a free loopback port) and N real silos (``fedsilo-silo run``, DP-SGD with Opacus)
on non-IID partitions of a bundled data set. Each silo has its own privacy cap; one
is slow on purpose while it trains (:mod:`.slow_task`, and the display says so). The
demo watches through the admin API, scores every version of the global model on a
held-out split no silo has, and ends on its own; then it verifies the audit chain
and leaves in ``--out``: ``summary.json``, ``accuracy.png``, ``audit.jsonl`` and each
silo's ledger export (``ledgers/``), with every process's log in ``logs/``.

Exit status: 0 when the held-out accuracy rose above the initial model's, the audit
chain verifies, no silo went past its cap and every silo's ledger matches the
coordinator's record; 1 when a check fails or the demo could not run; 130 when
interrupted. Modules: :mod:`.options` (what to run),
:mod:`.processes` (children), :mod:`.observer` (admin API, holdout scoring),
:mod:`.orchestration` (set up, watch, stop), :mod:`.display` (live and plain output),
:mod:`.report` (summary and plot).
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Sequence

from .options import DemoOptions, parse_options

__all__ = ["DemoOptions", "main", "run"]

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM takes the same path as Ctrl-C: stop the children, keep what can be kept.
    raise KeyboardInterrupt


def run(options: DemoOptions) -> int:
    """Run the demo with ``options``; returns the exit status (see the module docstring)."""
    from rich.console import Console

    from .display import LiveView, PlainView, print_summary
    from .processes import DemoError
    from .report import build_summary, plot_accuracy, write_summary
    from .orchestration import EndReason, run_demo

    human = sys.stderr if options.json else sys.stdout  # with --json, stdout holds only the JSON
    console = Console(file=human)
    if not options.quiet and console.is_terminal:
        view = LiveView(console)
    else:
        view = PlainView(human)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            demo, finale = run_demo(options, view)
        finally:
            view.close()
    except DemoError as exc:
        print(f"fedsilo-coordinator demo: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("fedsilo-coordinator demo: interrupted; every process it started was stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary = build_summary(demo, finale)
    plot_accuracy(demo, finale, demo.out / "accuracy.png")
    write_summary(demo, summary)
    if options.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary, str(demo.out), console)
    if demo.ended_because == EndReason.INTERRUPTED:
        return EXIT_INTERRUPTED
    return EXIT_OK if summary["ok"] else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (``fedsilo-coordinator demo ARGS``, ``python -m coordinator.demo ARGS``)."""
    try:
        options = parse_options(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    return run(options)
