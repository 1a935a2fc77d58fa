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


def job(job_id: str) -> str:
    return _topic("job", job=job_id)


def model(job_id: str) -> str:
    return _topic("model", job=job_id)


def update(job_id: str, node: str) -> str:
    return _topic("update", job=job_id, node=node)


def history(job_id: str) -> str:
    """The job's closed rounds with every node's report (retained; researchers read it)."""
    return _topic("history", job=job_id)


def secagg(job_id: str) -> str:
    """The server's secure-aggregation stage state (retained; nodes read it)."""
    return _topic("secagg", job=job_id)


def secagg_site(job_id: str, node: str) -> str:
    """A site's secure-aggregation messages (its own; the aggregator reads them)."""
    return _topic("secagg_site", job=job_id, node=node)


def events(job_id: str) -> str:
    return _topic("events", job=job_id)


def status(node: str) -> str:
    return _topic("status", node=node)


def requests(node: str) -> str:
    return _topic("requests", node=node)


def replies(node: str) -> str:
    return _topic("replies", node=node)


def keys(identity: str) -> str:
    """Where `identity` publishes its encryption key (retained)."""
    return _topic("keys", identity=identity)


def every(channel: str) -> str:
    """The filter of every topic of `channel` (e.g. every job's model: `fbm/v1/jobs/+/model`)."""
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
    """The job a `fbm/v1/jobs/{job}...` topic is about."""
    parts = topic.split("/")
    return parts[3] if len(parts) >= 4 and parts[2] == "jobs" else None
