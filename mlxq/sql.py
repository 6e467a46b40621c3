"""SQL tables shared by api and worker. Timestamps are epoch seconds (portable across SQLite and PostgreSQL)."""

from __future__ import annotations

import builtins
from typing import Any, cast

from sqlalchemy import JSON, BigInteger, Boolean, Float, Index, Integer, LargeBinary, String, Text, false, text, true
from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.functions import FunctionElement


class db_now(FunctionElement):  # noqa: N801 - used like func.now()
    """The database server's clock in epoch seconds: the one clock every api and worker reads for
    liveness, however far their own clocks drift apart."""

    type = Float()
    inherit_cache = True


@compiles(db_now, "sqlite")
def _sqlite_now(element, compiler, **kw) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"


@compiles(db_now, "postgresql")
def _pg_now(element, compiler, **kw) -> str:
    return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"


def rowcount(result: Result) -> int:
    """The rows an UPDATE or DELETE matched (`rowcount or 0`). `Session.execute` is typed as returning a
    plain `Result`, but for these statements it returns a `CursorResult`, which has `rowcount`."""
    return cast(CursorResult, result).rowcount or 0


class Base(DeclarativeBase):
    pass


class CacheEntry(Base):
    """One cached response, keyed by the sha256 of the canonical request."""

    __tablename__ = "cache_entries"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(255))
    result: Mapped[dict[str, Any]] = mapped_column(JSON)
    size_bytes: Mapped[int] = mapped_column(Integer)
    hits: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    last_access_at: Mapped[float] = mapped_column(Float, index=True)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The API key's namespace that stored it ("" when the cache is global or keys are off).
    namespace: Mapped[str] = mapped_column(String(64), default="", server_default="", index=True)


class Job(Base):
    """A generation request's life: queued -> running -> succeeded | failed | cancelled."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), index=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Whether the worker may write the result into the response cache.
    store: Mapped[bool] = mapped_column(Boolean, default=True)
    ttl_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    # mlxq.contract.Priority: interactive requests are admitted to the batch before low-priority work.
    priority: Mapped[str] = mapped_column(String(16), default="interactive", server_default="interactive")
    # Whether a client streams it: only then does the worker publish per-token deltas (a waiting
    # non-streamed client needs the result alone, and a delta per token per job costs CPU in a batch).
    stream: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # Where mlxq.delivery sent it (a worker's name: its own queue), why (mlxq.states.RouteReason), how many
    # of its message boundaries that worker's prefix cache held, and the session that keeps it there.
    target: Mapped[str | None] = mapped_column(String(255), nullable=True, index=True)
    route_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)
    route_matched: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    session: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Times a worker started it: a job whose worker died runs again until `max_attempts`.
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When its task message was last sent: a queued job whose message was lost is sent again.
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Clients waiting for it: a client that goes away cancels the job only when it was the last one.
    waiters: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Only clients connected to an api wait for it (a sync or streamed request, not a submitted job, a batch line or
    # a background response): when that api is gone, so is every reason to run it (`cancel_orphans`).
    attached: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The path the client called (`/v1/messages`, ...): a job's kind is shared by every dialect's chat. None on rows
    # made before it was kept.
    endpoint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The batch that made it (its lines' jobs are cancelled with it).
    batch_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    # The API key that made it (mlxq.auth.owner_id; None with keys off) and its cache namespace.
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    namespace: Mapped[str] = mapped_column(String(64), default="", server_default="")
    # The answer's usage, kept beside it so a batch's usage is one SUM, not a JSON walk.
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cached_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)

    __table_args__ = (
        Index("ix_jobs_key_status", "key", "status"),
        # Single flight across threads and api replicas: one storing job per request key in flight.
        Index(
            "uq_jobs_inflight_key",
            "key",
            unique=True,
            sqlite_where=text("status IN ('queued', 'running') AND store"),
            postgresql_where=text("status IN ('queued', 'running') AND store"),
        ),
    )


class ApiKey(Base):
    """An API key stored hashed (`mlxq keys add`); keys in MLXQ_API_KEYS are never stored."""

    __tablename__ = "api_keys"
    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class IdempotencyKey(Base):
    """A submitter's `Idempotency-Key` and the job it got (its own, or one it joined), so a retried submit
    gets the same job."""

    __tablename__ = "idempotency_keys"
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[float] = mapped_column(Float, index=True)


class File(Base):
    """An uploaded or produced file (batch input, output, errors), in the database so every api replica
    reads it; in the embedded default that is the SQLite file in the data dir."""

    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(Integer)
    content: Mapped[builtins.bytes] = mapped_column(LargeBinary)  # `bytes` here is the column above
    created_at: Mapped[float] = mapped_column(Float, index=True)
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)


class Batch(Base):
    """An OpenAI-style batch: validating -> in_progress -> finalizing -> completed (or failed, expired,
    cancelling -> cancelled)."""

    __tablename__ = "batches"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    output_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    expires_at: Mapped[float] = mapped_column(Float)
    in_progress_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finalizing_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    completed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    failed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    expired_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    cancelling_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    cancelled_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)


class StoredResponse(Base):
    """A Responses API response kept with `store: true` (or run in the background): what it was asked, the
    conversation it continues, and the job that answers it (the job row holds the result and the state)."""

    __tablename__ = "responses"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(36), index=True)
    model: Mapped[str] = mapped_column(String(255))
    # The request as the client sent it (what the response object echoes), and its own input items.
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    input_items: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    # The items of the responses it continues (previous_response_id), input and output: what a continuation
    # of this one prepends, with this one's input and output after them.
    previous_items: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    background: Mapped[bool] = mapped_column(Boolean, default=False)
    # Cancelled by its client (POST .../cancel): its job may still run for others who share it.
    cancelled_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)


class BatchLine(Base):
    """One input line of a batch: its job (shared by identical lines and cache hits), or why it was refused."""

    __tablename__ = "batch_lines"
    batch_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    line: Mapped[int] = mapped_column(Integer, primary_key=True)
    custom_id: Mapped[str | None] = mapped_column(String(512), nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class StreamEvent(Base):
    """The embedded stream channel: events a worker publishes for a job, read by polling."""

    __tablename__ = "stream_events"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), index=True)
    data: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class Worker(Base):
    """A worker's heartbeat: /health reads liveness and model state from here, whatever the broker."""

    __tablename__ = "workers"
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    model: Mapped[str] = mapped_column(String(255))
    model_loaded: Mapped[bool] = mapped_column(Boolean)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The worker's own counters (the prefix cache's), reported with each heartbeat.
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    started_at: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)


class Counter(Base):
    """Service-wide counters (cache hits and misses), shared by every api replica."""

    __tablename__ = "counters"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class RequestLog(Base):
    """One row per generation request: what scripts/analyze_traces.py reads."""

    __tablename__ = "request_log"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    key: Mapped[str] = mapped_column(String(64), index=True)
    endpoint: Mapped[str] = mapped_column(String(32))
    cache: Mapped[str] = mapped_column(String(8))
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cached_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tools: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
