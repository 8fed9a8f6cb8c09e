"""The compliance officer's HTTP API, mounted at ``/api/audit`` (docs/compliance.md).

Read-only, for roles ``auditor`` and ``admin``: the hash-chained log page by page,
online verification, a streamed export (JSONL or CSV) and every silo's privacy spend.

The export is fixed to the chain head at the moment of the request, which it names in
``Fedsilo-Audit-Head-Seq`` / ``Fedsilo-Audit-Head-Hash``; it then reads the entries
up to that head in batches, each in its own short read-only transaction. Entries are
immutable once committed, so the file is one consistent prefix of the log, memory
stays bounded by one batch, and a slow download never holds a database snapshot open.
"""

from __future__ import annotations

import functools

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from coordinator import audit
from coordinator import budget as budget_reports
from coordinator.api._params import path_str, query_int, query_str
from coordinator.api._threads import in_read
from coordinator.api.auth import ANY_ROLE, Principal, guarded
from coordinator.context import Coordinator
from coordinator.errors import Reason
from coordinator.openapi import TEXT_PARAM, describe, integer, path_param, query

__all__ = ["MAX_EVENTS_LIMIT", "routes", "verify_json"]

#: Largest page of ``GET /events``.
MAX_EVENTS_LIMIT = 1000
_DEFAULT_EVENTS_LIMIT = 100
_STR = {"type": "string"}
_FORMATS = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


def verify_json(result: audit.VerifyResult) -> dict:
    """The wire form of a :class:`coordinator.audit.VerifyResult`."""
    return {
        "ok": result.ok,
        "checked": result.checked,
        "first_bad_seq": result.first_bad_seq,
        "problem": result.problem.value if result.problem else None,
        "message": result.message,
        "head_seq": result.head_seq,
        "head_hash": result.head_hash,
    }


def routes(ctx: Coordinator) -> list[Route]:
    """The audit routes, relative to their mount point."""

    read = functools.partial(in_read, ctx)

    @guarded(ctx, *ANY_ROLE)
    @describe("Audit log entries in seq order, filtered, paged by seq", tag="audit",
              parameters=[query("after_seq", integer(0), "entries after this seq"),
                          query("limit", integer(1, MAX_EVENTS_LIMIT)),
                          query("actor", TEXT_PARAM), query("action", TEXT_PARAM), query("subject", TEXT_PARAM)],
              response="EventPage", errors=[Reason.INVALID_REQUEST])
    async def events(request: Request, who: Principal) -> Response:
        limit = query_int(request, "limit", default=_DEFAULT_EVENTS_LIMIT, lo=1, hi=MAX_EVENTS_LIMIT)
        filters = {
            "after_seq": query_int(request, "after_seq", lo=0),
            "actor": query_str(request, "actor"),
            "action": query_str(request, "action"),
            "subject": query_str(request, "subject"),
        }

        def page(session):
            return [audit.event_to_dict(e) for e in audit.iter_events(session, limit=limit, **filters)]

        items = await read(page)
        next_after = items[-1]["seq"] if len(items) == limit else None
        return JSONResponse({"events": items, "next_after_seq": next_after})

    @guarded(ctx, *ANY_ROLE)
    @describe("Walk the whole chain now; names the first entry that does not match", tag="audit",
              response="VerifyResult")
    async def verify(request: Request, who: Principal) -> Response:
        return JSONResponse(verify_json(await read(audit.verify)))

    @guarded(ctx, *ANY_ROLE)
    @describe("Export the log up to the current head, streamed (JSONL or CSV)", tag="audit",
              description="JSONL: one canonical JSON object per line with details as an object. CSV: a header "
                          "row, details as their canonical JSON text. The head the export ends at is in the "
                          "response headers; verify offline with coordinator.audit.verify.",
              parameters=[query("format", {"enum": list(_FORMATS)}, "jsonl (default) or csv"),
                          query("after_seq", integer(0), "export only entries after this seq (incremental)")],
              response=_STR, content_type=tuple(_FORMATS.values()),
              response_headers={"Fedsilo-Audit-Head-Seq": "seq of the last exported entry",
                                "Fedsilo-Audit-Head-Hash": "its hash"},
              errors=[Reason.INVALID_REQUEST])
    async def export(request: Request, who: Principal) -> Response:
        fmt = query_str(request, "format", choices=tuple(_FORMATS)) or "jsonl"
        after_seq = query_int(request, "after_seq", default=0, lo=0)
        head_seq, head_hash = await read(audit.get_head)
        return StreamingResponse(
            audit.export_chunks(ctx.read, fmt, after_seq=after_seq, upto_seq=head_seq),
            media_type=_FORMATS[fmt],
            headers={
                "Fedsilo-Audit-Head-Seq": str(head_seq),
                "Fedsilo-Audit-Head-Hash": head_hash,
                "Content-Disposition": f'attachment; filename="audit-{after_seq + 1}-{head_seq}.{fmt}"',
            },
        )

    @guarded(ctx, *ANY_ROLE)
    @describe("Every silo's privacy spend, recomputed from its accepted history", tag="audit",
              response="BudgetList")
    async def budgets(request: Request, who: Principal) -> Response:
        items = await read(budget_reports.budgets, accountant=ctx.config.accountant, federation_id=ctx.federation_id)
        return JSONResponse({"budgets": [b.to_json() for b in items]})

    @guarded(ctx, *ANY_ROLE)
    @describe("One silo's privacy spend with its full DP history, to recompute independently", tag="audit",
              parameters=[path_param("silo_id")], response="Budget", errors=[Reason.NOT_FOUND])
    async def budget(request: Request, who: Principal) -> Response:
        report = await read(budget_reports.budget_report, path_str(request, "silo_id"),
                            accountant=ctx.config.accountant, federation_id=ctx.federation_id)
        return JSONResponse(report.to_json())

    return [
        Route("/events", events, methods=["GET"]),
        Route("/verify", verify, methods=["GET"]),
        Route("/export", export, methods=["GET"]),
        Route("/budgets", budgets, methods=["GET"]),
        Route("/budgets/{silo_id}", budget, methods=["GET"]),
    ]
