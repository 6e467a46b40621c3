"""Periodic work of the api process (stats flushes, the job reaper), off the event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def run_every(interval_s: float, fn: Callable[[], object]) -> asyncio.Task:
    """Call `fn` in a thread every `interval_s` until the returned task is cancelled; failures are logged."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(fn)
            except Exception:
                log.exception("periodic %s failed; retrying", getattr(fn, "__qualname__", fn))

    return asyncio.get_running_loop().create_task(loop())
