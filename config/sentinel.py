"""Redis behind Sentinel: Celery's ``sentinel://h1:26379;sentinel://h2:26379/0`` URL, parsed once."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

SENTINEL_SCHEME = "sentinel"
DEFAULT_SENTINEL_MASTER = "mymaster"


@dataclass(frozen=True)
class SentinelTarget:
    """A Redis reached through Sentinel: the sentinels to ask, the master's name, the database."""

    sentinels: tuple[tuple[str, int], ...]
    master: str = DEFAULT_SENTINEL_MASTER
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def broker_url(self) -> str:
        """The URL as kombu's Sentinel transport reads it: it takes credentials and database from the
        first entry only, so every entry carries them."""
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        return ";".join(f"{SENTINEL_SCHEME}://{auth}{_netloc(host, port)}/{self.db}" for host, port in self.sentinels)


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_sentinel_url(url: str, master: str = DEFAULT_SENTINEL_MASTER) -> SentinelTarget | None:
    """``sentinel://h1:26379;sentinel://h2:26379/0`` (Celery's spelling) as a SentinelTarget; None for a
    plain Redis URL. A database or credentials given on any entry apply to all; entries may not disagree."""
    if urlsplit(url).scheme != SENTINEL_SCHEME:
        return None
    sentinels, dbs, users, passwords = [], set(), set(), set()
    for entry in url.split(";"):
        parts = urlsplit(entry.strip())
        if parts.scheme != SENTINEL_SCHEME or not parts.hostname:
            raise ValueError(f"{entry!r}: every entry must be sentinel://host:port")
        sentinels.append((parts.hostname, parts.port or 26379))
        if parts.path.strip("/"):
            dbs.add(int(parts.path.strip("/")))
        if parts.username:
            users.add(unquote(parts.username))
        if parts.password is not None:
            passwords.add(unquote(parts.password))
    if len(dbs) > 1 or len(users) > 1 or len(passwords) > 1:
        raise ValueError("the entries name different databases or credentials")
    return SentinelTarget(tuple(sentinels), master, dbs.pop() if dbs else 0, users.pop() if users else None,
                          passwords.pop() if passwords else None)
