"""A site makes its own key; the admin signs its request; the key never leaves the site's folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from broker.local import LocalFederation
from broker.pki import create_request, read_request

pytestmark = pytest.mark.integration


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


def _files_holding(root: Path, needles: list[bytes], skip: Path) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and skip not in path.parents:
            data = path.read_bytes()
            if any(n in data for n in needles):
                found.append(path)
    return found


def test_the_site_key_stays_in_the_site_folder(tmp_path, own_federation: LocalFederation):
    fed = own_federation
    site = tmp_path / "hospital-b"
    handover = tmp_path / "to-hospital-b"

    made = _cli("node", "request", "hospital-b", "--dir", str(site))
    assert made.returncode == 0, made.stdout + made.stderr
    key_file = site / "bundle" / "identity.key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600" and oct(key_file.parent.stat().st_mode & 0o777) == "0o700"
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    secret = [key_file.read_bytes(), key.private_bytes_raw()]  # PEM and the raw 32 bytes
    csr = site / "hospital-b.csr"
    assert read_request(csr.read_bytes()).name == "hospital-b"

    signed = _cli("broker", "enroll", str(fed.ws.root), "--csr", str(csr), "--out", str(handover))
    assert signed.returncode == 0, signed.stdout + signed.stderr
    assert not (handover / "identity.key").exists() and not (fed.ws.bundle_dir("hospital-b") / "identity.key").exists()
    assert fed.ws.identities()["hospital-b"]["key_held_by"] == "site"
    assert fed.ws.identities()["hospital-b"]["role"] == "node"

    joined = _cli("node", "init", str(site), "--bundle", str(handover))
    assert joined.returncode == 0, joined.stdout + joined.stderr
    assert json.loads((site / "bundle" / "bundle.json").read_text())["name"] == "hospital-b"
    assert not (site / "bundle" / ".incoming").exists()

    # the node connects with its own key (the broker trusts the certificate the admin signed)
    fed.spawn("node-hospital-b", [sys.executable, "-m", "node", "start", "--dir", str(site)])
    fed.wait_online({"hospital-b"}, timeout_s=60)
    # renewal works although the workspace never held the key
    renewed = _cli("broker", "renew", str(fed.ws.root), "--id", "hospital-b")
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr

    # nowhere outside the site's folder -- workspace, hand-over folder, logs -- holds the key
    assert _files_holding(tmp_path, secret, skip=site) == []
    assert _files_holding(fed.root, secret, skip=site) == []


def test_bad_requests_and_mismatched_bundles_are_refused(tmp_path, federation: LocalFederation):
    fed = federation
    csr_pem, _ = create_request("clinic-x", "node")
    forged = csr_pem.replace(csr_pem[200:204], b"AAAA" if csr_pem[200:204] != b"AAAA" else b"BBBB")
    bad = tmp_path / "forged.csr"
    bad.write_bytes(forged)
    out = _cli("broker", "enroll", str(fed.ws.root), "--csr", str(bad))
    assert out.returncode == 1 and ("signature" in out.stdout or "not a PEM" in out.stdout), out.stdout

    ok = tmp_path / "clinic-x.csr"
    ok.write_bytes(csr_pem)
    out = _cli("broker", "enroll", str(fed.ws.root), "--csr", str(ok), "--role", "researcher")
    assert out.returncode == 1 and "asks for role 'node'" in out.stdout
    out = _cli("broker", "enroll", str(fed.ws.root), "--csr", str(ok), "--id", "someone-else")
    assert out.returncode == 1 and "is for 'clinic-x'" in out.stdout

    # a key-less bundle where no request was made, and one that answers another site's key
    assert _cli("broker", "enroll", str(fed.ws.root), "--csr", str(ok), "--out", str(tmp_path / "b")).returncode == 0
    out = _cli("node", "init", str(tmp_path / "elsewhere"), "--bundle", str(tmp_path / "b"))
    assert out.returncode == 1 and "has no private key" in out.stdout
    assert _cli("node", "request", "clinic-x", "--dir", str(tmp_path / "other")).returncode == 0
    out = _cli("node", "init", str(tmp_path / "other"), "--bundle", str(tmp_path / "b"))
    assert out.returncode == 1 and "does not fit this site's key" in out.stdout
    assert not (tmp_path / "other" / "bundle" / "identity.crt").exists()
