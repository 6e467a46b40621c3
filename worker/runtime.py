"""The worker's lifecycle: load the model (and its prefix cache, kept in <data dir>/prefix_cache by
worker.prefix_saves), take back what a predecessor of the same name left running, start the heartbeat;
on stop, interrupt running jobs, save the prefix cache, deregister."""

from __future__ import annotations

import logging
import os
import platform
from importlib.metadata import version

from mlxq.repos import jobs, workers
from worker.heartbeat import Heartbeat
from worker.job_runner import JobRunner
from worker.model_spec import ModelSpec
from worker.prefix_saves import PrefixSaves
from worker.state import WorkerState

log = logging.getLogger(__name__)


class Runtime:
    """The worker's parts, made once per worker process (worker.main)."""

    def __init__(self, state: WorkerState) -> None:
        self.state = state
        self.prefix_saves = PrefixSaves(state)
        self.heartbeat = Heartbeat(state, self.prefix_saves)
        self.jobs = JobRunner(state, self.prefix_saves)

    def start(self) -> None:
        """Load the model, then announce the worker (it runs in Celery's main process, before it consumes)."""
        from worker.engine import BatchLimits, Engine

        state, settings = self.state, self.state.settings
        # MLX's CUDA build compiles kernels as it first meets them and keeps them in the system's temporary directory
        # by default, lost with it: kept with the worker's other caches instead, so a restart finds them built. Its
        # files are named by kernel alone: one folder per MLX version (safe to delete: they are built again).
        ptx = settings.data_dir / "mlx-ptx" / f"mlx-{version('mlx')}-{platform.machine()}"
        os.environ.setdefault("MLX_PTX_CACHE_DIR", str(ptx))
        limits = BatchLimits(
            size=settings.batch_size, tokens=settings.batch_tokens, prefill=settings.prefill_batch_size
        )
        # An empty setting (an environment variable set to "") names nothing.
        spec = ModelSpec(settings.model, draft=settings.draft_model or None, adapter=settings.adapter_path or None)
        try:
            state.engine = Engine.load(
                spec,
                limits,
                memory=self._memory_budget(),
                prefix_bytes=settings.prefix_cache_mb << 20,
            )
            log.info("model %s loaded; memory budget (bytes): %s", settings.model, state.engine.budget.limits())
            self.prefix_saves.enable()
            state.engine.warm_up()
        except Exception as exc:  # the worker stays up and reports why, never answers with a fake
            state.load_error = f"{type(exc).__name__}: {exc}"
            log.error("model %s failed to load: %s", settings.model, state.load_error)
        # Jobs a previous process of this name was running when it died run again (or fail after
        # max_attempts), and their messages, which died with it, are sent again.
        with state.sessions.begin() as session:
            requeued, failed = jobs.requeue_running(
                session=session, worker=state.name, max_attempts=settings.max_attempts
            )
        if requeued or failed:
            log.warning(
                "a previous worker process died running jobs: %d requeued, %d failed after %d attempts",
                requeued,
                failed,
                settings.max_attempts,
            )
        self.heartbeat.beat()
        state.delivery.send_waiting()
        self.heartbeat.start()

    def _memory_budget(self) -> int:
        """MLXQ_MEMORY_GB; else the machine's default, shared evenly by the workers `mlxq serve` runs on this host."""
        from worker.memory import GIB, default_budget

        settings = self.state.settings
        if settings.memory_gb:
            return int(settings.memory_gb * GIB)
        return default_budget() // (len(settings.served_models) if settings.supervisor_pid else 1)

    def begin_shutdown(self) -> None:
        """Interrupt running jobs at once (they go back to the queue) so a stop takes seconds, not as long
        as the longest generation."""
        self.state.stopping.set()
        self.state.cancels.cancel_all()

    def shutdown(self) -> None:
        self.heartbeat.stop()
        self.prefix_saves.save(force=True)
        if self.state.engine is not None:
            self.state.engine.close()
        try:
            with self.state.sessions.begin() as session:
                workers.retire_worker(
                    session=session, name=self.state.name, gone_after_s=self.state.settings.worker_lost_after_s
                )
        except Exception:
            log.exception("could not deregister worker")
