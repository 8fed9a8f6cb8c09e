"""``fedsilo-helper``: init, serve, and the operator's roster and audit commands.

    fedsilo-helper init --dir D --federation F --coordinator-key B64 [--k-min 3]
                        [--database URL] [--clip 1.0 --scale 65536 --max-updates 64 --max-weight 256]
    fedsilo-helper serve --dir D [--host 127.0.0.1] [--port 8700]
    fedsilo-helper silo create --dir D SILO_ID       # prints the one-time enrolment token
    fedsilo-helper silo revoke --dir D SILO_ID
    fedsilo-helper audit verify --dir D
    fedsilo-helper witness setup --dir D --coordinator-url URL --federation-name NAME [--interval 60]
    fedsilo-helper witness run --dir D               # one round; exit 4: the coordinator's log forked
    fedsilo-helper witness resume --dir D --reason TEXT

``init`` prints one JSON object: the helper's public keys and fingerprints and the admin
token (shown once; only its hash is stored).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from privacy import secagg
from privacy.keys import Identity, b64e

from . import audit, roster
from .config import KEY_DIR, load_policy, read_config, write_config
from .db import OutdatedSchema, check_current, make_engine, session_factory, transaction, upgrade
from .models import HelperAdminToken


def _now() -> datetime:
    return datetime.now(UTC)


def init(args: argparse.Namespace) -> dict:
    directory = Path(args.dir)
    url = args.database or f"sqlite:///{directory.resolve() / 'helper.db'}"
    mask = secagg.MaskSettings(clip=args.clip, scale=args.scale, max_updates=args.max_updates,
                               max_weight=args.max_weight)
    write_config(directory, database_url=url, federation=args.federation, k_min=args.k_min,
                 coordinator_signing_key=args.coordinator_key, mask=mask)
    identity = Identity.generate()
    identity.save(directory / KEY_DIR)
    upgrade(url)
    token = roster.new_token()
    from coordinator.tokens import hash_token

    engine = make_engine(url)
    try:
        with transaction(engine) as session:
            session.add(HelperAdminToken(token_hash=hash_token(token), created_at=_now()))
            audit.append(session, actor="system", action="helper_initialised", subject=args.federation,
                         details={"k_min": args.k_min, "fingerprints": identity.public().fingerprints()}, now=_now())
    finally:
        engine.dispose()
    pub = identity.public()
    return {"helper_keys": pub.to_json(), "helper_fingerprints": pub.fingerprints(), "admin_token": token}


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from .app import create_app

    url, _ = load_policy(Path(args.dir))  # refuse to start on bad settings or keys, before binding
    engine = make_engine(url)
    try:
        check_current(engine)
    finally:
        engine.dispose()
    uvicorn.run(create_app(Path(args.dir)), host=args.host, port=args.port, log_level="warning")


def _session(args: argparse.Namespace):
    engine = make_engine(read_config(Path(args.dir))["database_url"])
    return engine, session_factory(engine)


def silo(args: argparse.Namespace) -> dict:
    engine, factory = _session(args)
    try:
        with factory.begin() as session:
            if args.silo_command == "create":
                return {"silo_id": args.silo_id,
                        "token": roster.create_silo(session, args.silo_id, actor="operator", now=_now())}
            roster.revoke(session, args.silo_id, actor="operator", now=_now())
            return {"silo_id": args.silo_id, "revoked": True}
    finally:
        engine.dispose()


def audit_verify(args: argparse.Namespace) -> dict:
    engine, factory = _session(args)
    try:
        with factory.begin() as session:
            bad = audit.verify(session)
    finally:
        engine.dispose()
    return {"ok": bad is None, "first_bad_seq": bad}


def witness_command(args: argparse.Namespace) -> dict:
    """``witness setup|run|resume``: configure, run one round, or lift a halt after a fork."""
    from . import witness

    directory = Path(args.dir)
    if args.witness_command == "setup":
        settings = witness.WitnessSettings(args.coordinator_url, args.federation_name, args.interval, args.name)
        witness.write_settings(directory, settings)
        _, policy = load_policy(directory)
        return {"key_name": settings.key_name, "signing_key": b64e(policy.identity.public().signing),
                "register_at_coordinator": {"name": settings.name,
                                            "signing_key": b64e(policy.identity.public().signing)}}
    engine, factory = _session(args)
    try:
        if args.witness_command == "resume":
            was = witness.resume(factory, operator_reason=args.reason, now=_now())
            return {"resumed": True, "halted_reason": was}
        settings = witness.load_settings(directory)
        if settings is None:
            raise WitnessNotSetUp("this helper does not witness: run 'fedsilo-helper witness setup' first")
        _, policy = load_policy(directory)
        done = witness.witness_round(factory, policy, settings, now=_now())
        return {**done.to_json(), "ok": done.outcome == "cosigned"}
    finally:
        engine.dispose()


class WitnessNotSetUp(Exception):
    pass


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedsilo-helper", description="The secure-aggregation helper aggregator.")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("init", help="create keys, configuration, database and an admin token")
    i.add_argument("--dir", required=True)
    i.add_argument("--federation", required=True)
    i.add_argument("--coordinator-key", required=True, help="the coordinator's signing key (base64url), pinned")
    i.add_argument("--k-min", type=int, default=3)
    i.add_argument("--database")
    i.add_argument("--clip", type=float, default=1.0)
    i.add_argument("--scale", type=int, default=2**16)
    i.add_argument("--max-updates", type=int, default=64)
    i.add_argument("--max-weight", type=int, default=256)
    s = sub.add_parser("serve", help="serve the helper's API")
    s.add_argument("--dir", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8700)
    r = sub.add_parser("silo", help="the helper's roster")
    rs = r.add_subparsers(dest="silo_command", required=True)
    for name in ("create", "revoke"):
        c = rs.add_parser(name)
        c.add_argument("--dir", required=True)
        c.add_argument("silo_id")
    a = sub.add_parser("audit", help="the helper's audit chain")
    av = a.add_subparsers(dest="audit_command", required=True).add_parser("verify")
    av.add_argument("--dir", required=True)
    wp = sub.add_parser("witness", help="witness the coordinator's transparency log (docs/secure-aggregation.md)")
    ws = wp.add_subparsers(dest="witness_command", required=True)
    setup = ws.add_parser("setup", help="where the coordinator is; prints the key to register there")
    setup.add_argument("--dir", required=True)
    setup.add_argument("--coordinator-url", required=True)
    setup.add_argument("--federation-name", required=True, help="the federation's name (checkpoint origin)")
    setup.add_argument("--interval", type=float, default=60.0, help="seconds between rounds while serving (60)")
    setup.add_argument("--name", default="helper", help="the witness name registered at the coordinator")
    run = ws.add_parser("run", help="one round now; exit 0 cosigned, 1 not possible now, 4 the log forked")
    run.add_argument("--dir", required=True)
    res = ws.add_parser("resume", help="after a fork was examined: open buffers and witness again (audited)")
    res.add_argument("--dir", required=True)
    res.add_argument("--reason", required=True, help="why, for the audit log")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "serve":
            serve(args)
            return 0
        result = {"init": init, "silo": silo, "audit": audit_verify, "witness": witness_command}[args.command](args)
    except (secagg.UnsafeSettings, roster.RosterError, OutdatedSchema, WitnessNotSetUp, ValueError) as exc:
        print(f"fedsilo-helper: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    if result.get("outcome") in ("forked", "halted"):
        return 4  # as a silo daemon's: the coordinator's log is not the one witnessed
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
