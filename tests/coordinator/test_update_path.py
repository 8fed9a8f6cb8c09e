"""The update path reads top to bottom: ingest -> decisions -> fold -> store -> audit -> receipt.

One real update (FedAsync, and FedBuff both buffered and applied) is traced through
``ingest.ingest`` with a profile hook that records every call into a project file
(``coordinator/`` and ``privacy/``). Two properties a newcomer relies on when following
it:

- no callbacks: no file is entered again through another file while it is still
  running (``A -> B -> A``). Reading the path, one never has to go back up to a file
  one is still inside;
- the stages come in order: the first time each stage's file is entered follows the
  pipeline's order.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import anyio
import pytest

from coordinator import ingest
from tests.coordinator.test_ingest import enrol, make_coordinator

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("coordinator", "privacy")
STAGES = ["coordinator/ingest.py", "coordinator/decisions.py", "coordinator/fold.py",
          "coordinator/audit.py", "coordinator/receipts.py"]


def _project_file(filename: str) -> str | None:
    try:
        rel = Path(filename).resolve().relative_to(ROOT)
    except ValueError:
        return None
    return rel.as_posix() if rel.parts[0] in PACKAGES else None


def trace(ctx, envelope: bytes):
    """Run one ingest; return (outcome, [(file, function, files on the stack below it)])."""
    calls: list[tuple[str, str, tuple[str, ...]]] = []
    stacks: dict[int, list[str | None]] = {}

    def hook(frame, event, arg):
        stack = stacks.setdefault(threading.get_ident(), [])
        if event == "call":
            f = _project_file(frame.f_code.co_filename)
            # a worker thread's stack continues the caller's: ingest waits on the fold's thread
            below = tuple(x for x in stacks.get(main, []) if x) if not stack and threading.get_ident() != main else ()
            calls.append((f, frame.f_code.co_name, below + tuple(x for x in stack if x))) if f else None
            stack.append(f)
        elif event == "return" and stack:
            stack.pop()

    main = threading.get_ident()
    sys.setprofile(hook)
    threading.setprofile(hook)
    try:
        outcome = anyio.run(ingest.ingest, ctx, envelope)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return outcome, calls


def callbacks(calls) -> list[tuple[str, str, str]]:
    """Entries into a file that is already on the stack below another file."""
    return [(f, fn, below[-1]) for f, fn, below in calls if below and below[-1] != f and f in below]


def first_visits(calls) -> list[str]:
    seen: list[str] = []
    for f, _, _ in calls:
        if f not in seen:
            seen.append(f)
    return seen


@pytest.mark.parametrize("strategy", ["fedasync", "fedbuff-buffered", "fedbuff-applied"])
def test_one_update_visits_its_stages_in_order_without_callbacks(tmp_path, strategy):
    fedbuff = strategy.startswith("fedbuff")
    ctx = make_coordinator(tmp_path / "c", strategy="fedbuff", buffer_k=2) if fedbuff else make_coordinator(tmp_path / "c")
    try:
        silo = enrol(ctx, "a")
        if strategy == "fedbuff-applied":
            assert anyio.run(ingest.ingest, ctx, silo.seal(silo.delta(seed=9), base_version=0)).status == "buffered"
        outcome, calls = trace(ctx, silo.seal(silo.delta(seed=1), base_version=0))
        assert outcome.status == ("buffered" if strategy == "fedbuff-buffered" else "accepted")
        assert callbacks(calls) == []
        order = first_visits(calls)
        stages = [f for f in order if f in STAGES]
        assert stages == STAGES, order
        if fedbuff:  # the buffer is the fold's store alone: nothing before the fold touches it
            assert order.index("coordinator/fold.py") < order.index("coordinator/buffers.py")
    finally:
        ctx.close()


def test_the_detector_sees_a_callback():
    calls = [("coordinator/fold.py", "commit", ("coordinator/ingest.py",)),
             ("coordinator/audit.py", "append", ("coordinator/ingest.py", "coordinator/fold.py")),
             ("coordinator/fold.py", "_hook", ("coordinator/ingest.py", "coordinator/fold.py", "coordinator/audit.py"))]
    assert callbacks(calls) == [("coordinator/fold.py", "_hook", "coordinator/audit.py")]
