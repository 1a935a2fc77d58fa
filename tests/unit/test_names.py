"""Issue 17, attack 7a: a name with a trailing line break ("alice\\n") passed `re.match(...$)`.

Each entry point that takes an identity name (or a job id into a topic) must refuse it.
"""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from broker import pki
from broker.acl import acl_text
from broker.workspace import Workspace
from common import topics
from common.identity import validate_identity_name
from node.db import Database
from node.ui.accounts import AccountError, Accounts

BAD = ["alice\n", "node-a\n", "alice\nuser mallory", "al/ice", "+", "#", ""]


def _csr(cn: str) -> bytes:
    """A CSR naming `cn`, made by hand (as a hostile site would, bypassing `fbm-node request`)."""
    key = ed25519.Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "node"),
                         x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, None).public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("names"))
    ws.init("names", port=1)
    return ws


@pytest.mark.parametrize("name", BAD)
def test_bad_names_are_refused_at_every_entry_point(workspace, tmp_path, name):
    with pytest.raises(ValueError):
        validate_identity_name(name)
    with pytest.raises(ValueError):
        workspace.enroll(name, "node")
    with pytest.raises(ValueError):
        workspace.enroll_many([name], "node")
    with pytest.raises(ValueError):
        pki.create_request(name, "node")
    with pytest.raises(ValueError):
        workspace.enroll_request(_csr(name), "node")
    with pytest.raises(ValueError):
        acl_text({name: "node"})
    for build in (topics.status, topics.requests, lambda n: topics.replies(n, "r"), lambda n: topics.replies("s", n),
                  lambda n: topics.job("r", n), lambda n: topics.job(n, "j"), lambda n: topics.model("r", n),
                  lambda n: topics.events("r", n), lambda n: topics.history("r", n),
                  lambda n: topics.update("r", "job-1", n), lambda n: topics.update("r", n, "site-1")):
        with pytest.raises(ValueError):
            build(name)
    with pytest.raises(AccountError):
        Accounts(Database(tmp_path / "node.db")).add_user(name, "a long enough password", "root")
    assert name not in workspace.identities()


def test_good_names_still_pass(workspace):
    assert validate_identity_name("alice.b_c-1") == "alice.b_c-1"
    assert topics.update("alice", "alice-20260101-000000-abcdef", "site-1").endswith("/updates/site-1")
    assert "user site-1\n" in acl_text({"site-1": "node"})
