"""Commands for the thread that steps the engine, posted from any other thread: the step loop
takes all of them between two steps, and sleeps on the inbox while it has nothing to do."""

from __future__ import annotations

import threading

# The step loops' waits when idle: half a second before the idle work starts (a burst's next
# request usually comes sooner), then this between its slices while some remains
# (`LLMEngine.when_idle`).
IDLE_WAIT, IDLE_POLL = 0.5, 0.005

class Inbox:
    def __init__(self):
        self._items: list[tuple[str, object]] = []
        self._lock = threading.Lock()
        self._wakeup = threading.Event()

    def post(self, kind: str, payload: object) -> None:
        with self._lock:
            self._items.append((kind, payload))
        self._wakeup.set()

    def wake(self) -> None:
        """End a `wait` with nothing posted (to stop the loop)."""
        self._wakeup.set()

    def take_all(self) -> list[tuple[str, object]]:
        with self._lock:
            items, self._items = self._items, []
            self._wakeup.clear()
        return items

    def wait(self, timeout: float) -> bool:
        """False if the timeout passed with nothing posted nor a wake."""
        return self._wakeup.wait(timeout)
