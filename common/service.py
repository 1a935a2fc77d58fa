"""Running a long-lived role process until SIGTERM / Ctrl-C (shared by fbm-node and fbm-aggregator)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

FOREVER_S = 10 * 365 * 24 * 3600.0


class Terminated(Exception):
    """SIGTERM or SIGINT arrived while the service was still starting (e.g. waiting for the broker)."""


def run_until_terminated(start: Callable[[float], None], stop: Callable[[], None], connect_timeout_s: float = 0.0) -> None:
    """`start(timeout)`, block until SIGTERM or SIGINT, then `stop()`.

    A `connect_timeout_s` of 0 means keep trying to reach the broker: a site process should
    wait out a broker that is down rather than exit. A signal during start-up interrupts the
    waiting (it would otherwise be ignored until the broker came back). `start`'s other
    exceptions propagate.
    """
    stopping = threading.Event()
    started = threading.Event()

    def on_signal(*_: object) -> None:
        stopping.set()
        if not started.is_set():
            raise Terminated

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        start(connect_timeout_s or FOREVER_S)
        started.set()
        stopping.wait()
    except Terminated:
        pass
    finally:
        stop()
