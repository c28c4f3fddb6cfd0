"""`LoopLag`: how late the event loop itself runs a 1 ms timer, for tests that assert "returned within a few ms of
its deadline or budget" of twostage rather than of the operating system (a loaded machine deschedules the
process)."""
from __future__ import annotations

import asyncio
import time

LATE_S = 0.005   # "within a few ms": how long after its deadline or budget an answer may come, beyond the loop's lag


class LoopLag:
    """Use as `with LoopLag() as lag:` inside a running event loop; `lag.allowed` is LATE_S plus the worst lag."""

    def __init__(self):
        self.worst = 0.0
        self._task: asyncio.Task | None = None

    async def _probe(self):
        while True:
            asked = time.monotonic()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, time.monotonic() - asked - 0.001)

    def __enter__(self):
        self._task = asyncio.get_running_loop().create_task(self._probe())
        return self

    def __exit__(self, *exc):
        self._task.cancel()

    @property
    def allowed(self) -> float:
        return LATE_S + self.worst
