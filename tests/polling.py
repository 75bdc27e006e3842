"""Waiting for a condition in tests: a liveness bound, never a timing assertion."""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(condition: Callable[[], object], max_s: float, poll_s: float = 0.01) -> bool:
    """Whether `condition()` came true within about `max_s` seconds (checked every `poll_s`)."""
    for _ in range(max(1, round(max_s / poll_s))):
        if condition():
            return True
        time.sleep(poll_s)
    return bool(condition())
