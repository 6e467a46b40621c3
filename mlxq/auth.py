"""API keys: who a request comes from. Keys are only ever compared and stored as sha256 hashes; the
caller's identity (`owner_id`) is a prefix of that hash, so rows never hold a key itself."""

from __future__ import annotations

import hashlib
import secrets
import time

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from mlxq.sql import ApiKey, rowcount


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def owner_id(key_hash: str) -> str:
    return key_hash[:16]


def env_key_hashes(keys: str) -> set[str]:
    """The hashes of MLXQ_API_KEYS (comma-separated)."""
    return {hash_key(k.strip()) for k in keys.split(",") if k.strip()}


def add_key(*, session: Session, name: str) -> str:
    """A new key, stored hashed; the key itself is returned once and never again."""
    key = f"mlxq-{secrets.token_urlsafe(32)}"
    session.add(ApiKey(key_hash=hash_key(key), name=name, created_at=time.time()))
    return key


def list_keys(*, session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke_key(*, session: Session, prefix: str) -> int:
    """Revoke the keys whose owner id (hash prefix, as `mlxq keys list` shows) starts with `prefix`."""
    if len(prefix) < 6:
        raise ValueError("give at least 6 characters of the key's id")
    return rowcount(
        session.execute(
            update(ApiKey)
            .where(ApiKey.key_hash.startswith(prefix), ApiKey.revoked_at.is_(None))
            .values(revoked_at=time.time())
        )
    )


def stored_keys(*, session: Session) -> tuple[set[str], bool]:
    """(the hashes of the active stored keys, whether any key was ever stored): once one was, the service
    stays closed, even when every stored key is revoked."""
    rows = session.execute(select(ApiKey.key_hash, ApiKey.revoked_at)).all()
    return {h for h, revoked in rows if revoked is None}, bool(rows)
