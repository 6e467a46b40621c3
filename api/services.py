"""Long-lived resources of the api process, built once in the lifespan and injected."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Annotated, Any

from celery import Celery
from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.auth import Authenticator
from api.health import health_snapshot
from api.metrics import Metrics
from api.model_info import ModelInfo
from api.reaper import JobReaper
from api.stats import StatsRecorder
from mlxq.celery_app import make_celery
from mlxq.channel import Channel, make_channel
from mlxq.db import make_engine, make_sessionmaker
from mlxq.settings import Settings


@dataclass
class Services:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    celery: Celery
    channel: Channel
    stats: StatsRecorder
    reaper: JobReaper
    metrics: Metrics = None  # type: ignore[assignment]  # set right after construction
    # What the live workers publish about the model (vocabulary size...): request checks read it.
    model_info: ModelInfo = None  # type: ignore[assignment]  # set right after construction
    auth: Authenticator = None  # type: ignore[assignment]  # set right after construction
    # Set when the server begins to stop (SIGTERM, SIGINT): requests still waiting answer 503 at once
    # instead of holding the shutdown until their job ends.
    closing: threading.Event = field(default_factory=threading.Event)
    _broker_ping: Any = None

    @classmethod
    def build(cls, settings: Settings) -> Services:
        engine = make_engine(settings.database_url)
        sessions = make_sessionmaker(engine)
        channel = make_channel(
            broker_url=settings.broker_url,
            redis_prefix=settings.redis_prefix,
            sessions=sessions,
            poll_interval_s=settings.poll_interval_s,
        )
        celery = make_celery(settings)
        services = cls(
            settings, engine, sessions, celery, channel, StatsRecorder(sessions), JobReaper(settings, sessions, celery)
        )
        services.metrics = Metrics(lambda: health_snapshot(services))
        services.auth = Authenticator(settings, sessions)
        services.model_info = ModelInfo(sessions, within_s=max(10.0, 3 * settings.heartbeat_s))
        return services

    def broker_problem(self) -> str | None:
        """Why the Redis broker cannot be reached, or None (a ping, bounded to half a second)."""
        if not self.settings.uses_redis:
            return None
        if self._broker_ping is None:
            import redis

            self._broker_ping = redis.Redis.from_url(
                self.settings.broker_url, socket_connect_timeout=0.5, socket_timeout=0.5
            )
        try:
            self._broker_ping.ping()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def warm_up(self) -> None:
        """Open the DB pool and the broker connection now, not on the first request after a start."""
        from sqlalchemy import text

        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        with self.celery.producer_or_acquire() as producer:
            # kombu builds transports lazily (the SQL one creates its engine and tables on first use).
            producer.channel.queue_declare(queue=self.settings.queue, durable=True, auto_delete=False)

    async def aclose(self) -> None:
        self.reaper.stop()
        await self.stats.stop()
        await self.channel.aclose()
        self.engine.dispose()


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]
