"""``bloomq usage``: tokens and jobs over UTC days, by model, day or key (operators: any key, or all).

    bloomq usage [--start YYYY-MM-DD] [--end YYYY-MM-DD] [--group-by model|day|key] [--key NAME|all]
"""

from __future__ import annotations

import argparse
from typing import Any, Protocol

COLUMNS = ("prompt_tokens", "completion_tokens", "jobs")


class Caller(Protocol):
    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]: ...


def add_command(sub: argparse._SubParsersAction) -> None:
    usage = sub.add_parser("usage", help="tokens and jobs over UTC days (default: the last 30, by model)")
    usage.add_argument("--start", help="first UTC day, YYYY-MM-DD")
    usage.add_argument("--end", help="last UTC day, YYYY-MM-DD (default: today)")
    usage.add_argument("--group-by", choices=("model", "day", "key"), default="model")
    usage.add_argument("--key", help="operators: a key's name or owner id, or 'all'")


def run(client: Caller, args: argparse.Namespace) -> None:
    params = {"start": args.start, "end": args.end, "group_by": args.group_by, "key": args.key}
    report = client.call("GET", "/api/v1/usage", params={k: v for k, v in params.items() if v is not None})
    print(f"{report['start']} to {report['end']} (UTC), key {report['key']}")
    print(format_usage(report))


def format_usage(report: dict[str, Any]) -> str:
    """A table: the group, prompt tokens, completion tokens, jobs; then the totals."""
    group = report["group_by"]
    rows = [(group.upper(), "PROMPT", "COMPLETION", "JOBS")]
    rows += [(row[group], *(str(row[c]) for c in COLUMNS)) for row in report["data"]]
    rows.append(("total", *(str(report["totals"][c]) for c in COLUMNS)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join([row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:],
                                                                                             strict=True))])
                     for row in rows)
