"""Which files one update visits on its way through the coordinator, and how often it comes back.

A newcomer follows one update by reading the two files that run it --
:mod:`coordinator.ingest` (steps 2-9, then the fold) and :mod:`coordinator.fold`
(step 10) -- and opening each file they call. This script runs real updates through
``ingest.ingest`` on a fresh SQLite coordinator and records, with a profile hook
(``sys.setprofile`` and ``threading.setprofile``: the checks and the fold run in
worker threads), every *direct callee* of a frame of those two files:

- the callee's source file, relative to the repository;
- a callee in a worker thread whose stack holds no project frame was handed over by
  the file the main thread last ran (``ingest``, which awaits it);
- a generator resumed from an orchestrator counts as called by it (each resumption);
- a listener that SQLAlchemy's event dispatch calls (an after-commit hook, say) is
  SQLAlchemy's callee, not the frame that happened to end the transaction;
- not counted: code outside the repository (the standard library, SQLAlchemy, torch),
  the orchestrator's own file, the plumbing every stage uses (:data:`PLUMBING`), and
  ``privacy/``, the primitives tier (parse, verify, decrypt, decode: the protocol
  interleaves them with the checks, as it interleaves torch); they are listed, in
  brackets, but take no part in the count.

Consecutive calls into one file collapse into one visit. A *revisit* is a visit to a
file the sequence has already left once (``A, B, A``): the reader has to go back to a
file they had closed.

Cases: FedAsync (one update at staleness 0), FedBuff with K = 3 (the first update,
only buffered, and the third, which completes the buffer and writes a version), and
FedBuff with secure aggregation on (one masked update, summed into the integer buffer;
the helper is never asked: the buffer is not ready). The model has two tensors of
more than half a FedBuff slice each, so the buffer's sum is read in more than one
batch (a per-slice loop shows as such).

Run: ``.venv/bin/python benchmarks/update_path_files.py`` (a few seconds); prints each
case's sequence and writes ``benchmarks/results/update_path_files.json``.
``tests/coordinator/test_file_visits.py`` runs it and asserts the order and no revisits.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "benchmarks"):  # a script from a clean clone; ingest.py beside it
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from ingest import MAX_STALENESS, enrol_silos, init_coordinator, random_payload, task_options  # noqa: E402
from coordinator import bootstrap, ingest  # noqa: E402
from coordinator.app import open_coordinator  # noqa: E402
from privacy import codec, masked_update, secagg  # noqa: E402
from privacy.envelope import seal_update  # noqa: E402
from privacy.keys import Identity, b64e  # noqa: E402

ORCHESTRATORS = ("coordinator/ingest.py", "coordinator/fold.py")
#: What every stage uses and no reader follows an update into: sessions and the clock,
#: the memory admission, the lock, the audit log, metrics, errors, the table definitions.
PLUMBING = frozenset({
    "coordinator/context.py", "coordinator/slots.py", "coordinator/db.py", "coordinator/audit.py", "coordinator/transparency.py",
    "coordinator/metrics.py", "coordinator/errors.py", "coordinator/models.py",
})
LIBRARY = "privacy/"  # the primitives tier: listed, not counted
_DISPATCH = "/sqlalchemy/event/"  # SQLAlchemy calling its listeners
#: Two tensors of ~0.6M elements (a FedBuff slice is 1M): two batches of the sum.
PARAMS = 1_200_000
BUFFER_K = 3
#: Secure aggregation's mask; K_min = 2 with one silo: the masked buffer never opens here.
MASK = {"clip": 1.0, "scale": 2**16, "max_updates": 2 * BUFFER_K, "max_weight": 256}
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "update_path_files.json"


# --------------------------------------------------------------------------- tracing


class Recorder:
    """The direct callees of the orchestrators' frames, in call order, per orchestrator."""

    def __init__(self) -> None:
        self.main = threading.get_ident()
        self.main_file: str | None = None  # the project file the main thread last ran
        self.calls: dict[str, list[tuple[str, str]]] = {o: [] for o in ORCHESTRATORS}
        self._files: dict[str, str | None] = {}

    def project_file(self, filename: str) -> str | None:
        try:
            return self._files[filename]
        except KeyError:
            pass
        try:
            rel = Path(filename).resolve().relative_to(ROOT).as_posix()
        except ValueError:
            rel = None
        if rel is not None and not rel.startswith(("coordinator/", "privacy/")):
            rel = None
        self._files[filename] = rel
        return rel

    def caller(self, frame: FrameType | None) -> str | None:
        """The project file of the nearest project frame ("" past an event dispatch)."""
        while frame is not None:
            if _DISPATCH in frame.f_code.co_filename:
                return ""
            f = self.project_file(frame.f_code.co_filename)
            if f is not None:
                return f
            frame = frame.f_back
        return None

    def hook(self, frame: FrameType, event: str, arg: Any) -> None:
        on_main = threading.get_ident() == self.main
        if event == "return":
            if on_main:  # back in the caller (a suspended coroutine leaves it as it was)
                self.main_file = self.caller(frame.f_back) or self.main_file
            return
        if event != "call":
            return
        callee = self.project_file(frame.f_code.co_filename)
        if callee is None:
            return
        caller = self.caller(frame.f_back)
        if caller is None and not on_main:
            caller = self.main_file
        if on_main:
            self.main_file = callee
        if caller in self.calls and callee != caller and callee not in PLUMBING:
            self.calls[caller].append((callee, frame.f_code.co_name))

    @contextmanager
    def tracing(self) -> Iterator[None]:
        sys.setprofile(self.hook)
        threading.setprofile(self.hook)
        try:
            yield
        finally:
            sys.setprofile(None)
            threading.setprofile(None)


