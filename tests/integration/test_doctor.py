"""`fbm-node doctor` against a healthy federation and against each broken case it checks."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from broker import pki, process
from broker.local import LocalFederation, free_port
from common.identity import Identity
from node.doctor import Doctor
from researcher.experiment import Experiment
from scripts import fmnist

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fed():
    fed = LocalFederation().start()
    try:
        shards = fmnist.write_shards(fed.root / "data", 2, limit=100, seed=5)
        fed.add_nodes(fed.shard_datasets(["doc-1", "doc-2"], shards))
        fed.enroll("alice", "researcher")
        fed.wait_online({"doc-1", "doc-2"})
        yield fed
    finally:
        fed.stop()
        shutil.rmtree(fed.root, ignore_errors=True)


@pytest.fixture
def site(fed, tmp_path):
    """A copy of node doc-2's folder to break (doc-1 stays the healthy reference)."""
    target = tmp_path / "site"
    shutil.copytree(fed.root / "nodes" / "doc-2", target)
    return target


def _results(node_dir, **kw) -> dict[str, tuple[str, str, str]]:
    return {r.name: (r.status, r.detail, r.fix) for r in Doctor(node_dir, timeout_s=3, **kw).run()}


def test_a_healthy_site_passes_every_check(fed):
    out = subprocess.run([sys.executable, "-m", "node", "doctor", "--dir", str(fed.root / "nodes" / "doc-1")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout
    lines = out.stdout.splitlines()
    for name in ("config", "bundle", "certificate", "dns", "tcp", "tls", "mqtt login", "topic permissions",
                 "datasets", "disk", "node process"):
        assert any(line.startswith("✓ " + name) for line in lines), (name, out.stdout)
    assert "all checks passed" in out.stdout
    # the node's own session was not disturbed by the doctor's (client ids NAME:doctor...)
    fed.wait_online({"doc-1"}, timeout_s=10)


def test_no_config(tmp_path):
    got = _results(tmp_path)
    assert got["config"][0] == "fail" and "fbm-node init" in got["config"][2]
    assert all(got[n][0] == "skip" for n in ("bundle", "tls", "datasets"))


def test_a_key_that_does_not_match_the_certificate(site):
    other = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pki.write_private(site / "bundle" / "identity.key", other)
    got = _results(site)
    assert got["bundle"][0] == "fail" and "does not match" in got["bundle"][1]
    assert got["tls"][0] == "skip"


def test_a_certificate_from_another_federation_and_an_expired_one(site, tmp_path):
    foreign = pki.create_ca("elsewhere")
    (site / "bundle" / "ca.crt").write_bytes(foreign.cert_pem)
    got = _results(site)
    assert got["certificate"][0] == "fail" and "not issued by the bundle's CA" in got["certificate"][1]
    assert got["tls"][0] == "fail" and "not trusted" in got["tls"][1]


def test_an_expired_certificate(site):
    got = _results(site, clock=lambda: time.time() + 900 * 86400)
    assert got["certificate"][0] == "fail" and "expired" in got["certificate"][1]
    assert "fbm-broker renew" in got["certificate"][2]


def test_dns_tcp_and_tls_failures(site, monkeypatch):
    monkeypatch.setenv("FBM_NODE_MQTT__HOST", "no-such-broker.invalid")
    got = _results(site)
    assert got["dns"][0] == "fail" and "cannot resolve" in got["dns"][1]
    assert got["tcp"][0] == "skip"

    monkeypatch.setenv("FBM_NODE_MQTT__HOST", "127.0.0.1")
    monkeypatch.setenv("FBM_NODE_MQTT__PORT", str(free_port()))
    got = _results(site)
    assert got["tcp"][0] == "fail" and "refused" in got["tcp"][1]

    # something listens, but it is not the broker's TLS listener
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=lambda: [listener.accept()[0].sendall(b"HTTP/1.1 400 no\r\n\r\n") for _ in range(3)],
                     daemon=True).start()
    monkeypatch.setenv("FBM_NODE_MQTT__PORT", str(listener.getsockname()[1]))
    got = _results(site)
    listener.close()
    assert got["tcp"][0] == "ok"
    assert got["tls"][0] == "fail" and "TLS handshake" in got["tls"][1]


def test_a_revoked_identity_cannot_log_in(fed, site):
    fed.ws.enroll("doc-revoked", "node")
    shutil.rmtree(site / "bundle")
    shutil.copytree(fed.ws.bundle_dir("doc-revoked"), site / "bundle")
    assert _results(site)["mqtt login"][0] == "ok"
    fed.ws.revoke("doc-revoked")
    process.reload(fed.ws)
    time.sleep(0.5)
    got = _results(site)
    assert got["mqtt login"][0] == "fail" and "revoked" in got["mqtt login"][2]
    assert got["topic permissions"][0] == "skip"


def test_an_acl_opened_by_hand(fed, site):
    acl = fed.ws.acl_file
    original = acl.read_text()
    try:
        acl.write_text(original.replace("user doc-2\n", "user doc-2\ntopic readwrite fbm/v1/#\n"))
        process.reload(fed.ws)
        time.sleep(0.5)
        got = _results(site)
        assert got["topic permissions"][0] == "fail" and "too open" in got["topic permissions"][1]
        assert "fbm-broker reload" in got["topic permissions"][2]
    finally:
        out = subprocess.run([sys.executable, "-m", "broker", "reload", str(fed.ws.root)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout
        time.sleep(0.5)
    assert acl.read_text() == original
    assert _results(site)["topic permissions"][0] == "ok"


def test_a_clock_behind_the_federation(fed, site):
    exp = Experiment(Identity.load(fed.ws.bundle_dir("alice")), plan="mlp", tags=["nothing-matches"], rounds=1,
                     quorum=1, round_deadline_s=5, model_args={"in_features": 784, "hidden": [4], "n_classes": 10})
    exp.submit()  # a retained, signed job: its timestamp is "now" for the researcher
    try:
        got = _results(site, clock=lambda: time.time() - 600)
        assert got["clock"][0] == "fail" and "this clock is behind" in got["clock"][1]
        assert _results(site)["clock"][0] in ("ok", "warn")
    finally:
        exp.close()


def test_unreadable_data_and_a_full_disk(site):
    from node.db import Database
    from node.registry import Registry

    Path = type(site)
    shard = Path(Registry(Database(site / "node.db")).get("fm").path)
    moved = shard.with_suffix(".away")
    shard.rename(moved)
    try:
        got = _results(site, min_free_gb=1e9)
    finally:
        moved.rename(shard)
    assert got["datasets"][0] == "fail" and "missing" in got["datasets"][1]
    assert got["disk"][0] == "fail" and "free space" in got["disk"][2]


def test_a_stopped_node_is_reported_and_the_cli_exits_1_on_failure(site):
    from node.db import Database

    Database(site / "node.db").execute("UPDATE node_state SET updated_at = updated_at - 3600")  # the copy's last beat
    got = _results(site)
    assert got["node process"][0] == "warn" and "silent for" in got["node process"][1]
    (site / "node.toml").write_text("train_threads = 0\n")
    out = subprocess.run([sys.executable, "-m", "node", "doctor", "--dir", str(site)], capture_output=True, text=True)
    assert out.returncode == 1 and "✗ config" in out.stdout and "fix:" in out.stdout
