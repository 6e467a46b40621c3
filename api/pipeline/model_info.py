"""The models this service serves and what the live workers say about each (vocabulary size, context length,
weights fingerprint), and which model a request's `model` names.

Each worker serves one model and its heartbeat row carries `stats["model"]`; the api reads the live workers
at most once every `ttl_s`, so checking a request against them costs no query on the hot path.
"""

from __future__ import annotations

import asyncio
import fnmatch
import time
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from api.errors import APIError
from mlxq.repos import workers
from mlxq.settings import Settings

# The code of the 503 a request gets when no worker of its model is alive to answer it (mlxq.settings.worker_wait_s).
WORKER_UNAVAILABLE = "worker_unavailable"


def worker_unavailable(model: str, wait_s: float) -> APIError:
    return APIError(
        503,
        f"No worker of the model `{model}` has been alive for {wait_s:g} s; start one, or retry later.",
        code=WORKER_UNAVAILABLE,
        headers={"Retry-After": "10"},
    )


class ModelInfo:
    """Per model, the newest `stats["model"]` block of its workers (None until one has published), cached briefly;
    the models workers serve, and those none has served for longer than a request waits for one (`lost`).

    A worker that stopped beating within `wait_s` (killed, or stopped: mlxq.repos.workers.retire_worker) still makes
    its model served: it is likely being restarted (`mlxq serve`, compose), and requests for it wait for it that long.
    """

    def __init__(
        self, sessions: sessionmaker[Session], *, within_s: float, wait_s: float = 120.0, ttl_s: float = 2.0
    ) -> None:
        self._sessions = sessions
        self._within_s = within_s
        self._wait_s = max(wait_s, within_s)
        self._ttl_s = ttl_s
        self._value: dict[str, dict[str, Any] | None] = {}
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()
        # Before this, a model no worker has served may have one loading (a fresh start): it is not lost yet.
        self._patience_until = time.monotonic() + self._wait_s

    @property
    def wait_s(self) -> float:
        return self._wait_s

    async def _blocks(self) -> dict[str, dict[str, Any] | None]:
        if time.monotonic() - self._read_at < self._ttl_s:
            return self._value
        async with self._lock:  # concurrent callers share one read, in a thread (never on the event loop)
            if time.monotonic() - self._read_at >= self._ttl_s:
                self._value = await asyncio.to_thread(self.read)
                self._read_at = time.monotonic()
        return self._value

    async def get(self, model: str) -> dict[str, Any] | None:
        """`{"vocab_size": int, "context_length": int | None, "fingerprint": str}` of `model`, or None."""
        return (await self._blocks()).get(model)

    async def live_models(self) -> set[str]:
        """The models a worker serves: one alive, or one that stopped beating within the wait (class doc)."""
        return set(await self._blocks())

    async def lost(self, model: str) -> bool:
        """No worker of `model` has beaten for longer than a request waits for one, and none can be loading for the
        first time: a request that needs inference would wait for nothing (a 503, not a hang). A refusal reads the
        workers again past the cache: a read taken while the successor loaded (a request refused, /health polled) kept
        refusing for its TTL after the worker was back."""
        if time.monotonic() <= self._patience_until or model in await self._blocks():
            return False
        self._read_at = float("-inf")
        return model not in await self._blocks()

    def read(self) -> dict[str, dict[str, Any] | None]:
        """Each recent worker's model and its newest block (a live worker's first: the vocabulary and context a
        restarting one published still bound requests while it loads), from the database now."""
        with self._sessions() as session:
            alive = {w.name for w in workers.live_workers(session=session, within_s=self._within_s)}
            recent = workers.live_workers(session=session, within_s=self._wait_s)
            rows = sorted(
                ((w.name in alive, w.last_seen, w.model, (w.stats or {}).get("model")) for w in recent),
                key=lambda row: row[:2],
            )
        out: dict[str, dict[str, Any] | None] = {}
        for *_, model, block in rows:  # dead before alive, oldest first: the newest live block of each model wins
            out[model] = block if isinstance(block, dict) else out.get(model)
        return out


def alias_target(settings: Settings, name: str) -> str | None:
    """The model `name` means by MLXQ_MODEL_ALIASES (a target of "" is the main model), or None."""
    for pattern, target in settings.model_aliases.items():
        if fnmatch.fnmatchcase(name, pattern):
            return target or settings.model_name
    return None


async def resolve_model(settings: Settings, model_info: ModelInfo, name: str) -> str:
    """The served model a request's `model` names: a model by its own name (the main one, one configured in
    MLXQ_MODELS, or one a live worker serves), else by an alias (by default every other name is the main
    model). A 404 for a name that is neither; a 503 naming the model when no worker serves it (the main model
    is always served: its worker may be starting, and jobs wait; so is one whose worker is likely restarting,
    `ModelInfo.live_models`)."""
    live = await model_info.live_models()
    known = set(settings.served_models) | live
    model = name if name in known else alias_target(settings, name)
    if model is None:
        served = ", ".join(f"`{m}`" for m in sorted(known))
        raise APIError(
            404,
            f"The model `{name}` does not exist; this server serves {served}.",
            code="model_not_found",
            param="model",
        )
    if model != settings.model_name and model not in live:
        raise APIError(
            503,
            f"No worker serves the model `{model}` now; start one (MLXQ_MODEL={model}) or retry later.",
            code="model_unavailable",
            param="model",
        )
    return model
