"""Periodic work of the api process (stats flushes, the house-keeping), off the event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def run_every(interval_s: float, fn: Callable[[], object], *, when: Callable[[], bool] | None = None) -> asyncio.Task:
    """Call `fn` in a thread every `interval_s` until the returned task is cancelled; failures are logged.

    `when`, if given, is asked on the event loop first (it must be quick): a tick it answers False
    skips the thread hop, which is most of an idle tick's cost.
    """

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval_s)
            if when is not None and not when():
                continue
            try:
                await asyncio.to_thread(fn)
            except Exception:
                log.exception("periodic %s failed; retrying", getattr(fn, "__qualname__", fn))

    return asyncio.get_running_loop().create_task(loop())
