"""CLI commands of the alerting layer: ``block``, ``unblock``, ``token-hash``.

``block``/``unblock`` talk to a running service when ``--api`` is given (the
embedded store cannot be opened by a second process, and the service keeps
the active list in memory), else they work directly on the store: for a
service that is not running, or for audit repairs.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import secrets
import sys
from collections.abc import Callable
from typing import Any

from alerting.blocklist import SCOPES, parse_ttl

StorageFlags = Callable[[argparse.ArgumentParser], None]
SettingsFn = Callable[[argparse.Namespace], Any]


def _ttl_arg(text: str) -> float | None:
    try:
        return parse_ttl(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _api_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("running service")
    g.add_argument("--api", metavar="URL",
                   help="act through a running tokenward (e.g. http://127.0.0.1:8000); "
                   "without it the store is changed directly (service stopped)")
    g.add_argument("--token", default=os.environ.get("TOKENWARD_TOKEN"),
                   help="admin bearer token for --api (env TOKENWARD_TOKEN)")


def _client(args: argparse.Namespace) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    return httpx.Client(base_url=args.api.rstrip("/"), headers=headers, timeout=30)


def _fail(cmd: str, msg: str, code: int = 1) -> int:
    print(f"tokenward {cmd}: {msg}", file=sys.stderr)
    return code


def _local_blocklist(args: argparse.Namespace, settings_fn: SettingsFn) -> Any:
    from alerting.blocklist import BlockList
    from ingest.store import open_store

    settings = settings_fn(args)
    store = open_store(settings.data_dir, settings.clickhouse_url)
    return BlockList(store)


def _local_actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"admin:cli:{user}"


# -- block / unblock ------------------------------------------------------------------
def cmd_block(args: argparse.Namespace, settings_fn: SettingsFn) -> int:
    if args.api:
        with _client(args) as c:
            r = c.post("/v1/blocks", json={
                "scope": args.scope, "value": args.value, "reason": args.reason,
                "ttl": args.ttl, "tenant": args.tenant, "finding_id": args.finding_id,
                "dry_run": args.dry_run})
        if r.status_code != 201:
            return _fail("block", f"{r.status_code} {r.text}")
        print(json.dumps(r.json()))
        return 0
    from alerting.blocklist import AllowlistedError
    from ingest.store import DataDirLocked

    try:
        bl = _local_blocklist(args, settings_fn)
    except DataDirLocked as exc:
        return _fail("block", f"{exc} (use --api)")
    except RuntimeError as exc:  # chdb does not always say "lock" when the folder is in use
        return _fail("block", f"cannot open the store ({str(exc).strip()[:200]}); if a "
                     "tokenward service runs on it, go through it: --api http://HOST:PORT")
    try:
        e = bl.block(args.scope, args.value, reason=args.reason, finding_id=args.finding_id,
                     ttl_s=args.ttl, actor=_local_actor(), tenant=args.tenant,
                     dry_run=args.dry_run)
    except (AllowlistedError, ValueError) as exc:
        return _fail("block", str(exc), 2)
    print(json.dumps(e.to_dict()))
    return 0


def cmd_unblock(args: argparse.Namespace, settings_fn: SettingsFn) -> int:
    if args.api:
        from urllib.parse import quote

        with _client(args) as c:
            r = c.delete(f"/v1/blocks/{args.scope}/{quote(args.value, safe='')}",
                         params={"reason": args.reason})
        if r.status_code == 404:
            return _fail("unblock", f"{args.scope} {args.value!r} is not blocked")
        if r.status_code != 200:
            return _fail("unblock", f"{r.status_code} {r.text}")
        print(json.dumps(r.json()))
        return 0
    from ingest.store import DataDirLocked

    try:
        bl = _local_blocklist(args, settings_fn)
    except DataDirLocked as exc:
        return _fail("unblock", f"{exc} (use --api)")
    except RuntimeError as exc:  # chdb does not always say "lock" when the folder is in use
        return _fail("unblock", f"cannot open the store ({str(exc).strip()[:200]}); if a "
                     "tokenward service runs on it, go through it: --api http://HOST:PORT")
    if not bl.unblock(args.scope, args.value, actor=_local_actor(), reason=args.reason):
        return _fail("unblock", f"{args.scope} {args.value!r} is not blocked")
    print(json.dumps({"unblocked": True, "scope": args.scope, "value": args.value}))
    return 0


# -- token-hash --------------------------------------------------------------------------
def cmd_token_hash(args: argparse.Namespace) -> int:
    from api.auth import ROLES, hash_token

    if args.generate:
        token = secrets.token_urlsafe(32)
    elif args.token is not None:
        token = args.token
    elif sys.stdin.isatty():
        token = getpass.getpass("token: ")
    else:
        token = sys.stdin.readline().rstrip("\r\n")
    if not token:
        return _fail("token-hash", "empty token", 2)
    digest = hash_token(token)
    if args.generate:
        # The one time the clear token is shown: hand it to its holder.
        print(f"# token (give it to the client; it is not stored anywhere): {token}")
    if args.name or args.generate:
        roles = args.role or ["gateway"]
        bad = [r for r in roles if r not in ROLES]
        if bad:
            return _fail("token-hash", f"unknown role(s) {bad}; valid: {', '.join(ROLES)}", 2)
        print("[[tokens]]")
        print(f'name = "{args.name or "unnamed"}"')
        print("roles = [" + ", ".join(f'"{r}"' for r in roles) + "]")
        print(f'sha256 = "{digest}"')
    else:
        print(digest)
    return 0


# -- registration -------------------------------------------------------------------------
def register(
    sub: Any,
    storage_flags: StorageFlags,
    config_flags: StorageFlags,
    settings_fn: SettingsFn,
) -> None:
    """Add this module's commands to the ``tokenward`` parser."""
    b = sub.add_parser(
        "block", help="block a consumer, user or ip (audited)",
        description="Block a consumer, user or ip, with a reason and an optional TTL. "
        "Re-blocking extends. Goes through the running service with --api.")
    b.add_argument("--scope", choices=SCOPES, default="consumer")
    b.add_argument("--value", required=True, help="the consumer id, user or address")
    b.add_argument("--reason", required=True)
    b.add_argument("--ttl", type=_ttl_arg, default=None,
                   help="seconds, or 30s/10m/2h/1d (default: until unblocked)")
    b.add_argument("--tenant", default="default")
    b.add_argument("--finding-id", default="")
    b.add_argument("--dry-run", action="store_true",
                   help="record a would_block audit row only")
    _api_flags(b)
    storage_flags(b)
    b.set_defaults(func=lambda a: cmd_block(a, settings_fn))

    u = sub.add_parser("unblock", help="lift a block (audited)")
    u.add_argument("--scope", choices=SCOPES, default="consumer")
    u.add_argument("--value", required=True)
    u.add_argument("--reason", default="manual unblock")
    _api_flags(u)
    storage_flags(u)
    u.set_defaults(func=lambda a: cmd_unblock(a, settings_fn))

    t = sub.add_parser(
        "token-hash", help="hash an API token for the auth file (or --generate one)",
        description="Print the SHA-256 of a token (read from stdin or a prompt, so it stays "
        "out of the shell history), or with --name/--role a ready [[tokens]] entry. "
        "--generate makes a new random token.")
    t.add_argument("token", nargs="?", help="the token (prefer stdin)")
    t.add_argument("--generate", action="store_true", help="make a new random token")
    t.add_argument("--name", help="token name for the [[tokens]] entry")
    t.add_argument("--role", action="append",
                   help="role for the entry (repeatable): gateway, analyst, ingest, admin")
    t.set_defaults(func=cmd_token_hash)
