"""Who cannot connect, and that they are told why quickly instead of hanging."""

from __future__ import annotations

import time

import pytest

from broker.local import free_port, reachable_tempdir
from broker.workspace import Workspace
from common.errors import ConnectError
from common.identity import Identity
from common.settings import TransportSettings
from common.transport import Transport
from tests.conftest import bundle

pytestmark = pytest.mark.integration


def _settings(fed, **kw) -> TransportSettings:
    return TransportSettings(port=fed.port, connect_timeout_s=4, clean_start=True, **kw)


def test_client_without_certificate_is_refused_with_a_clear_error(federation):
    transport = Transport(bundle(federation, "node-a"), _settings(federation), present_cert=False,
                          client_id="no-cert")
    started = time.monotonic()
    with pytest.raises(ConnectError, match="certificate"):
        transport.connect()
    assert time.monotonic() - started < 6


def test_certificate_from_another_ca_is_refused(federation, tmp_path):
    other = Workspace(reachable_tempdir() / "other")
    other.init("rogue", port=federation.port)
    rogue = Identity.load(other.enroll("node-a", "node"))
    transport = Transport(rogue, _settings(federation), client_id="rogue-node-a")
    with pytest.raises(ConnectError) as err:
        transport.connect()
    # the rogue bundle's CA does not know our broker either: the message must say so
    assert "not trusted" in str(err.value) or "certificate" in str(err.value)


def test_nothing_listening_is_reported_not_hung(federation):
    transport = Transport(bundle(federation, "node-a"),
                          TransportSettings(port=free_port(), connect_timeout_s=2, clean_start=True),
                          client_id="nobody-home")
    started = time.monotonic()
    with pytest.raises(ConnectError, match="nothing is listening"):
        transport.connect()
    assert time.monotonic() - started < 4
