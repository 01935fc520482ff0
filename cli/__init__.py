"""``bloomq``: a command-line client for the REST API (it talks HTTP only).

    bloomq submit "Once upon a time" [--model NAME] [--param max_new_tokens=64 ...] [--wait | --stream]
    bloomq status JOB_ID
    bloomq cancel JOB_ID
    bloomq models
    bloomq jobs [--status STATUS] [--limit N]
    bloomq keys create|list|update|revoke ...   (an operator key; see cli/keys.py)
    bloomq usage [--start DAY] [--end DAY] [--group-by model|day|key] [--key NAME|all]

The server is ``$BLOOMQ_URL`` (default ``http://127.0.0.1:5000``) or ``--url``; the API key, when the
server requires one, ``$BLOOMQ_API_KEY`` or ``--api-key``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import requests
from tqdm import tqdm

from cli import keys, usage

DEFAULT_URL = "http://127.0.0.1:5000"
TERMINAL = ("succeeded", "failed", "canceled")
TERMINAL_AND_OPEN = ("queued", "running", *TERMINAL)


class ClientError(Exception):
    """The server said no; the message is its error."""


class Client:
    """A thin wrapper over the REST API."""

    def __init__(self, base_url: str, timeout: float = 30, api_key: str | None = None) -> None:
        self.base = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        kwargs.setdefault("timeout", self.timeout)
        response = self.session.request(method, self.base + path, **kwargs)
        body = response.json() if response.headers.get("Content-Type", "").startswith("application/json") else {}
        if response.status_code >= 400:
            error = body.get("error", {})
            fields = "; ".join(f"{f['name']}: {f['message']}" for f in error.get("fields", []))
            raise ClientError(f"{response.status_code} {error.get('message', response.reason)}"
                              + (f" ({fields})" if fields else ""))
        return body

    def submit(self, inputs: str, model: str | None, parameters: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"inputs": inputs, "parameters": parameters}
        if model:
            body["model"] = model
        return self.call("POST", "/api/v1/jobs", json=body)

    def get(self, job_id: str, wait: float = 0) -> dict[str, Any]:
        params = {"wait": wait} if wait else None
        return self.call("GET", f"/api/v1/jobs/{job_id}", params=params, timeout=self.timeout + wait)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.call("POST", f"/api/v1/jobs/{job_id}/cancel")

    def models(self) -> list[dict[str, Any]]:
        return self.call("GET", "/api/v1/models")["models"]

    def jobs(self, limit: int, status: str | None = None) -> list[dict[str, Any]]:
        """Up to ``limit`` of this key's jobs, newest first (following the listing's pages)."""
        found: list[dict[str, Any]] = []
        cursor = None
        while len(found) < limit:
            params = {"limit": min(limit - len(found), 100), "status": status, "cursor": cursor}
            page = self.call("GET", "/api/v1/jobs", params={k: v for k, v in params.items() if v is not None})
            found += page["jobs"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        return found[:limit]

    def events(self, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event, data) pairs from the job's event stream, reconnecting with Last-Event-ID until done."""
        last_id = None
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_id:
                headers["Last-Event-ID"] = last_id
            with self.session.get(f"{self.base}/api/v1/jobs/{job_id}/events", headers=headers, stream=True,
                                  timeout=(self.timeout, 60)) as response:
                if response.status_code >= 400:
                    raise ClientError(f"{response.status_code} {response.text}")
                event, data, event_id = "message", [], None
                for line in response.iter_lines(decode_unicode=True):
                    if line == "":
                        if data:
                            last_id = event_id or last_id
                            payload = json.loads("\n".join(data))
                            yield event, payload
                            if event == "done":
                                return
                        event, data, event_id = "message", [], None
                    elif line.startswith(":"):
                        continue
                    else:
                        name, _, value = line.partition(":")
                        value = value[1:] if value.startswith(" ") else value
                        if name == "event":
                            event = value
                        elif name == "data":
                            data.append(value)
                        elif name == "id":
                            event_id = value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parse_param(text: str) -> tuple[str, Any]:
    """``k=v``; v is read as JSON when it can be (numbers, true/false, lists), else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _print_job(job: dict[str, Any]) -> None:
    print(json.dumps(job, indent=2, ensure_ascii=False))


PROMPT_CHARS = 40


def format_jobs(jobs: list[dict[str, Any]]) -> str:
    """A table of jobs: id, status, model, created (UTC, to the second), the prompt's first characters."""
    rows = [("ID", "STATUS", "MODEL", "CREATED", "INPUTS")]
    for job in jobs:
        inputs = " ".join(job["inputs"].split())
        if len(inputs) > PROMPT_CHARS:
            inputs = inputs[: PROMPT_CHARS - 1] + "…"
        created = job["created_at"][:19].replace("T", " ")
        rows.append((job["id"], job["status"], job["model"], created, inputs))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]  # the prompt, last, is not padded
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)), row[4]])
                     for row in rows)


