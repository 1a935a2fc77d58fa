"""`fbm-broker` as an admin uses it: init, start, status, enroll on a live broker, stop."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from broker import process
from broker.local import free_port, reachable_tempdir
from broker.workspace import Workspace
from common import topics
from common.identity import Identity
from common.messages import NodeStatus
from common.messenger import Messenger
from common.settings import TransportSettings

pytestmark = pytest.mark.integration


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "broker", *args], capture_output=True, text=True, timeout=60)


def test_broker_lifecycle_and_live_enrolment():
    root = reachable_tempdir() / "fed"
    port = free_port()
    assert cli("init", str(root), "--port", str(port), "--bind", "127.0.0.1", "--host", "fed.example.org").returncode == 0
    assert "already holds a federation" in cli("init", str(root)).stdout
    conf = (root / "broker" / "mosquitto.conf").read_text()
    for line in ("allow_anonymous false", "require_certificate true", "use_identity_as_username false", "fbm_auth.so",
                 "persistence true", "max_queued_messages", "persistent_client_expiration"):
        assert line in conf
    assert cli("status", str(root)).returncode == 3  # stopped
    started = cli("start", str(root))
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        status = cli("status", str(root))
        assert status.returncode == 0 and "listening" in status.stdout
        pid = process.read_pid(Workspace(root))

        # enrol a node while the broker runs: it can connect and use its topics at once
        out = cli("enroll", str(root), "--role", "node", "--id", "late-site")
        assert out.returncode == 0 and "reloaded its ACL" in out.stdout
        assert process.read_pid(Workspace(root)) == pid  # no restart
        meta = json.loads((root / "bundles" / "late-site" / "bundle.json").read_text())
        assert meta["broker_host"] == "fed.example.org" and meta["role"] == "node"
        identity = Identity.load(root / "bundles" / "late-site")
        node = Messenger(identity, TransportSettings(host="127.0.0.1", connect_timeout_s=5, clean_start=True))
        node.connect()
        node.send(topics.status("late-site"), "node_status", NodeStatus(state="online"))
        node.close()

        bad = cli("enroll", str(root), "--role", "node", "--id", "bad/name")
        assert bad.returncode != 0 and "invalid identity name" in bad.stdout
        dup = cli("enroll", str(root), "--role", "node", "--id", "late-site")
        assert dup.returncode != 0 and "already enrolled" in dup.stdout
        assert "late-site" in cli("identities", str(root)).stdout
        assert "already running" in cli("start", str(root)).stdout
    finally:
        assert cli("stop", str(root)).returncode == 0
    assert cli("status", str(root)).returncode == 3


@pytest.mark.slow
def test_node_waiting_for_a_dead_broker_still_stops_on_sigterm(tmp_path):
    """A site started while the broker is down keeps trying, and SIGTERM ends it promptly."""
    import signal as sig
    import time

    root = reachable_tempdir() / "fed"
    assert cli("init", str(root), "--port", str(free_port()), "--bind", "127.0.0.1").returncode == 0
    assert cli("enroll", str(root), "--role", "node", "--id", "lonely").returncode == 0
    node_dir = tmp_path / "site"
    init = subprocess.run([sys.executable, "-m", "node", "init", str(node_dir), "--bundle", str(root / "bundles" / "lonely")],
                          capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stdout + init.stderr
    proc = subprocess.Popen([sys.executable, "-m", "node", "start", "--dir", str(node_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(8)  # started, now retrying the connection
    assert proc.poll() is None
    proc.send_signal(sig.SIGTERM)
    proc.wait(timeout=30)  # before the fix it kept retrying the broker and ignored SIGTERM
    assert proc.returncode == 0, proc.stdout.read()
