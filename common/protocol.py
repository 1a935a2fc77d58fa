"""The federation's channels in one table: topic, who writes, who reads, QoS, retained.

Everything else is generated from it: the topic builders and `writer_of` (common/topics.py),
the broker's per-identity ACL (broker/acl.py) and the filters each role subscribes to. A new
channel, or a change of who may read one, is one row here, and the ACL follows.

Access per role is `ANY` (every topic of the channel), `OWN` (only where the topic's named
level is the identity itself: a node's own status, its own updates) or absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

PREFIX = "fbm/v1"
CHUNK_LEVEL = "c"
ROLES = ("node", "researcher", "aggregator", "admin")

Access = Literal["any", "own"]
ANY: Access = "any"
OWN: Access = "own"


@dataclass(frozen=True)
class Channel:
    """One kind of topic. `template` names its variable levels in braces ({owner}, {job},
    {node}); `named` is the level that names the identity that alone may write the topic (its
    own status, its own updates, its own jobs); `own` says, per role, which level names the
    identity for that role's OWN access when it is not `named` (a researcher reads the models
    of jobs under its own name, the replies addressed to it)."""

    name: str
    template: str
    writers: dict[str, Access]
    readers: dict[str, Access]
    qos: int = 1
    retained: bool = False
    chunked: bool = False  # retained and possibly larger than a chunk: chunks on sub-topics
    named: str | None = None
    own: dict[str, str] = field(default_factory=dict)
    levels: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(p[1:-1] for p in self.template.split("/") if p.startswith("{")))

    def topic(self, **values: str) -> str:
        return f"{PREFIX}/{self.template.format(**values)}"

    def filter(self, **values: str) -> str:
        """The topic with every level not given as `+` (what a subscriber asks for)."""
        return self.topic(**{lvl: values.get(lvl, "+") for lvl in self.levels})

    def match(self, topic: str) -> dict[str, str] | None:
        """The variable levels of `topic` if it is one of this channel's topics."""
        parts = topic.split("/")
        pattern = f"{PREFIX}/{self.template}".split("/")
        if len(parts) != len(pattern):
            return None
        got: dict[str, str] = {}
        for want, have in zip(pattern, parts, strict=True):
            if want.startswith("{"):
                got[want[1:-1]] = have
            elif want != have:
                return None
        return got

    @property
    def written_by_named(self) -> bool:
        """Only the identity the topic names may write it (receivers check the sender)."""
        return self.named is not None and OWN in self.writers.values()

    def own_level(self, role: str) -> str | None:
        return self.own.get(role, self.named)

    def _rule(self, role: str, access: Access) -> str:
        mine = self.own_level(role) if access == OWN else None
        return self.topic(**{lvl: ("{me}" if lvl == mine else "+") for lvl in self.levels})

    def acl_rules(self, role: str) -> list[tuple[str, str]]:
        """(access, topic template with {me}) lines of `role` for this channel and its chunks."""
        read, write = self.readers.get(role), self.writers.get(role)
        grants = [("readwrite", self._rule(role, read))] if read is not None and read == write else [
            *([("read", self._rule(role, read))] if read is not None else []),
            *([("write", self._rule(role, write))] if write is not None else [])]
        if self.chunked:
            grants += [(access, f"{topic}/{CHUNK_LEVEL}/+") for access, topic in grants]
        return grants


def _rw(writers: dict[str, Access], readers: dict[str, Access]) -> dict[str, dict[str, Access]]:
    return {"writers": {**writers, "admin": ANY}, "readers": {**readers, "admin": ANY}}


_OWNERS = {"researcher": "owner"}  # a researcher's OWN under jobs/: the jobs it owns

