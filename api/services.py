"""Long-lived resources of the api process, built once in the lifespan and injected."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.auth import Authenticator
from api.operations.health import Health
from api.operations.metrics import Metrics
from api.operations.stats import StatsRecorder
from api.pipeline.admission import Admission
from api.pipeline.follow import JobFollower
from api.pipeline.model_info import ModelInfo
from mlxq.celery_app import make_celery
from mlxq.channel import Channel, make_channel
from mlxq.db import make_engine, make_sessionmaker
from mlxq.delivery import Delivery
from mlxq.settings import Settings


@dataclass
class Services:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    celery: Celery
    channel: Channel
    stats: StatsRecorder
    delivery: Delivery
    # What the live workers publish about the model (vocabulary size...): request checks read it.
    model_info: ModelInfo
    admission: Admission
    follower: JobFollower
    health: Health
    metrics: Metrics
    auth: Authenticator
    # Set when the server begins to stop (SIGTERM, SIGINT): requests still waiting answer 503 at once
    # instead of holding the shutdown until their job ends.
    closing: threading.Event = field(default_factory=threading.Event)
    # Set while this process knows of open batches: the house-keeping moves them on every second.
    batches_open: threading.Event = field(default_factory=threading.Event)

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
        stats = StatsRecorder(sessions)
        delivery = Delivery(sessions, celery, settings)
        model_info = ModelInfo(sessions, within_s=max(10.0, 3 * settings.heartbeat_s), wait_s=settings.worker_wait_s)
        closing = threading.Event()
        health = Health(settings, sessions, stats)
        return cls(
            settings=settings,
            engine=engine,
            sessions=sessions,
            celery=celery,
            channel=channel,
            stats=stats,
            delivery=delivery,
            model_info=model_info,
            admission=Admission(settings, sessions, delivery, stats, model_info),
            follower=JobFollower(settings, sessions, channel, delivery, closing, model_info),
            health=health,
            metrics=Metrics(health.snapshot),
            auth=Authenticator(settings, sessions),
            closing=closing,
        )

    def warm_up(self) -> None:
        """Open the DB pool and the broker connection now, not on the first request after a start."""
        from sqlalchemy import text

        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        with self.celery.producer_or_acquire() as producer:
            # kombu builds transports lazily (the SQL one creates its engine and tables on first use).
            producer.channel.queue_declare(queue=self.settings.queue, durable=True, auto_delete=False)

    async def aclose(self) -> None:
        await self.stats.stop()
        await self.channel.aclose()
        self.engine.dispose()


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]