def _wait_with_progress(client: Client, job: dict[str, Any]) -> dict[str, Any]:
    total = job["parameters"].get("max_new_tokens") or None
    with tqdm(total=total, unit="tok", desc=job["status"], file=sys.stderr, leave=False) as bar:
        while job["status"] not in TERMINAL:
            job = client.get(job["id"], wait=1)
            done = (job.get("output") or {}).get("generated_tokens", 0)
            bar.set_description(job["status"])
            bar.update(max(0, done - bar.n))
        if job["status"] == "succeeded":  # it may end early (an end-of-text token, a stop sequence): end full
            bar.total = bar.n
        bar.refresh()  # the last figures, whatever the bar's refresh interval let through
    return job


def _stream(client: Client, job: dict[str, Any]) -> dict[str, Any]:
    final, attempt = job, 0
    for event, data in client.events(job["id"]):
        if event == "status" and data.get("attempt", 0) > attempt:
            if attempt:
                sys.stdout.write("\n[the job restarted on another worker; its text starts over]\n")
            attempt = data["attempt"]
        elif event == "restart" and data.get("attempt") == attempt:
            sys.stdout.write("\n[the worker started the text over]\n")
        elif event == "token" and data.get("attempt", attempt) == attempt:
            sys.stdout.write(data["text"])
            sys.stdout.flush()
        elif event == "done":
            final = data
    sys.stdout.write("\n")
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bloomq", description="Talk to a bloomq server over its REST API.")
    parser.add_argument("--url", default=os.environ.get("BLOOMQ_URL", DEFAULT_URL), help="server base URL")
    parser.add_argument("--api-key", default=os.environ.get("BLOOMQ_API_KEY"),
                        help="API key, when the server requires one (default: $BLOOMQ_API_KEY)")
    sub = parser.add_subparsers(dest="command", required=True)
    submit = sub.add_parser("submit", help="submit a prompt")
    submit.add_argument("prompt")
    submit.add_argument("--model")
    submit.add_argument("--param", "-p", action="append", type=parse_param, default=[], metavar="KEY=VALUE")
    mode = submit.add_mutually_exclusive_group()
    mode.add_argument("--wait", action="store_true", help="wait, showing progress, then print the job")
    mode.add_argument("--stream", action="store_true", help="print the text as it is generated")
    for name, text in (("status", "show a job"), ("cancel", "cancel a job")):
        sub.add_parser(name, help=text).add_argument("job_id")
    sub.add_parser("models", help="list models with queue depth and live workers")
    jobs = sub.add_parser("jobs", help="list your jobs, newest first")
    jobs.add_argument("--status", choices=TERMINAL_AND_OPEN, help="only jobs in this state")
    jobs.add_argument("--limit", type=_positive, default=20, help="how many to show (default 20)")
    keys.add_commands(sub)
    usage.add_command(sub)
    args = parser.parse_args(argv)

    client = Client(args.url, api_key=args.api_key)
    try:
        if args.command == "submit":
            job = client.submit(args.prompt, args.model, dict(args.param))
            if args.stream:
                job = _stream(client, job)
                return 0 if job["status"] == "succeeded" else 1
            if args.wait:
                job = _wait_with_progress(client, job)
                _print_job(job)
                return 0 if job["status"] == "succeeded" else 1
            print(job["id"])
        elif args.command == "status":
            _print_job(client.get(args.job_id))
        elif args.command == "cancel":
            result = client.cancel(args.job_id)
            print(result["message"])
            print(result["job"]["status"])
        elif args.command == "models":
            for model in client.models():
                print(f"{model['name']:<24} workers={model['workers']:<3} queued={model['queue_depth']:<5} "
                      f"{'(default)' if model['default'] else ''}")
        elif args.command == "jobs":
            listed = client.jobs(args.limit, args.status)
            print(format_jobs(listed) if listed else "no jobs")
        elif args.command == "keys":
            keys.run(client, args)
        elif args.command == "usage":
            usage.run(client, args)
    except ClientError as exc:
        print(f"bloomq: {exc}", file=sys.stderr)
        return 2
    except requests.ConnectionError:
        print(f"bloomq: cannot reach {args.url}", file=sys.stderr)
        return 2
    return 0