# Every job topic names the job's owner (the researcher who submitted it) before the job id:
# the broker grants a researcher write on its own jobs only, and read on their models, history
# and events only; receivers check owner == signer == the topic's owner (issue 18).
CHANNELS: dict[str, Channel] = {c.name: c for c in (
    Channel("job", "jobs/{owner}/{job}", **_rw({"researcher": OWN}, {"node": ANY, "researcher": OWN, "aggregator": ANY}),
            retained=True, chunked=True, named="owner"),
    Channel("model", "jobs/{owner}/{job}/model", **_rw({"aggregator": ANY}, {"node": ANY, "researcher": OWN}),
            retained=True, chunked=True, own=_OWNERS),
    Channel("events", "jobs/{owner}/{job}/events", **_rw({"aggregator": ANY}, {"researcher": OWN}), own=_OWNERS),
    Channel("history", "jobs/{owner}/{job}/history", **_rw({"aggregator": ANY}, {"researcher": OWN}),
            retained=True, chunked=True, own=_OWNERS),
    Channel("update", "jobs/{owner}/{job}/updates/{node}", **_rw({"node": OWN}, {"aggregator": ANY}), named="node"),
    # secure aggregation (docs/secure-aggregation.md): a site's stage messages, and the server's
    # stage state (public keys, share boxes routed per recipient, survivors), retained so a
    # site that reconnects mid-round finds what it needs
    Channel("secagg_site", "jobs/{owner}/{job}/secagg/{node}", **_rw({"node": OWN}, {"aggregator": ANY}), named="node"),
    Channel("secagg", "jobs/{owner}/{job}/secagg", **_rw({"aggregator": ANY}, {"node": ANY}), retained=True,
            chunked=True),
    Channel("status", "nodes/{node}/status", **_rw({"node": OWN}, {"researcher": ANY, "aggregator": ANY}),
            retained=True, named="node"),
    # every identity's X25519 public key, signed by its certificate key (common/sealed.py)
    Channel("keys", "keys/{identity}", **_rw({r: OWN for r in ("node", "researcher", "aggregator")},
                                             {r: ANY for r in ("node", "researcher", "aggregator")}),
            retained=True, named="identity"),
    Channel("requests", "nodes/{node}/requests", **_rw({"researcher": ANY, "aggregator": ANY}, {"node": OWN}),
            named="node"),
    # a node's answer goes to the one who asked (or, for a notice about a job, to its owner)
    Channel("replies", "nodes/{node}/replies/{to}", **_rw({"node": OWN}, {"researcher": OWN, "aggregator": ANY}),
            named="node", own={"researcher": "to"}),
    # the aggregator fleet: each aggregator's claim on each job (leases, take-overs), its
    # status, and each job's last durable state for whoever takes the job over
    Channel("claim", "jobs/{owner}/{job}/claims/{aggregator}",
            **_rw({"aggregator": OWN}, {"node": ANY, "researcher": OWN, "aggregator": ANY}),
            retained=True, named="aggregator", own=_OWNERS),
    Channel("checkpoint", "jobs/{owner}/{job}/checkpoints/{aggregator}", **_rw({"aggregator": OWN}, {"aggregator": ANY}),
            retained=True, chunked=True, named="aggregator"),
    Channel("agg_status", "aggregators/{aggregator}/status", **_rw({"aggregator": OWN}, {"researcher": ANY, "aggregator": ANY}),
            retained=True, named="aggregator"),
)}


def acl_rules(role: str) -> list[tuple[str, str]]:
    """Every (access, topic) line of `role`'s ACL; `{me}` stands for the identity's name."""
    if role == "admin":
        return [("readwrite", f"{PREFIX}/#")]
    return [rule for channel in CHANNELS.values() for rule in channel.acl_rules(role)]


def channel_of(topic: str) -> tuple[Channel, dict[str, str]] | None:
    """The channel `topic` belongs to, with its levels (chunk sub-topics are not channels)."""
    for channel in CHANNELS.values():
        levels = channel.match(topic)
        if levels is not None:
            return channel, levels
    return None


def markdown_table() -> str:
    """The channel table as docs/design.md shows it (a test keeps the two equal)."""
    def who(c: Channel, access: dict[str, Access]) -> str:
        return ", ".join(f"{role}{f' (where {{{c.own_level(role)}}} is itself)' if a == OWN else ''}"
                         for role, a in access.items() if role != "admin")

    lines = ["| topic (`fbm/v1/` omitted) | written by | read by | retained |", "|---|---|---|---|"]
    for c in CHANNELS.values():
        kept = ("yes, chunks on `/c/{i}`" if c.chunked else "yes") if c.retained else "no"
        lines.append(f"| `{c.template}` | {who(c, c.writers)} | {who(c, c.readers)} | {kept} |")
    return "\n".join(lines)


def acl_markdown() -> str:
    """Every role's ACL lines as SECURITY.md shows them (a test keeps the two equal); `{me}` is
    the identity's own name, `+` any one level."""
    lines = ["| role | access | topic (`fbm/v1/` omitted) |", "|---|---|---|"]
    for role in ROLES:
        for access, topic in acl_rules(role):
            lines.append(f"| {role} | {access} | `{topic.removeprefix(PREFIX + '/')}` |")
    return "\n".join(lines)
