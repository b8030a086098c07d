"""Bearer API keys, each standing for one tenant. Only a key's SHA-256 is ever stored.

Keys come from the model config's ``gateway.api_keys`` (read at start-up) or from the Redis hash
``{prefix}:api-keys`` (read on each request, so that a key added or revoked with
``llm-worker api-key`` counts at once). A key is 256 random bits, so a plain SHA-256 is as
safe to store as a slow password hash, and lets a request be checked with one lookup.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from typing import Final, cast

import redis.asyncio as aioredis

from llm_pool_contracts import Keys

KEY_PREFIX: Final = "lpw-"  # so that a leaked key is recognisable (secret scanners match on prefixes)


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if that is what it is."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class ApiKeys:
    """Which tenant an API key acts for."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, configured: Mapping[str, str]) -> None:
        self.redis = redis
        self.keys = keys
        self.configured = dict(configured)

    async def tenant_of(self, authorization: str | None) -> str | None:
        """The tenant of the request's bearer key; None when there is no key or it is not known."""
        token = bearer_token(authorization)
        if token is None:
            return None
        digest = key_hash(token)
        tenant = self.configured.get(digest)
        if tenant is None:
            raw = await self.redis.hget(self.keys.api_keys, digest)
            tenant = raw.decode() if isinstance(raw, bytes) else raw
        return tenant

    async def add(self, tenant_id: str) -> str:
        """A new key for ``tenant_id``, stored by its hash; the key itself is returned once, here."""
        key = new_api_key()
        await self.redis.hset(self.keys.api_keys, key_hash(key), tenant_id)
        return key

    async def listing(self) -> list[tuple[str, str, str]]:
        """(hash, tenant, where it is kept) of every key."""
        stored = cast(dict[bytes, bytes], await self.redis.hgetall(self.keys.api_keys))
        rows = [(d.decode(), t.decode(), "redis") for d, t in stored.items()]
        return sorted(rows + [(d, t, "config") for d, t in self.configured.items()], key=lambda r: (r[1], r[0]))

    async def revoke(self, key_or_hash: str) -> list[str]:
        """Remove the Redis-kept keys that are ``key_or_hash``, or whose hash starts with it (8
        hex digits at least); returns their hashes. Keys in the config are removed from the config."""
        stored = [d.decode() for d in cast(list[bytes], await self.redis.hkeys(self.keys.api_keys))]
        if key_or_hash.startswith(KEY_PREFIX):
            matches = [d for d in stored if d == key_hash(key_or_hash)]
        elif len(key_or_hash) >= 8:
            matches = [d for d in stored if d.startswith(key_or_hash.lower())]
        else:
            raise ValueError("give the key, or at least 8 hex digits of its hash (llm-worker api-key list)")
        if len(matches) > 1:
            raise ValueError(f"{len(matches)} keys start with {key_or_hash}: give more of the hash")
        if matches:
            await self.redis.hdel(self.keys.api_keys, *matches)
        return matches
