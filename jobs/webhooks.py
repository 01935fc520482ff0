"""Webhooks: URL policy (no SSRF), HMAC signatures, and delivery of a job resource.

A webhook POSTs the job resource as JSON with two headers:

- ``X-Bloomq-Timestamp``: Unix seconds when it was signed;
- ``X-Bloomq-Signature``: ``sha256=<hex>``, the HMAC-SHA256 of ``"<timestamp>.<body>"`` with the
  configured secret. Receivers recompute it and reject old timestamps.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import time
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

import requests
import requests.adapters

from jobs.store import JobStore

SIGNATURE_HEADER = "X-Bloomq-Signature"
TIMESTAMP_HEADER = "X-Bloomq-Timestamp"
EVENT_HEADER = "X-Bloomq-Event"
DELIVERY_TIMEOUT = 10  # seconds per attempt


class WebhookURLError(ValueError):
    """A webhook URL that bloomq will not call."""


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """``sha256=<hex>`` over ``"<timestamp>.<body>"``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: int, body: bytes, signature: str, max_age: int = 300) -> bool:
    """What a receiver does: a matching signature on a recent timestamp."""
    if abs(time.time() - timestamp) > max_age:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def _allowed(address: ipaddress.IPv4Address | ipaddress.IPv6Address, host: str, allow: Iterable[str]) -> bool:
    for entry in allow:
        if entry == host:
            return True
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def check_url(url: str, allow: Iterable[str] = ()) -> list[str]:
    """Refuse anything but http(s) to public addresses, unless the host or its network is allow-listed.

    The host is resolved, and every address it resolves to must pass: loopback, link-local, private,
    reserved, multicast and unspecified addresses are refused (no SSRF into the deployment's network).
    """
    allow = list(allow)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise WebhookURLError("webhook must be an http or https URL")
    host = parts.hostname
    if not host:
        raise WebhookURLError("webhook URL has no host")
    if parts.username or parts.password:
        raise WebhookURLError("webhook URL must not carry credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, ValueError) as exc:
        raise WebhookURLError(f"webhook host {host!r} does not resolve") from exc
    addresses = []
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        addresses.append(str(address))
        if address.is_global and not address.is_multicast:
            continue
        if not _allowed(address, host, allow):
            raise WebhookURLError(
                f"webhook host {host!r} resolves to a non-public address ({address}); "
                "allow it with BLOOMQ_WEBHOOK_ALLOW if that is intended"
            )
    return addresses


class _PinnedTLS(requests.adapters.HTTPAdapter):
    """Connects to a vetted IP address while checking the certificate (and sending SNI) for the host."""

    def __init__(self, host: str) -> None:
        self.host = host
        super().__init__()

    def init_poolmanager(self, *args: object, **kwargs: object) -> None:
        kwargs["server_hostname"] = self.host
        kwargs["assert_hostname"] = self.host
        super().init_poolmanager(*args, **kwargs)


def _pinned_request(url: str, address: str) -> tuple[str, requests.Session, str]:
    """The URL rewritten to ``address``, a session that verifies TLS for the original host, and the Host.

    Connecting to the address that passed the check (not resolving the name again) closes the DNS
    rebinding gap: a name that answered with a public address for the check cannot answer with an
    internal one for the connection.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    literal = f"[{address}]" if ":" in address else address
    netloc = f"{literal}:{parts.port}" if parts.port else literal
    session = requests.Session()
    if parts.scheme == "https":
        session.mount("https://", _PinnedTLS(host))
    host_header = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc)), session, host_header


class WebhookSender:
    """Delivers one event for one job: the current resource, signed."""

    def __init__(self, store: JobStore, secret: str, allow: Iterable[str] = ()) -> None:
        self.store = store
        self.secret = secret
        self.allow = list(allow)

    def deliver(self, job_id: str, event: str) -> None:
        """POST the job resource to its webhook; raise on any failure (the task retries)."""
        job = self.store.get(job_id)
        if job is None or not job.webhook:
            return
        # Checked again at delivery (DNS may have changed since submission), then pinned to what passed.
        addresses = check_url(job.webhook, self.allow)
        url, session, host = _pinned_request(job.webhook, addresses[0])
        body = json.dumps(job.to_resource(), ensure_ascii=False).encode()
        timestamp = int(time.time())
        response = session.post(
            url,
            data=body,
            headers={
                "Host": host,
                "Content-Type": "application/json",
                TIMESTAMP_HEADER: str(timestamp),
                SIGNATURE_HEADER: sign(self.secret, timestamp, body),
                EVENT_HEADER: event,
                "User-Agent": "bloomq-webhook/1",
            },
            timeout=DELIVERY_TIMEOUT,
            allow_redirects=False,
        )
        if response.status_code >= 300:
            raise RuntimeError(f"webhook answered {response.status_code}")
