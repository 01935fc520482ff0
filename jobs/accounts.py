"""API keys managed at run time: their records in Redis, and who a secret belongs to.

A secret is 32 random bytes (``bq_`` + URL-safe base64), shown once when the key is made and stored
nowhere: Redis holds its SHA-256. A fast hash is the right one for random secrets: 256 bits cannot be
guessed however fast each guess is, and every request looks its key up by that hash (a password-style
slow hash would cost each request and protect nothing more). A key's owner id, what its jobs record, is
``key:`` + the first 12 hex digits of the hash, the same rule as for the keys read from the environment.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from datetime import UTC, datetime
from typing import Annotated, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from jobs.connection import as_text
from jobs.keys import API_KEY_NAMES, API_KEY_PREFIX, api_key_key

Role = Literal["user", "operator"]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
KeyName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Limit = Annotated[int, Field(ge=1, le=2**53)]
SECRET_PREFIX = "bq_"
LIMIT_FIELDS = ("tokens_per_day", "max_active_jobs", "file_bytes")
LAST_USED_EVERY = 60.0  # seconds between two writes of a key's last use, per process


def key_hash(secret: str) -> str:
    """The SHA-256 (hex) of a secret: how every key is known."""
    return hashlib.sha256(secret.encode()).hexdigest()


def owner_id(digest: str) -> str:
    """The short, non-secret id of a key: what jobs record as their owner."""
    return "key:" + digest[:12]


class KeyLimits(BaseModel):
    """What a key may use; null: no limit."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tokens_per_day: Limit | None = Field(default=None, description="Prompt + completion tokens per UTC day")
    max_active_jobs: Limit | None = Field(default=None, description="Jobs queued or running at once")
    file_bytes: Limit | None = Field(default=None, description="Bytes of uploaded files held at once")


class KeyCreate(KeyLimits):
    """``POST /api/v1/keys``: a new key."""

    name: KeyName = Field(description="Unique; letters, digits, '_', '.', '-' (1-64)")
    role: Role = "user"


class KeyUpdate(KeyLimits):
    """``PATCH /api/v1/keys/{name}``: the limits given are changed (null removes one), the rest kept."""


class KeyInfo(KeyLimits):
    """A key as listed: never its secret."""

    model_config = ConfigDict(extra="forbid")

    name: str
    role: Role
    owner: str = Field(description="The id its jobs record as their owner")
    created: datetime
    last_used: datetime | None = None


class NewKey(KeyInfo):
    """A key just made, with its secret: shown this once."""

    secret: str


# A name is taken and its record written in one step, so a name never points to nothing.
_CREATE = """
if redis.call('hexists', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('hset', KEYS[1], ARGV[1], ARGV[2])
redis.call('hset', KEYS[2], unpack(ARGV, 3))
return 1
"""
# Changes a key that still exists: fields to set, then fields to remove (ARGV[1] = how many to set).
_UPDATE = """
local digest = redis.call('hget', KEYS[1], ARGV[2])
if not digest then return nil end
local record = KEYS[2] .. digest
local sets = tonumber(ARGV[1])
for i = 3, 2 + 2 * sets, 2 do redis.call('hset', record, ARGV[i], ARGV[i + 1]) end
for i = 3 + 2 * sets, #ARGV do redis.call('hdel', record, ARGV[i]) end
return digest
"""
_REVOKE = """
local digest = redis.call('hget', KEYS[1], ARGV[1])
if not digest then return 0 end
redis.call('hdel', KEYS[1], ARGV[1])
redis.call('del', KEYS[2] .. digest)
return 1
"""
_TOUCH = "if redis.call('exists', KEYS[1]) == 1 then redis.call('hset', KEYS[1], 'last_used', ARGV[1]) end"


class KeyBook:
    """The keys made over the API, in Redis (the keys from the environment are not here)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._create = client.register_script(_CREATE)
        self._update = client.register_script(_UPDATE)
        self._revoke = client.register_script(_REVOKE)
        self._touch = client.register_script(_TOUCH)
        self._touched: dict[str, float] = {}

    def create(self, request: KeyCreate) -> NewKey | None:
        """A new key and its secret; None when the name is taken."""
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        digest = key_hash(secret)
        fields = {"name": request.name, "role": request.role, "created": f"{time.time():.3f}"}
        fields |= {name: str(value) for name in LIMIT_FIELDS if (value := getattr(request, name)) is not None}
        flat = [item for pair in fields.items() for item in pair]
        if not self._create(keys=[API_KEY_NAMES, api_key_key(digest)], args=[request.name, digest, *flat]):
            return None
        return NewKey(**self._info(digest, fields).model_dump(), secret=secret)

    def find(self, digest: str) -> KeyInfo | None:
        """The key whose secret has this hash, or None (never made, or revoked)."""
        fields = self.redis.hgetall(api_key_key(digest))
        return self._info(digest, {as_text(k): as_text(v) for k, v in fields.items()}) if fields else None

    def named(self, name: str) -> KeyInfo | None:
        """The key called ``name``, or None."""
        digest = self.redis.hget(API_KEY_NAMES, name)
        return self.find(as_text(digest)) if digest else None

    def all(self) -> list[KeyInfo]:
        """Every key, by name."""
        digests = {as_text(name): as_text(digest) for name, digest in self.redis.hgetall(API_KEY_NAMES).items()}
        pipe = self.redis.pipeline(transaction=False)
        for digest in digests.values():
            pipe.hgetall(api_key_key(digest))
        found = []
        for digest, fields in zip(digests.values(), pipe.execute(), strict=True):
            if fields:
                found.append(self._info(digest, {as_text(k): as_text(v) for k, v in fields.items()}))
        return sorted(found, key=lambda info: info.name)

    def update(self, name: str, changes: KeyUpdate) -> KeyInfo | None:
        """Apply the limits ``changes`` names (null removes a limit); None when there is no such key."""
        given = changes.model_dump(include=changes.model_fields_set)
        sets = {field: str(value) for field, value in given.items() if value is not None}
        removes = [field for field, value in given.items() if value is None]
        args = [len(sets), name, *[item for pair in sets.items() for item in pair], *removes]
        digest = self._update(keys=[API_KEY_NAMES, API_KEY_PREFIX], args=args)
        return self.find(as_text(digest)) if digest else None

    def revoke(self, name: str) -> bool:
        """Forget a key: its next request is refused. False when there is no such key."""
        return bool(self._revoke(keys=[API_KEY_NAMES, API_KEY_PREFIX], args=[name]))

    def touch(self, digest: str) -> None:
        """Note that the key was used now (at most once a minute per process; never brings a key back)."""
        now = time.time()
        if now - self._touched.get(digest, 0.0) < LAST_USED_EVERY:
            return
        self._touched[digest] = now
        self._touch(keys=[api_key_key(digest)], args=[f"{now:.3f}"])

    @staticmethod
    def _info(digest: str, fields: dict[str, str]) -> KeyInfo:
        limits = {name: int(fields[name]) for name in LIMIT_FIELDS if fields.get(name)}
        last_used = fields.get("last_used")
        return KeyInfo(name=fields["name"], role=fields["role"], owner=owner_id(digest),  # type: ignore[arg-type]
                       created=datetime.fromtimestamp(float(fields["created"]), UTC),
                       last_used=datetime.fromtimestamp(float(last_used), UTC) if last_used else None, **limits)
