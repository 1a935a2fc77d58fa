"""The federation's topic names, built from the channel table in common/protocol.py."""

from __future__ import annotations

import re

from common.protocol import CHANNELS, CHUNK_LEVEL, PREFIX, channel_of

__all__ = ["CHUNK_LEVEL", "PREFIX"]
_LEVEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # job ids (JOB_ID_PATTERN) and identity names


def _level(value: str) -> str:
    """`value` as one topic level: refused if it could add a level, a wildcard or a line break
    (fullmatch: `re.match` with `$` lets a final "\n" through)."""
    if not isinstance(value, str) or not _LEVEL.fullmatch(value):
        raise ValueError(f"{value!r} is not a job id or identity name usable in a topic")
    return value


def _topic(channel: str, **levels: str) -> str:
    return CHANNELS[channel].topic(**{k: _level(v) for k, v in levels.items()})


def job(owner: str, job_id: str) -> str:
    """Where `owner`'s job `job_id` lives (retained; only its owner may write it)."""
    return _topic("job", owner=owner, job=job_id)


def model(owner: str, job_id: str) -> str:
    return _topic("model", owner=owner, job=job_id)


def update(owner: str, job_id: str, node: str) -> str:
    return _topic("update", owner=owner, job=job_id, node=node)


def history(owner: str, job_id: str) -> str:
    """The job's closed rounds with every node's report (retained; its owner reads it)."""
    return _topic("history", owner=owner, job=job_id)


def secagg(owner: str, job_id: str) -> str:
    """The server's secure-aggregation stage state (retained; nodes read it)."""
    return _topic("secagg", owner=owner, job=job_id)


def secagg_site(owner: str, job_id: str, node: str) -> str:
    """A site's secure-aggregation messages (its own; the aggregator reads them)."""
    return _topic("secagg_site", owner=owner, job=job_id, node=node)


def events(owner: str, job_id: str) -> str:
    return _topic("events", owner=owner, job=job_id)


def status(node: str) -> str:
    return _topic("status", node=node)


def requests(node: str) -> str:
    return _topic("requests", node=node)


def replies(node: str, to: str) -> str:
    """`node`'s answers to `to` (who asked, or the owner of the job a notice is about)."""
    return _topic("replies", node=node, to=to)


def replies_to(me: str) -> str:
    """The filter of every node's replies addressed to `me`."""
    return CHANNELS["replies"].filter(to=_level(me))


def claim(owner: str, job_id: str, aggregator: str) -> str:
    """`aggregator`'s claim on the job (retained; its own)."""
    return _topic("claim", owner=owner, job=job_id, aggregator=aggregator)


def checkpoint(owner: str, job_id: str, aggregator: str) -> str:
    """The job's last durable state as `aggregator` left it (retained; aggregators only)."""
    return _topic("checkpoint", owner=owner, job=job_id, aggregator=aggregator)


def agg_status(aggregator: str) -> str:
    return _topic("agg_status", aggregator=aggregator)


def keys(identity: str) -> str:
    """Where `identity` publishes its encryption key (retained)."""
    return _topic("keys", identity=identity)


def every(channel: str) -> str:
    """The filter of every topic of `channel` (e.g. every job's model: `fbm/v1/jobs/+/+/model`)."""
    return CHANNELS[channel].filter()


def chunk(topic: str, index: int) -> str:
    """Where chunk `index` of a retained payload on `topic` lives (one retained message a topic)."""
    return f"{topic}/{CHUNK_LEVEL}/{index}"


def chunk_filter(topic: str) -> str:
    return f"{topic}/{CHUNK_LEVEL}/+"


def base_of_chunk(topic: str) -> str | None:
    """The main topic of a retained-chunk topic, or None if `topic` is not one."""
    head, sep, index = topic.rpartition(f"/{CHUNK_LEVEL}/")
    return head if sep and index.isdigit() else None


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic-filter matching ('+' one level, '#' the rest, including the parent)."""
    f_parts = topic_filter.split("/")
    t_parts = topic.split("/")
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts):
            return False
        if part != "+" and part != t_parts[i]:
            return False
    return len(f_parts) == len(t_parts)


def writer_of(topic: str) -> str | None:
    """The one identity allowed to write `topic`, for channels whose topic names it."""
    found = channel_of(topic)
    if found is None or not found[0].written_by_named:
        return None
    return found[1][found[0].named]


def job_of(topic: str) -> str | None:
    """The job a `fbm/v1/jobs/{owner}/{job}...` topic is about."""
    parts = topic.split("/")
    return parts[4] if len(parts) >= 5 and parts[2] == "jobs" else None


def owner_of(topic: str) -> str | None:
    """The owner named by a `fbm/v1/jobs/{owner}/{job}...` topic."""
    parts = topic.split("/")
    return parts[3] if len(parts) >= 5 and parts[2] == "jobs" else None


def addressee_of(topic: str) -> str | None:
    """Whom a node's reply topic `fbm/v1/nodes/{node}/replies/{to}` is addressed to."""
    levels = CHANNELS["replies"].match(topic)
    return levels["to"] if levels else None
