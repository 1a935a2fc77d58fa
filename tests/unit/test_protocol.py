"""The channel table generates the topics, `writer_of` and the ACL (issue 16)."""

from __future__ import annotations

import pytest

from common import protocol, topics

P = "fbm/v1"
# the ACL as it was written by hand before the table existed: the table must give the same rights
HAND_WRITTEN = {
    "node": {("read", f"{P}/jobs/+"), ("read", f"{P}/jobs/+/c/+"), ("read", f"{P}/jobs/+/model"),
             ("read", f"{P}/jobs/+/model/c/+"), ("read", f"{P}/jobs/+/events"), ("write", f"{P}/jobs/+/updates/{{me}}"),
             ("write", f"{P}/nodes/{{me}}/status"), ("read", f"{P}/nodes/{{me}}/requests"),
             ("write", f"{P}/nodes/{{me}}/replies"),
             # secure aggregation (issue 20): its own stage messages, the server's retained state
             ("write", f"{P}/jobs/+/secagg/{{me}}"), ("read", f"{P}/jobs/+/secagg"), ("read", f"{P}/jobs/+/secagg/c/+")},
    "researcher": {("readwrite", f"{P}/jobs/+"), ("readwrite", f"{P}/jobs/+/c/+"), ("read", f"{P}/jobs/+/model"),
                   ("read", f"{P}/jobs/+/model/c/+"), ("read", f"{P}/jobs/+/events"), ("read", f"{P}/jobs/+/history"),
                   ("read", f"{P}/jobs/+/history/c/+"), ("read", f"{P}/nodes/+/status"),
                   ("write", f"{P}/nodes/+/requests"), ("read", f"{P}/nodes/+/replies")},
    "aggregator": {("read", f"{P}/jobs/+"), ("read", f"{P}/jobs/+/c/+"), ("write", f"{P}/jobs/+/model"),
                   ("write", f"{P}/jobs/+/model/c/+"), ("write", f"{P}/jobs/+/events"), ("write", f"{P}/jobs/+/history"),
                   ("write", f"{P}/jobs/+/history/c/+"), ("read", f"{P}/jobs/+/updates/+"),
                   ("read", f"{P}/nodes/+/status"), ("write", f"{P}/nodes/+/requests"), ("read", f"{P}/nodes/+/replies"),
                   ("read", f"{P}/jobs/+/secagg/+"), ("write", f"{P}/jobs/+/secagg"), ("write", f"{P}/jobs/+/secagg/c/+")},
    "admin": {("readwrite", f"{P}/#")},
}
for _role in ("node", "researcher", "aggregator"):  # issue 18: every key readable, only one's own writable
    HAND_WRITTEN[_role] |= {("read", f"{P}/keys/+"), ("write", f"{P}/keys/{{me}}")}


@pytest.mark.parametrize("role", protocol.ROLES)
def test_the_generated_acl_grants_what_the_hand_written_one_did(role):
    rules = protocol.acl_rules(role)
    assert len(rules) == len(set(rules))
    assert set(rules) == HAND_WRITTEN[role]


def test_topics_and_their_writers_come_from_the_table():
    assert topics.update("j1", "site-a") == f"{P}/jobs/j1/updates/site-a"
    assert topics.writer_of(topics.update("j1", "site-a")) == "site-a"
    assert topics.writer_of(topics.status("site-a")) == "site-a"
    assert topics.writer_of(topics.replies("site-a")) == "site-a"
    assert topics.writer_of(topics.requests("site-a")) is None  # names its reader: researchers and aggregators write
    assert topics.writer_of(topics.model("j1")) is None and topics.writer_of(topics.job("j1")) is None
    assert topics.writer_of(f"{P}/jobs/j1/updates/site-a/extra") is None
    assert topics.every("model") == f"{P}/jobs/+/model" and topics.every("update") == f"{P}/jobs/+/updates/+"
    assert protocol.channel_of(topics.history("j1"))[0].name == "history"
    assert protocol.channel_of(topics.chunk(topics.model("j1"), 3)) is None
    assert topics.writer_of(topics.secagg_site("j1", "site-a")) == "site-a"
    assert topics.writer_of(topics.secagg("j1")) is None
    assert protocol.channel_of(topics.chunk(topics.secagg("j1"), 0)) is None


def test_the_design_doc_shows_the_channel_table_of_the_code():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "design.md").read_text()
    shown = doc.split("<!-- channels:begin -->")[1].split("<!-- channels:end -->")[0].strip()
    assert shown == protocol.markdown_table(), "docs/design.md's channel table is stale: paste markdown_table()"
