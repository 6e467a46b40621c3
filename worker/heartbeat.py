"""The worker's heartbeat: every `heartbeat_s` it publishes what the api needs (alive, the model's facts
that requests are checked against, its batch and prefix-cache state), drops its prefix cache when an
operator asked, and stops when the `mlxq serve` that supervised it is gone."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from mlxq.contract import PREFIX_CACHE_CLEARS
from mlxq.repos import counters, workers
from worker.prefix_saves import PrefixSaves
from worker.state import WorkerState

log = logging.getLogger(__name__)


# The shortest time between two heartbeats (one prompted by a finished request, or the regular one).
PROMPT_BEAT_S = 0.1


class Heartbeat:
    def __init__(self, state: WorkerState, prefix_saves: PrefixSaves) -> None:
        self._state = state
        self._prefix_saves = prefix_saves
        self._stop = threading.Event()
        self._prefix_clears: int | None = None

    def beat(self) -> None:
        state = self._state
        self._maybe_clear_prefix_cache()
        stats: dict[str, Any] = {}
        if state.engine is not None:
            # What the api checks requests against before it enqueues them, and names the weights by.
            stats["model"] = {
                "vocab_size": state.engine.vocab_size,
                "context_length": state.engine.context_length,
                "fingerprint": state.engine.key.weights,  # with the adapter's: it changes the answers
            }
            stats["batch"] = state.engine.batcher.stats()  # its load: what the api routes by (mlxq.delivery)
            stats["batch"].update(state.engine.speculation())  # drafted and accepted tokens (worker.speculative)
            stats["memory"] = state.engine.memory()
            if state.engine.prefix is not None:
                stats["prefix_cache"] = state.engine.prefix.snapshot()
                stats["prefix_index"] = state.prefix_index.held(state.engine.prefix.entry_ids())
        with state.sessions.begin() as session:
            workers.heartbeat(
                session=session,
                name=state.name,
                model=state.settings.model_name,
                model_loaded=state.engine is not None,
                error=state.load_error,
                started_at=state.started_at,
                stats=stats or None,
            )

    def _maybe_clear_prefix_cache(self) -> None:
        """Drop the prefix cache when an operator asked (the `prefix_cache_clears` counter moved since the
        last beat), on the engine thread that owns it, and save the empty state."""
        state = self._state
        with state.sessions() as session:
            clears = counters.counters(session=session).get(PREFIX_CACHE_CLEARS, 0)
        seen, self._prefix_clears = self._prefix_clears, clears
        if seen is None or clears == seen or state.engine is None or state.engine.prefix is None:
            return
        state.engine.batcher.call(state.engine.prefix.clear)
        state.prefix_index.clear()
        log.info("prefix cache cleared on request")
        self._prefix_saves.save(force=True)

    def start(self) -> None:
        supervisor = self._state.settings.supervisor_pid

        def loop() -> None:
            changed = self._state.prefix_index.changed
            while not self._stop.is_set():
                # Every heartbeat_s, or sooner when the prefix index changed (at most every PROMPT_BEAT_S).
                changed.wait(self._state.settings.heartbeat_s)
                changed.clear()
                if self._stop.wait(PROMPT_BEAT_S):
                    return
                if supervisor and os.getppid() != supervisor:
                    # `mlxq serve` died without stopping us (kill -9): stop as if it had, not live on
                    # as an orphan holding the model's memory.
                    log.warning("the supervising process %d is gone; stopping", supervisor)
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
                try:
                    self.beat()
                except Exception:
                    log.exception("heartbeat failed")
                self._prefix_saves.save_due()

        threading.Thread(target=loop, name="mlxq-heartbeat", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._state.prefix_index.changed.set()  # wake the loop now
