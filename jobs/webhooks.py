"""Webhooks: URL policy (no SSRF), HMAC signatures, and delivery of a job resource.

A webhook POSTs the job resource as JSON with these headers:

- ``X-Bloomq-Timestamp``: Unix seconds when it was signed;
- ``X-Bloomq-Signature``: ``sha256=<hex>``, the HMAC-SHA256 of ``"<timestamp>.<body>"`` with the
  configured secret. Receivers recompute it and reject old timestamps;
- ``X-Bloomq-Event``: ``started`` or ``completed``;
- ``X-Bloomq-Event-Id``: the same on every try of one event (deliveries are at least once: receivers drop
  ids they have seen).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import io
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from jobs.outbox import Delivery
from jobs.store import JobStore

SIGNATURE_HEADER = "X-Bloomq-Signature"
TIMESTAMP_HEADER = "X-Bloomq-Timestamp"
EVENT_HEADER = "X-Bloomq-Event"
EVENT_ID_HEADER = "X-Bloomq-Event-Id"
DELIVERY_TIMEOUT = 15.0  # seconds for a whole attempt, however the receiver dribbles its answer
RESPONSE_CAP = 64 * 1024  # bytes of a receiver's answer read at most


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


# IPv6 ranges that carry an IPv4 address: the IPv4 address is where a packet goes, so it is judged too.
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 address in the last 32 bits
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated, still routed by some stacks: the last 32 bits
# Local-use NAT64 (RFC 8215): the IPv4 address sits where the operator's prefix length puts it, which cannot
# be known from here: refused whatever it holds.
UNJUDGEABLE = (ipaddress.ip_network("64:ff9b:1::/48"),)


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``address``, and any IPv4 address it carries (mapped, IPv4-compatible, NAT64, 6to4, Teredo),
    is a public unicast address."""
    if not address.is_global or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv4Address):
        return True
    if any(address in network for network in UNJUDGEABLE):
        return False
    embedded: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        embedded.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        embedded.append(address.sixtofour)
    if address.teredo is not None:
        embedded.extend(address.teredo)  # the relay server and the (unobfuscated) client
    if address in NAT64 or address in IPV4_COMPATIBLE:
        embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return all(_is_public(inner) for inner in embedded)


def check_url(url: str, allow: Iterable[str] = ()) -> list[str]:
    """Refuse anything but http(s) to public addresses, unless the host or its network is allow-listed.

    The host is resolved, and every address it resolves to must pass: loopback, link-local, private,
    reserved, multicast and unspecified addresses are refused (no SSRF into the deployment's network), and so
    is an IPv6 address that carries such an IPv4 address (``_is_public``) or whose IPv4 part cannot be told.
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
        if _is_public(address):
            continue
        if not _allowed(address, host, allow):
            raise WebhookURLError(
                f"webhook host {host!r} resolves to a non-public address ({address}); "
                "allow it with BLOOMQ_WEBHOOK_ALLOW if that is intended"
            )
    return addresses


class WebhookTimeout(TimeoutError):
    """A delivery that did not get its answer within its deadline."""


class WebhookResponseTooLarge(RuntimeError):
    """A receiver whose answer's status line and headers ran past the byte cap."""


