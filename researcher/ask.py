"""Ask one node a question (`ping`, `list_datasets`, `plan_status`) and wait for its reply."""

from __future__ import annotations

import queue
import uuid
from typing import Any

from common import topics
from common.identity import Identity
from common.messages import Reply, Request
from common.messenger import Messenger
from common.settings import TransportSettings


def ask(identity: Identity, node: str, command: str, args: dict[str, Any] | None = None, *,
        mqtt: TransportSettings | None = None, timeout_s: float = 10.0) -> Reply:
    """The node's reply; TimeoutError if it does not answer in time (offline nodes answer on
    their return, but this call does not wait that long)."""
    from researcher.experiment import researcher_settings

    got: queue.Queue = queue.Queue()
    m = Messenger(identity, researcher_settings(mqtt), client_id=uuid.uuid4().hex[:8])
    m.subscribe(topics.replies(node, identity.name), got.put, types={"reply"})
    m.connect()
    try:
        msg_id = uuid.uuid4().hex
        m.send(topics.requests(node), "request", Request(command=command, args=args or {}), msg_id=msg_id)
        while True:
            try:
                msg = got.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"node {node} did not answer {command!r} within {timeout_s:.0f}s") from None
            if msg.body.in_reply_to == msg_id:
                return msg.body
    finally:
        m.close()
