"""A node that was offline gets the QoS-1 request queued for it, even across a broker restart."""

from __future__ import annotations

import pytest

from broker import process
from common import topics
from common.messages import Request
from common.messenger import Messenger
from tests.conftest import Inbox, bundle, fast_settings, open_messenger

pytestmark = pytest.mark.integration

SESSION = fast_settings(clean_start=False, session_expiry_s=3600)


def _node_session(fed, clients, inbox):
    """Routes first, then connect: a resumed session delivers its queue right after CONNACK."""
    node = Messenger(bundle(fed, "node-a"), SESSION)
    node.subscribe(topics.requests("node-a"), inbox)
    node.connect()
    clients.append(node)
    return node


@pytest.mark.parametrize("restart_broker", [False, True], ids=["same-broker", "after-SIGTERM-restart"])
def test_request_queued_while_node_offline(own_federation, clients, restart_broker):
    fed = own_federation
    first = Inbox()
    node = _node_session(fed, clients, first)  # creates the persistent session and subscription
    node.close()
    clients.remove(node)

    researcher = open_messenger(fed, "res-1", clients)
    msg_id = researcher.send(topics.requests("node-a"), "request", Request(command="ping", args={"n": 1}))

    if restart_broker:
        process.stop(fed.ws)  # SIGTERM: Mosquitto writes its persistence file
        process.start(fed.ws)

    inbox = Inbox()
    _node_session(fed, clients, inbox)
    assert inbox.wait_for(lambda items: any(m.id == msg_id for m in items), timeout_s=15), (
        f"queued request never arrived; broker log:\n{fed.ws.log_file.read_text()}"
    )
    (msg,) = [m for m in inbox.items if m.id == msg_id]
    assert msg.sender == "res-1" and msg.body.command == "ping" and msg.body.args == {"n": 1}