class _Deadline:
    """Cuts a connection off at a fixed time, whatever it is doing then.

    A socket timeout bounds one read; a receiver that drips a byte at a time never lets a read time out,
    so a watchdog shuts the socket down at the deadline instead, which ends the blocked read at once.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._end = time.monotonic() + seconds
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def remaining(self) -> float:
        """Seconds left, at least a little (a socket timeout of 0 would mean non-blocking)."""
        return max(0.001, self._end - time.monotonic())

    def watch(self, sock: socket.socket) -> None:
        """The socket to shut down at the deadline (at once if it has passed)."""
        with self._lock:
            self._sock = sock
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            if self._sock is not None:
                _shut(self._sock)


def _shut(sock: socket.socket) -> None:
    try:
        # The plain socket's shutdown, also for a TLS socket: it ends a read blocked in another thread.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class _CappedReader(io.RawIOBase):
    """Reads at most ``cap`` bytes from a socket, then refuses to read more."""

    def __init__(self, sock: socket.socket, cap: int) -> None:
        super().__init__()
        self._sock = sock
        self._left = cap
        self._cap = cap

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            raise WebhookResponseTooLarge(f"the receiver's answer ran past {self._cap} bytes")
        with memoryview(buffer) as view:
            count = self._sock.recv_into(view[: self._left])
        self._left -= count
        return count


class _CappedSocket:
    """What ``http.client.HTTPResponse`` reads the answer from: the socket, through a byte cap."""

    def __init__(self, sock: socket.socket, cap: int) -> None:
        self._sock = sock
        self._cap = cap

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_CappedReader(self._sock, self._cap))


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to a vetted address, watched by a deadline, its answer read through a cap.

    It connects to the address that passed the check (not to whatever the name resolves to now), which
    closes the DNS rebinding gap: a name that answered with a public address for the check cannot answer
    with an internal one for the connection. TLS still checks the certificate for (and sends SNI with)
    the URL's host, and ``Host`` names it too.
    """

    def __init__(self, host: str, port: int, address: str, deadline: _Deadline, cap: int,
                 tls: ssl.SSLContext | None) -> None:
        super().__init__(host, port, timeout=deadline.seconds)
        self.default_port = 443 if tls is not None else 80  # ``Host`` names the port only when it is not this
        self.address = address
        self.deadline = deadline
        self.cap = cap
        self.tls = tls

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.deadline.remaining())
        self.deadline.watch(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            # Watched before the handshake, so a receiver that drips its handshake is cut off too.
            sock = self.tls.wrap_socket(sock, server_hostname=self.host, do_handshake_on_connect=False)
            self.deadline.watch(sock)
            sock.do_handshake()
        self.sock = sock

    def response_class(self, sock: socket.socket, *args: Any, **kwargs: Any) -> http.client.HTTPResponse:  # type: ignore[override]
        return http.client.HTTPResponse(_CappedSocket(sock, self.cap), *args, **kwargs)  # type: ignore[arg-type]


class WebhookSender:
    """Delivers one event of one job: the current resource, signed, within a deadline.

    ``timeout``: seconds for a whole attempt (the address check, connecting, TLS, sending, and reading the
    status and headers); ``response_cap``: bytes of the answer read at most (its body is never read: the
    status is all that counts).
    """

    def __init__(self, store: JobStore, secret: str, allow: Iterable[str] = (),
                 timeout: float = DELIVERY_TIMEOUT, response_cap: int = RESPONSE_CAP) -> None:
        self.store = store
        self.secret = secret
        self.allow = list(allow)
        self.timeout = timeout
        self.response_cap = response_cap
        self._tls = ssl.create_default_context()

    def deliver(self, delivery: Delivery) -> None:
        """POST the job resource to its webhook; raise on any failure (the dispatcher retries)."""
        job = self.store.get(delivery.job_id)
        if job is None or not job.webhook:
            return  # past retention: nothing left to tell
        with _Deadline(self.timeout) as deadline:
            # Checked again at delivery (DNS may have changed since submission), then pinned to what passed.
            addresses = check_url(job.webhook, self.allow)
            body = json.dumps(job.to_resource(operator=False), ensure_ascii=False).encode()  # the user's view
            timestamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                TIMESTAMP_HEADER: str(timestamp),
                SIGNATURE_HEADER: sign(self.secret, timestamp, body),
                EVENT_HEADER: delivery.event,
                EVENT_ID_HEADER: delivery.id,
                "User-Agent": "bloomq-webhook/1",
                "Connection": "close",
            }
            status = self._post(job.webhook, addresses[0], body, headers, deadline)
        if status >= 300:
            raise RuntimeError(f"webhook answered {status}")

    def _post(self, url: str, address: str, body: bytes, headers: dict[str, str], deadline: _Deadline) -> int:
        parts = urlsplit(url)
        tls = self._tls if parts.scheme == "https" else None
        port = parts.port or (443 if tls is not None else 80)
        path = urlunsplit(("", "", parts.path or "/", parts.query, ""))
        connection = _PinnedConnection(parts.hostname or "", port, address, deadline, self.response_cap, tls)
        try:
            connection.request("POST", path, body=body, headers=headers)
            return connection.getresponse().status  # the body is left unread
        except (OSError, http.client.HTTPException) as exc:
            if deadline.expired:
                raise WebhookTimeout(f"no answer within {deadline.seconds:g}s") from exc
            raise
        finally:
            connection.close()
