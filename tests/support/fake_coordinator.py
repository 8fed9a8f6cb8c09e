"""A faithful fake of the coordinator's silo-facing API, for the silo node's tests.

It follows docs/protocol.md with real keys, signatures, HPKE and safetensors,
in memory (no SQL, no HTTP server): it is an ``httpx.MockTransport`` handler. The real
coordinator is exercised in tests/integration/test_silos.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import Counter
from collections.abc import Callable

import httpx

from privacy import accounting, codec, compression, masked_update, secagg
from privacy.envelope import (
    enrolment_statement,
    open_update,
    parse_update,
    release_statement,
    sign_statement,
    utc_timestamp,
    verify_request,
)
from privacy.errors import PrivacyError
from privacy.keys import Identity, PublicIdentity, b64e

NOW = dt.datetime(2026, 11, 21, 22, 0, 0, tzinfo=dt.UTC)


class FakeCoordinator:
    """The silo-facing half of the coordinator contract, in memory, with real crypto.

    FedAsync with a constant weight ``alpha``; budgets by ``privacy.accounting`` over
    accepted updates; a resend of a decided update id gets the original answer.
    ``faults`` is a queue of callables tried before normal handling: each returns a
    response (or raises) to script failures, or None to pass.
    """

    def __init__(self, *, task: str = "breast_cancer", hidden: list[int] | None = None, epsilon_cap: float = 10.0,
                 delta: float = 1e-5, federation: str = "test-fed", alpha: float = 0.6,
                 clock: Callable[[], dt.datetime] = lambda: NOW) -> None:
        from silo_node.tasks import get_task

        self.identity = Identity.generate()
        self.clock = clock
        self.federation = federation
        self.task = get_task(task, {"hidden": hidden or [8]})
        self.versions = [{k: v.clone() for k, v in self.task.build_model(seed=0).state_dict().items()}]
        self.schema = codec.Schema.of(self.versions[0])
        self.epsilon_cap, self.delta, self.alpha = epsilon_cap, delta, alpha
        self.tokens: dict[str, str] = {}
        self.silos: dict[str, PublicIdentity] = {}
        self.decided: dict[str, tuple[str, int, dict]] = {}  # update id -> (envelope digest, status, body)
        self.history: dict[str, list[tuple[str, accounting.DPRun]]] = {}
        self.folds: Counter[str] = Counter()
        self.requests: list[tuple[str, str]] = []
        self.faults: list[Callable[[httpx.Request], httpx.Response | None]] = []
        self.sign_releases_with = self.identity.signing  # swap to forge releases
        self.audit_seq = 0
        #: The federation's secure_aggregation setting, signed into every release (None: off).
        #: While it is set, masked updates are buffered (kept in ``masked``), never folded.
        self.secure_aggregation: dict | None = None
        self.masked: list[tuple[object, masked_update.MaskedStatement, dict]] = []  # (header, statement, shares)

    # -- operator side --

    def create_token(self, name: str = "silo") -> str:
        token = f"tok-{len(self.tokens)}-{name}"
        self.tokens[token] = name
        return token

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    @property
    def version(self) -> int:
        return len(self.versions) - 1

    def epsilon(self, silo_id: str, extra: list | None = None) -> float:
        runs = [r for _, r in self.history.get(silo_id, [])] + (extra or [])
        return accounting.epsilon_of(runs, self.delta)

    # -- HTTP --

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.raw_path.decode()))
        for fault in list(self.faults):
            self.faults.remove(fault)
            answer = fault(request)
            if answer is not None:
                return answer
            break
        path = request.url.path
        if path == "/api/v1/enroll":
            return self._enroll(request)
        if path == "/api/v1/updates":
            return self._update(request)
        silo_id = request.headers.get("fedsilo-silo", "")
        keys = self.silos.get(silo_id)
        try:
            if keys is None:
                raise PrivacyError("bad_signature")
            verify_request(request.method, request.url.raw_path.decode(), request.content, request.headers,
                           keys.signing_key, now=self.clock())
        except PrivacyError:
            return self._error(401, "bad_signature", "the signature does not verify")
        if path == "/api/v1/model":
            return self._model(request)
        if path == "/api/v1/status":
            return httpx.Response(200, json={
                "silo_id": silo_id, "status": "active", "epsilon_spent": self.epsilon(silo_id),
                "epsilon_cap": self.epsilon_cap, "delta": self.delta, "accountant": "rdp",
                "history": [{"update_id": u, **r._asdict()} if hasattr(r, "_asdict") else
                            {"update_id": u, "noise_multiplier": r.noise_multiplier, "sample_rate": r.sample_rate,
                             "steps": r.steps} for u, r in self.history.get(silo_id, [])],
                "updates_accepted": len(self.history.get(silo_id, [])), "current_version": self.version,
            })
        return self._error(404, "not_found", "no such resource")

    @staticmethod
    def _error(status: int, reason: str, detail: str, **extra) -> httpx.Response:
        return httpx.Response(status, json={"reason": reason, "detail": detail, **extra})

    def _enroll(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        name = self.tokens.pop(body.get("token"), None)
        if name is None:
            return self._error(401, "bad_token", "missing, unknown, used, expired or revoked token")
        silo_id = f"silo-{len(self.silos) + 1}"
        self.silos[silo_id] = PublicIdentity.from_json(body)
        pub = self.identity.public()
        task = {"name": self.task.name, "options": dict(self.task.options)}
        budget = {"epsilon_cap": self.epsilon_cap, "delta": self.delta, "accountant": "rdp"}
        statement, signature = enrolment_statement(
            {"silo_id": silo_id, "name": name, "federation": self.federation, "task": task,
             "schema_digest": self.schema.digest, "budget": budget, "silo_keys": self.silos[silo_id].to_json(),
             "secure_aggregation": self.secure_aggregation},
            self.identity.signing,
        )
        return httpx.Response(200, json={
            "silo_id": silo_id, "name": name,
            "federation": {"name": self.federation, "task": task,
                           "schema": self.schema.to_json(), "schema_digest": self.schema.digest,
                           "current_version": self.version, "settings": {"max_staleness": 8},
                           "secure_aggregation": self.secure_aggregation},
            "budget": budget,
            "coordinator": {**pub.to_json(), "fingerprints": pub.fingerprints()},
            "statement": b64e(statement), "signature": b64e(signature),
        })

    def model_response(self, version: int) -> tuple[bytes, dict[str, str]]:
        blob = codec.encode(self.versions[version])
        statement, sig = release_statement(
            federation=self.federation, version=version, digest=codec.digest(blob), size=len(blob),
            schema_digest=self.schema.digest,
            created_at=utc_timestamp(NOW), signer=self.sign_releases_with,
            secure_aggregation=self.secure_aggregation,
        )
        return blob, {"Fedsilo-Version": str(version), "Fedsilo-Release": b64e(statement),
                      "Fedsilo-Release-Signature": b64e(sig)}

    def _model(self, request: httpx.Request) -> httpx.Response:
        version = int(request.url.params.get("version", self.version))
        if not 0 <= version <= self.version:
            return self._error(404, "unknown_version", "no such version")
        blob, headers = self.model_response(version)
        return httpx.Response(200, content=blob, headers={**headers, "Content-Type": "application/octet-stream"})

    def _receipt(self, fields: dict) -> dict:
        self.audit_seq += 1
        fields = {**fields, "audit_seq": self.audit_seq, "audit_hash": hashlib.sha256(b"%d" % self.audit_seq).hexdigest(),
                  "issued_at": utc_timestamp(NOW)}
        data, sig = sign_statement("receipt", fields, self.identity.signing)
        return {**fields, "receipt": b64e(data), "signature": b64e(sig)}

    def _update(self, request: httpx.Request) -> httpx.Response:
        sealed = parse_update(request.content)
        keys = self.silos.get(sealed.signer_id)
        if keys is None:
            return self._error(401, "unknown_silo", "no enrolled silo has this id")
        header, payload = open_update(request.content, signer=keys.signing_key, recipient=self.identity.hpke)
        digest = sealed.envelope_digest
        if header.update_id in self.decided:
            seen_digest, status, body = self.decided[header.update_id]
            if seen_digest != digest:
                return self._error(409, "replay", "update id reused with different content")
            return httpx.Response(status, json=body)  # the original answer; nothing folded again
        base = {"update_id": header.update_id, "silo_id": header.silo_id, "base_version": header.base_version,
                "envelope_digest": digest, "epsilon_claimed": header.epsilon_claim}
        dp = header.dp
        run = accounting.DPRun(dp["noise_multiplier"], dp["sample_rate"], dp["steps"])
        epsilon = self.epsilon(header.silo_id, [run])
        if epsilon > self.epsilon_cap:
            body = self._receipt({**base, "status": "rejected", "reason": "budget_exceeded", "resulting_version": None,
                                  "staleness": self.version - header.base_version, "weight": 0.0,
                                  "charged": False, "epsilon_computed": None})  # checked before decrypting
            body = {"reason": "budget_exceeded", "detail": "over the cap", **body}
            self.decided[header.update_id] = (digest, 403, body)
            return httpx.Response(403, json=body)
        if header.payload_kind == "masked_delta":
            if self.secure_aggregation is None:
                return self._error(400, "unsupported_version", "this federation does not use secure aggregation")
            statement = masked_update.verify_masked(header.masked, keys.signing_key)
            self.masked.append((header, statement, secagg.from_wire(codec.decode(payload))))
            self.history.setdefault(header.silo_id, []).append((header.update_id, run))
            body = self._receipt({**base, "status": "buffered", "resulting_version": None,
                                  "staleness": self.version - header.base_version, "weight": 1.0,
                                  "epsilon_computed": epsilon})
            self.decided[header.update_id] = (digest, 200, body)
            return httpx.Response(200, json=body)
        if self.secure_aggregation is not None:
            return self._error(400, "masking_required", "this federation takes masked updates only")
        delta = compression.decode(header.payload_kind, codec.decode(payload), self.schema)
        self.schema.check(delta)
        x_base = self.versions[header.base_version]
        new = {k: (1 - self.alpha) * self.versions[-1][k] + self.alpha * (x_base[k] + delta[k]) for k in x_base}
        self.versions.append(new)
        self.folds[header.update_id] += 1
        self.history.setdefault(header.silo_id, []).append((header.update_id, run))
        body = self._receipt({**base, "status": "accepted", "resulting_version": self.version,
                              "staleness": self.version - 1 - header.base_version, "weight": self.alpha,
                              "epsilon_computed": epsilon})
        self.decided[header.update_id] = (digest, 200, body)
        return httpx.Response(200, json=body)
