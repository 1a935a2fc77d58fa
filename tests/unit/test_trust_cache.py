"""The TrustStore remembers the certs it checked: least recently used out, never all at once."""

from __future__ import annotations

from broker.workspace import Workspace
from common.identity import Identity, TrustStore


def test_a_full_cache_forgets_the_least_recently_used_cert_only(tmp_path, monkeypatch):
    """It was cleared whole past 10,000 certs: at 10,000 nodes (and a few more identities)
    nearly every update of every round had its cert parsed and its CA signature checked again."""
    ws = Workspace(tmp_path)
    ws.init("unit", port=1)
    ids = [Identity.load(ws.enroll(name, "node")) for name in ("n1", "n2", "n3", "n4")]
    trust = TrustStore(ids[0].ca_pem, cache_size=3)
    checked: list[bytes] = []
    real = trust._check
    monkeypatch.setattr(trust, "_check", lambda der: checked.append(der) or real(der))
    for ident in (*ids[:3], ids[0], ids[3], ids[0], ids[2]):  # n2 is the least recently used when n4 comes
        assert trust.peer(ident.cert_der, ident.name).name == ident.name
    assert checked == [i.cert_der for i in ids]  # each checked once: n1 and n3 stayed
    trust.peer(ids[1].cert_der, "n2")
    assert checked[-1] == ids[1].cert_der  # n2 was the one forgotten
