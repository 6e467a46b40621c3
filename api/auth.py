"""Who is asking: the API key on a request (Authorization: Bearer, or x-api-key as Anthropic clients send
it), checked against MLXQ_API_KEYS and the keys stored hashed in the database. With no key anywhere,
the service is open (the embedded default on 127.0.0.1) and every caller is the same anonymous owner."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from api.errors import APIError
from mlxq import auth
from mlxq.settings import Settings

# Stored keys are re-read this often: a revoked key stops working within it.
REFRESH_S = 5.0


class Authenticator:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self._env = auth.env_key_hashes(settings.api_keys.get_secret_value())
        self._sessions = sessions
        self._stored: set[str] = set()
        self._closed = bool(self._env)
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    def _read(self) -> tuple[set[str], bool]:
        with self._sessions() as session:
            return auth.stored_keys(session=session)

    async def _valid(self) -> set[str] | None:
        """The valid key hashes; None when the service is open (no key was ever configured)."""
        if time.monotonic() - self._read_at >= REFRESH_S:
            async with self._lock:
                if time.monotonic() - self._read_at >= REFRESH_S:
                    self._stored, any_stored = await asyncio.to_thread(self._read)
                    self._closed = bool(self._env) or any_stored
                    self._read_at = time.monotonic()
        return self._env | self._stored if self._closed else None

    async def owner(self, request: Request) -> str | None:
        """The caller's owner id; None when no key is configured. A missing or unknown key is a 401."""
        valid = await self._valid()
        if valid is None:
            return None
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not key:
            raise APIError(
                401, "An API key is required: send Authorization: Bearer <key> (or x-api-key).", code="missing_api_key"
            )
        digest = auth.hash_key(key)
        if digest not in valid:
            raise APIError(401, "The API key is not valid.", code="invalid_api_key")
        return auth.owner_id(digest)


async def authenticate(request: Request) -> None:
    """The routers' dependency: a 401 (in the caller's dialect) without a valid key; the caller's owner id
    on `request.state.owner` otherwise."""
    request.state.owner = await request.app.state.services.auth.owner(request)


def owner_of(request: Request) -> str | None:
    return getattr(request.state, "owner", None)


Owner = Annotated[str | None, Depends(owner_of)]


def owns(owner: str | None, row_owner: str | None) -> bool:
    """Whether the caller (`owner`: None with keys off) may see a stored object of `row_owner`'s: another key's job,
    batch, file or response is as absent as an unknown one (a 404, never a 403 that tells it exists)."""
    return owner is None or row_owner == owner


AUTHENTICATED = [Depends(authenticate)]
