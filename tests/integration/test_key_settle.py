"""A researcher knows every retained encryption key as soon as the broker has sent them.

`Messenger.settle_keys` used to wait for a quiet period (0.3 s at each submit) because nothing
said when the retained keys were all in. The echo of our own key, published after the
subscription, comes after every retained key of that subscription: it ends the wait.
"""

from __future__ import annotations

import time

import pytest

from common.messenger import Messenger
from tests.conftest import bundle, fast_settings

pytestmark = pytest.mark.integration

PEERS = [f"keyed-node-{i:02d}" for i in range(30)]


def test_settle_keys_ends_at_the_echo_with_every_retained_key_known(own_federation, clients):
    fed = own_federation
    for name in PEERS:  # each publishes its key, retained, on connecting
        fed.enroll(name, "node")
        peer = Messenger(bundle(fed, name), fast_settings())
        peer.connect()
        assert peer.settle_keys(required=[name], timeout_s=10, quiet_s=5)
        peer.close()
    fed.enroll("key-reader", "researcher")
    reader = Messenger(bundle(fed, "key-reader"), fast_settings())
    clients.append(reader)
    reader.connect()
    start = time.monotonic()
    assert reader.settle_keys(timeout_s=20, quiet_s=5)  # a quiet period alone would take 5 s
    took = time.monotonic() - start
    assert set(PEERS) <= set(reader.keyholders("node")), "the echo came before a retained key"
    assert took < 2.0, f"settled after {took:.2f} s: the echo did not end the wait"
