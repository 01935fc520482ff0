"""``bloomq keys``: make, list, change and revoke API keys (an operator key's business; over HTTP).

    bloomq keys create NAME [--role user|operator] [--tokens-per-day N] [--max-active-jobs N] [--file-bytes N]
    bloomq keys list
    bloomq keys update NAME [--tokens-per-day N|none] [--max-active-jobs N|none] [--file-bytes N|none]
    bloomq keys revoke NAME
"""

from __future__ import annotations

import argparse
from typing import Any, Protocol

LIMITS = ("tokens_per_day", "max_active_jobs", "file_bytes")


class Caller(Protocol):
    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]: ...


def _limit(text: str) -> int | None:
    """A limit: a positive number, or ``none`` (no limit)."""
    if text.lower() == "none":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1 (or none)")
    return value


def add_commands(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="manage API keys (needs an operator key)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a key and print its secret (shown once)")
    create.add_argument("name")
    create.add_argument("--role", choices=("user", "operator"), default="user")
    update = actions.add_parser("update", help="change a key's limits ('none' removes one)")
    update.add_argument("name")
    for parser in (create, update):
        for limit in LIMITS:
            parser.add_argument(f"--{limit.replace('_', '-')}", dest=limit, type=_limit, default=argparse.SUPPRESS)
    actions.add_parser("list", help="list keys: names, roles, limits, last use (never secrets)")
    actions.add_parser("revoke", help="revoke a key: its next request is refused").add_argument("name")


def run(client: Caller, args: argparse.Namespace) -> None:
    limits = {name: getattr(args, name) for name in LIMITS if hasattr(args, name)}
    if args.action == "create":
        made = client.call("POST", "/api/v1/keys", json={"name": args.name, "role": args.role, **limits})
        print(made["secret"])
        print(f"key {made['name']!r} ({made['role']}): keep the secret above, it is not shown again")
    elif args.action == "list":
        print(format_keys(client.call("GET", "/api/v1/keys")["keys"]))
    elif args.action == "update":
        print(format_keys([client.call("PATCH", f"/api/v1/keys/{args.name}", json=limits)]))
    elif args.action == "revoke":
        client.call("DELETE", f"/api/v1/keys/{args.name}")
        print(f"key {args.name!r} revoked")


def format_keys(keys: list[dict[str, Any]]) -> str:
    """A table of keys: name, role, the limits (- for none), when made and last used (UTC, to the minute)."""
    if not keys:
        return "no keys"
    rows = [("NAME", "ROLE", "TOKENS/DAY", "ACTIVE JOBS", "FILE BYTES", "CREATED", "LAST USED")]
    for key in keys:
        rows.append((key["name"], key["role"], *(str(key[limit] or "-") for limit in LIMITS),
                     _minute(key["created"]), _minute(key["last_used"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def _minute(stamp: str | None) -> str:
    return stamp[:16].replace("T", " ") if stamp else "-"
