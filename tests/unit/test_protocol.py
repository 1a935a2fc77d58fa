"""The channel table generates the topics, `writer_of` and the ACL (issue 16)."""

from __future__ import annotations

import pytest

from common import protocol, topics

P = "fbm/v1"
# what each role may do, written out (issue 18: every job topic names its owner; a researcher
# writes and reads only under its own name, and reads only the replies addressed to it; nodes
# no longer read the jobs' events)
EXPECTED = {
    "node": {("read", f"{P}/jobs/+/+"), ("read", f"{P}/jobs/+/+/c/+"), ("read", f"{P}/jobs/+/+/model"),
             ("read", f"{P}/jobs/+/+/model/c/+"), ("write", f"{P}/jobs/+/+/updates/{{me}}"),
             ("write", f"{P}/nodes/{{me}}/status"), ("read", f"{P}/nodes/{{me}}/requests"),
             ("write", f"{P}/nodes/{{me}}/replies/+"),
             # secure aggregation (issue 20): its own stage messages, the server's retained state
             ("write", f"{P}/jobs/+/+/secagg/{{me}}"), ("read", f"{P}/jobs/+/+/secagg"),
             ("read", f"{P}/jobs/+/+/secagg/c/+")},
    "researcher": {("readwrite", f"{P}/jobs/{{me}}/+"), ("readwrite", f"{P}/jobs/{{me}}/+/c/+"),
                   ("read", f"{P}/jobs/{{me}}/+/model"), ("read", f"{P}/jobs/{{me}}/+/model/c/+"),
                   ("read", f"{P}/jobs/{{me}}/+/events"), ("read", f"{P}/jobs/{{me}}/+/history"),
                   ("read", f"{P}/jobs/{{me}}/+/history/c/+"), ("read", f"{P}/nodes/+/status"),
                   ("write", f"{P}/nodes/+/requests"), ("read", f"{P}/nodes/+/replies/{{me}}")},
    "aggregator": {("read", f"{P}/jobs/+/+"), ("read", f"{P}/jobs/+/+/c/+"), ("write", f"{P}/jobs/+/+/model"),
                   ("write", f"{P}/jobs/+/+/model/c/+"), ("write", f"{P}/jobs/+/+/events"),
                   ("write", f"{P}/jobs/+/+/history"), ("write", f"{P}/jobs/+/+/history/c/+"),
                   ("read", f"{P}/jobs/+/+/updates/+"), ("read", f"{P}/nodes/+/status"),
                   ("write", f"{P}/nodes/+/requests"), ("read", f"{P}/nodes/+/replies/+"),
                   ("read", f"{P}/jobs/+/+/secagg/+"), ("write", f"{P}/jobs/+/+/secagg"),
                   ("write", f"{P}/jobs/+/+/secagg/c/+")},
    "admin": {("readwrite", f"{P}/#")},
}
# the aggregator fleet (issue 23): every claim readable (a researcher: its own jobs'), only its own
# writable; a job's state for aggregators only
EXPECTED["node"] |= {("read", f"{P}/jobs/+/+/claims/+")}
EXPECTED["researcher"] |= {("read", f"{P}/jobs/{{me}}/+/claims/+"), ("read", f"{P}/aggregators/+/status")}
EXPECTED["aggregator"] |= {
    ("read", f"{P}/jobs/+/+/claims/+"), ("write", f"{P}/jobs/+/+/claims/{{me}}"),
    ("read", f"{P}/jobs/+/+/checkpoints/+"), ("read", f"{P}/jobs/+/+/checkpoints/+/c/+"),
    ("write", f"{P}/jobs/+/+/checkpoints/{{me}}"), ("write", f"{P}/jobs/+/+/checkpoints/{{me}}/c/+"),
    ("read", f"{P}/aggregators/+/status"), ("write", f"{P}/aggregators/{{me}}/status")}
for _role in ("node", "researcher", "aggregator"):  # issue 18: every key readable, only one's own writable
    EXPECTED[_role] |= {("read", f"{P}/keys/+"), ("write", f"{P}/keys/{{me}}")}


@pytest.mark.parametrize("role", protocol.ROLES)
def test_the_generated_acl_grants_each_role_what_it_needs_and_no_more(role):
    rules = protocol.acl_rules(role)
    assert len(rules) == len(set(rules))
    assert set(rules) == EXPECTED[role]


def test_topics_and_their_writers_come_from_the_table():
    assert topics.update("ann", "j1", "site-a") == f"{P}/jobs/ann/j1/updates/site-a"
    assert topics.writer_of(topics.update("ann", "j1", "site-a")) == "site-a"
    assert topics.writer_of(topics.status("site-a")) == "site-a"
    assert topics.writer_of(topics.replies("site-a", "ann")) == "site-a"
    assert topics.addressee_of(topics.replies("site-a", "ann")) == "ann"
    assert topics.writer_of(topics.requests("site-a")) is None  # names its reader: researchers and aggregators write
    assert topics.writer_of(topics.model("ann", "j1")) is None
    assert topics.writer_of(topics.job("ann", "j1")) == "ann"  # only its owner (and, to withdraw it, an admin)
    assert topics.job_of(topics.model("ann", "j1")) == "j1" and topics.owner_of(topics.model("ann", "j1")) == "ann"
    assert topics.writer_of(f"{P}/jobs/ann/j1/updates/site-a/extra") is None
    assert topics.every("model") == f"{P}/jobs/+/+/model" and topics.every("update") == f"{P}/jobs/+/+/updates/+"
    assert protocol.channel_of(topics.history("ann", "j1"))[0].name == "history"
    assert protocol.channel_of(topics.chunk(topics.model("ann", "j1"), 3)) is None
    assert topics.writer_of(topics.secagg_site("ann", "j1", "site-a")) == "site-a"
    assert topics.writer_of(topics.secagg("ann", "j1")) is None
    assert protocol.channel_of(topics.chunk(topics.secagg("ann", "j1"), 0)) is None
    assert topics.writer_of(topics.claim("ann", "j1", "agg-1")) == "agg-1"
    assert topics.writer_of(topics.checkpoint("ann", "j1", "agg-1")) == "agg-1"
    assert topics.writer_of(topics.agg_status("agg-1")) == "agg-1"
    assert topics.job_of(topics.claim("ann", "j1", "agg-1")) == "j1"


def test_the_design_doc_shows_the_channel_table_of_the_code():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "design.md").read_text()
    shown = doc.split("<!-- channels:begin -->")[1].split("<!-- channels:end -->")[0].strip()
    assert shown == protocol.markdown_table(), "docs/design.md's channel table is stale: paste markdown_table()"


def test_security_md_shows_the_acl_of_the_code():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "SECURITY.md").read_text()
    shown = doc.split("<!-- acl:begin -->")[1].split("<!-- acl:end -->")[0].strip()
    assert shown == protocol.acl_markdown(), "SECURITY.md's ACL table is stale: paste protocol.acl_markdown()"
