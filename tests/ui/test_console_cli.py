"""`fbm-node ui` and `fbm-node user` as an admin runs them (real processes, real sockets)."""

from __future__ import annotations

import hashlib
import socket
import ssl
import subprocess
import sys

import pytest

from broker.local import free_port
from broker.workspace import Workspace
from node.ui.tls import fingerprint
from tests.conftest import wait_until


@pytest.fixture
def node_dir(tmp_path):
    ws = Workspace(tmp_path / "federation")
    ws.init("ui-test", port=free_port(), bind="127.0.0.1")
    bundle = ws.enroll("site-tls", "node")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "node", "init", str(site), "--bundle", str(bundle)], check=True, capture_output=True)
    return site


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", *args], input=stdin, text=True, capture_output=True, timeout=60)


def test_the_console_needs_an_account_first(node_dir):
    done = _cli("ui", "--dir", str(node_dir), "--port", str(free_port()))
    assert done.returncode == 1 and "fbm-node user add" in done.stdout
    assert _cli("user", "add", "steward", "--dir", str(node_dir), "--password-stdin", stdin="short\n").returncode == 1
    added = _cli("user", "add", "steward", "--dir", str(node_dir), "--password-stdin", stdin="long enough pw\n")
    assert added.returncode == 0, added.stdout
    assert "steward" in _cli("user", "list", "--dir", str(node_dir)).stdout
    assert "long enough" not in (node_dir / "node.db").read_bytes().decode("latin-1")


def test_beyond_loopback_the_console_speaks_only_tls_with_its_printed_certificate(node_dir):
    _cli("user", "add", "steward", "--dir", str(node_dir), "--password-stdin", stdin="long enough pw\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "node", "ui", "--dir", str(node_dir), "--host", "0.0.0.0", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE

        def served() -> bytes | None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as raw, \
                        context.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    served.cert = tls.getpeercert(binary_form=True)
                    return tls.recv(4096)
            except OSError:
                return None

        assert wait_until(lambda: served() is not None, 30)
        assert served().startswith(b"HTTP/1.1 200")
        cert = node_dir / "ui-tls" / "console.crt"
        assert hashlib.sha256(served.cert).hexdigest() == fingerprint(cert).replace(":", "").lower()
        assert oct((node_dir / "ui-tls" / "console.key").stat().st_mode & 0o777) == "0o600"
        with socket.create_connection(("127.0.0.1", port), timeout=2) as plain:  # no plain HTTP
            plain.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert not plain.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert fingerprint(cert) in out
