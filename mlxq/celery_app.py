"""The Celery app factory, shared by the api (which only sends tasks by name) and the worker."""

from __future__ import annotations

from celery import Celery

from mlxq.broker import kombu_url, survive_redis_restarts
from mlxq.db import prepare_sqlite_broker
from mlxq.settings import Settings


def make_celery(settings: Settings) -> Celery:
    prepare_sqlite_broker(settings.broker_url)
    app = Celery("mlxq", broker=kombu_url(settings.broker_url), set_as_current=False)
    transport_options: dict = {}
    if settings.uses_redis:
        survive_redis_restarts()
        # A generation can run long; redeliver only after the worker is surely gone.
        transport_options["visibility_timeout"] = 6 * 3600
    else:
        transport_options["polling_interval"] = settings.poll_interval_s
        transport_options["connect_args"] = {"timeout": 30}
    app.conf.update(
        task_default_queue=settings.queue,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # Each consumer thread holds one request until it is done (acknowledged only then; the job id
        # makes it idempotent) and reserves no more: the engine, not the broker, decides what runs.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_threads,
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app
