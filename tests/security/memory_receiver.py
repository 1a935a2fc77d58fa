"""A receiving process for the memory tests: a Messenger as a node, subscribed like a node.

    python -m tests.security.memory_receiver BUNDLE_DIR

Prints `base KB` (its VmHWM before connecting: torch and the Messenger are baseline), then
`ready`, then `got TYPE` for each delivered message and `dropped REASON` for each rejected one.
Default TransportSettings: the limits under test are the shipped ones.
"""

from __future__ import annotations

import sys
from pathlib import Path


def vm_hwm_kb(pid: str = "self") -> int:
    """Peak resident memory (VmHWM) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc status")


def main(bundle: str) -> None:
    import torch

    from common import topics
    from common.identity import Identity
    from common.logging import configure_logging
    from common.messenger import Messenger
    from common.settings import TransportSettings

    configure_logging("warning", json=True)
    torch.zeros(1)
    identity = Identity.load(bundle)
    m = Messenger(identity, TransportSettings(clean_start=True, session_expiry_s=0),
                  on_reject=lambda topic, exc: print(f"dropped {exc.reason}", flush=True))
    say = lambda msg: print(f"got {msg.type}", flush=True)  # noqa: E731
    m.subscribe("fbm/v1/jobs/+/+", say, retained_chunks=True, qos=0)  # as node/service.py does
    m.subscribe("fbm/v1/jobs/+/+/model", say, retained_chunks=True, qos=0)
    m.subscribe(topics.requests(identity.name), say)
    print(f"base {vm_hwm_kb()}", flush=True)
    m.connect()
    print("ready", flush=True)
    sys.stdin.read()  # runs until the test closes our stdin
    m.close()


if __name__ == "__main__":
    main(sys.argv[1])