# --------------------------------------------------------------------------- counting


@dataclass
class Visits:
    """One orchestrator's visits: files in order, consecutive calls collapsed."""

    orchestrator: str
    visits: list[str] = field(default_factory=list)  # counted files
    shown: list[str] = field(default_factory=list)  # with the library's, in brackets
    functions: list[list[str]] = field(default_factory=list)  # per counted visit

    @property
    def revisits(self) -> list[str]:
        return [f for i, f in enumerate(self.visits) if f in self.visits[:i]]


def collapse(orchestrator: str, calls: Sequence[tuple[str, str]]) -> Visits:
    out = Visits(orchestrator)
    for f, fn in calls:
        label = f"[{f}]" if f.startswith(LIBRARY) else f
        if not out.shown or out.shown[-1] != label:
            out.shown.append(label)
        if f.startswith(LIBRARY):
            continue
        if out.visits and out.visits[-1] == f:
            if fn not in out.functions[-1]:
                out.functions[-1].append(fn)
            continue
        out.visits.append(f)
        out.functions.append([fn])
    return out


@dataclass
class Case:
    name: str
    status: str
    paths: list[Visits]

    @property
    def files(self) -> list[str]:
        """Every counted file the update visits, the orchestrators included, first visit first."""
        seen: list[str] = []
        for p in self.paths:
            for f in [p.orchestrator, *p.visits]:
                if f not in seen:
                    seen.append(f)
        return seen

    @property
    def revisits(self) -> int:
        return sum(len(p.revisits) for p in self.paths)

    def to_json(self) -> dict[str, Any]:
        return {
            "case": self.name, "status": self.status, "files": self.files, "file_count": len(self.files),
            "revisits": self.revisits,
            "paths": [{**asdict(p), "revisits": p.revisits} for p in self.paths],
        }


def trace_one(ctx, envelope: bytes) -> tuple[str, list[Visits]]:
    rec = Recorder()
    with rec.tracing():
        outcome = anyio.run(ingest.ingest, ctx, envelope)
    return outcome.status, [collapse(o, rec.calls[o]) for o in ORCHESTRATORS]


# --------------------------------------------------------------------------- cases


def run_case(work: Path, strategy: str, params: int) -> list[Case]:
    data = work / strategy
    init_coordinator(data, f"sqlite:///{data / 'fedsilo.db'}", params, strategy, buffer_k=BUFFER_K)
    silo = enrol_silos(data, 1)[0]
    payloads = [random_payload(data, seed) for seed in range(BUFFER_K)]
    ctx = open_coordinator(data)
    try:
        if strategy == "fedasync":
            status, paths = trace_one(ctx, silo.seal(payloads[0], 0))
            return [Case("fedasync", status, paths)]
        status, first = trace_one(ctx, silo.seal(payloads[0], 0))
        for payload in payloads[1:-1]:
            anyio.run(ingest.ingest, ctx, silo.seal(payload, 0))
        last_status, last = trace_one(ctx, silo.seal(payloads[-1], 0))
        return [Case("fedbuff-buffered", status, first), Case(f"fedbuff-applied (K={BUFFER_K})", last_status, last)]
    finally:
        ctx.close()


def run_masked_case(work: Path, params: int) -> Case:
    """One masked update into a FedBuff federation with secure aggregation on."""
    data, helper, name = work / "fedbuff-masked", Identity.generate(), "update-path-masked"
    secure = {"mode": "helper", "helper_url": "https://helper.invalid:8700", "k_min": 2, "mask": dict(MASK),
              "helper_signing_key": b64e(helper.public().signing), "helper_hpke_key": b64e(helper.public().hpke)}
    bootstrap.initialize(data, task="csv", task_options=task_options(params), database_url=f"sqlite:///{data / 'fedsilo.db'}",
                         name=name, strategy="fedbuff", settings={"max_staleness": MAX_STALENESS, "buffer_k": BUFFER_K,
                                                                  "secure_aggregation": secure})
    silo = enrol_silos(data, 1)[0]
    header, payload = masked_update.mask_for_helper(
        codec.decode(random_payload(data, 0)), silo.header(b"", 0), federation=name,
        settings=secagg.MaskSettings(**MASK), helper=helper.hpke.public_key(), signer=silo.identity.signing)
    envelope = seal_update(header, payload, recipient=silo.coordinator.hpke_key, signer=silo.identity.signing)
    ctx = open_coordinator(data)
    try:
        status, paths = trace_one(ctx, envelope)
        return Case("fedbuff-masked", status, paths)
    finally:
        ctx.close()


def measure(params: int = PARAMS) -> list[Case]:
    with tempfile.TemporaryDirectory(prefix="fedsilo-visits-") as tmp:
        cases = [c for strategy in ("fedasync", "fedbuff") for c in run_case(Path(tmp), strategy, params)]
        return [*cases, run_masked_case(Path(tmp), params)]


def report(cases: Sequence[Case]) -> str:
    lines = []
    for c in cases:
        lines.append(f"{c.name}: {c.status}; {len(c.files)} files; {c.revisits} revisits")
        for p in c.paths:
            lines.append(f"  {p.orchestrator} -> " + " -> ".join(p.shown))
            for f in p.revisits:
                lines.append(f"    revisit: {f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=PARAMS, help="model parameters (default %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (default %(default)s)")
    args = parser.parse_args(argv)
    cases = measure(args.params)
    print(report(cases))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"params": args.params, "buffer_k": BUFFER_K,
                                    "cases": [c.to_json() for c in cases]},
                                   indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
