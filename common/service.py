"""Running a long-lived role process until SIGTERM / Ctrl-C (shared by fbm-node and fbm-aggregator)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

FOREVER_S = 10 * 365 * 24 * 3600.0


def run_until_terminated(start: Callable[[float], None], stop: Callable[[], None], connect_timeout_s: float = 0.0) -> None:
    """`start(timeout)`, block until SIGTERM or SIGINT, then `stop()`.

    A `connect_timeout_s` of 0 means keep trying to reach the broker: a site process should
    wait out a broker that is down rather than exit. `start`'s exceptions propagate.
    """
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    start(connect_timeout_s or FOREVER_S)
    stopping.wait()
    stop()
