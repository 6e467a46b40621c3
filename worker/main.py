"""The Celery worker process: one model, one engine thread, a Celery task per request.

Celery runs a pool of `worker_threads` consumer threads. Each task hands its request to the engine
thread and waits for it there, so every request is still one Celery task (acks, redelivery,
cancellation and Flower work per request) while the engine decodes them all in one batch.
"""

from __future__ import annotations

import logging
import os
import re

from worker.blas import preload_openblas

preload_openblas()  # before anything imports mlx

from celery import Celery  # noqa: E402
from celery.signals import worker_init, worker_shutdown, worker_shutting_down  # noqa: E402

from mlxq.celery_app import make_celery  # noqa: E402
from mlxq.channel import make_channel  # noqa: E402
from mlxq.contract import GENERATE_TASK  # noqa: E402
from mlxq.db import make_engine, make_sessionmaker, upgrade  # noqa: E402
from mlxq.delivery import Delivery, worker_queue  # noqa: E402
from mlxq.settings import Settings, get_settings  # noqa: E402
from worker.cancel_watch import CancelWatch  # noqa: E402
from worker.runtime import Runtime  # noqa: E402
from worker.state import WorkerState  # noqa: E402

log = logging.getLogger(__name__)


def build(settings: Settings) -> tuple[Celery, Runtime]:
    sessions = make_sessionmaker(make_engine(settings.database_url))
    channel = make_channel(
        broker_url=settings.broker_url,
        redis_prefix=settings.redis_prefix,
        sessions=sessions,
        poll_interval_s=settings.poll_interval_s,
    )
    app = make_celery(settings)
    delivery = Delivery(sessions, app, settings)
    runtime = Runtime(WorkerState(settings, sessions, channel, delivery, CancelWatch(sessions)))

    @app.task(name=GENERATE_TASK, acks_late=True, reject_on_worker_lost=True)
    def generate(job_id: str) -> None:
        runtime.jobs.run_job(job_id)

    # Runs once in the worker's main process before it consumes anything: the place to load the model.
    @worker_init.connect(weak=False)
    def _load(**_: object) -> None:
        runtime.start()

    # Sent as the stop begins (SIGTERM, SIGINT), before Celery waits for running tasks to return.
    @worker_shutting_down.connect(weak=False)
    def _interrupt(**_: object) -> None:
        runtime.begin_shutdown()

    @worker_shutdown.connect(weak=False)
    def _stop(**_: object) -> None:
        runtime.shutdown()

    return app, runtime


def run(settings: Settings | None = None, loglevel: str = "INFO") -> None:
    settings = settings or get_settings()
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.worker_nice:
        # Where api and worker share cores, the front end must win them: it answers in
        # milliseconds, while generation only loses a little throughput.
        os.nice(settings.worker_nice)
    upgrade(settings)
    app, runtime = build(settings)
    name = runtime.state.name
    argv = [
        "worker",
        "-P",
        "threads",
        "-c",
        str(settings.worker_threads),
        "-E",
        "-Q",
        worker_queue(settings.queue, name),  # its own: mlxq.delivery routes each job to one worker
        "-l",
        loglevel,
        "--without-gossip",
        "--without-mingle",
        "-n",
        f"mlxq-{settings.queue}.{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}@%h",  # unique, as the worker's name is
    ]
    if not settings.uses_redis:
        argv.append("--without-heartbeat")
    app.worker_main(argv)
