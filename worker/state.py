"""What the worker's parts share: made once per worker process (worker.main) and handed to each part
(worker.runtime's lifecycle, worker.heartbeat, worker.prefix_saves, worker.job_runner)."""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from mlxq.channel import Channel
from mlxq.delivery import Delivery
from mlxq.settings import Settings
from worker.cancel_watch import CancelWatch
from worker.prefix_index import PrefixIndex


@dataclass
class WorkerState:
    settings: Settings
    sessions: sessionmaker[Session]
    channel: Channel
    delivery: Delivery
    cancels: CancelWatch
    # This worker's identity among the live workers (its own queue is named by it). Under `mlxq serve` it
    # outlives the process: a restarted worker finds the jobs its predecessor was running.
    name: str = ""
    started_at: float = field(default_factory=time.time)
    engine: Any = None  # worker.engine.Engine, once loaded (imported lazily: it imports MLX)
    load_error: str | None = None
    prefix_index: PrefixIndex = field(default_factory=PrefixIndex)
    # Set when the worker begins to stop: running jobs are interrupted and go back to the queue.
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.name = self.name or self.settings.worker_name or f"{socket.gethostname()}:{os.getpid()}"
