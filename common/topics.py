"""The federation's topic names (DESIGN.md section 3), built in one place."""

from __future__ import annotations

import re

PREFIX = "fbm/v1"
CHUNK_LEVEL = "c"
_LEVEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # job ids (JOB_ID_PATTERN) and identity names


def _level(value: str) -> str:
    """`value` as one topic level: refused if it could add a level, a wildcard or a line break
    (fullmatch: `re.match` with `$` lets a final "\n" through)."""
    if not isinstance(value, str) or not _LEVEL.fullmatch(value):
        raise ValueError(f"{value!r} is not a job id or identity name usable in a topic")
    return value


def job(job_id: str) -> str:
    return f"{PREFIX}/jobs/{_level(job_id)}"


def model(job_id: str) -> str:
    return f"{PREFIX}/jobs/{_level(job_id)}/model"


def update(job_id: str, node: str) -> str:
    return f"{PREFIX}/jobs/{_level(job_id)}/updates/{_level(node)}"


def history(job_id: str) -> str:
    """The job's closed rounds with every node's report (retained; researchers read it)."""
    return f"{PREFIX}/jobs/{_level(job_id)}/history"


def events(job_id: str) -> str:
    return f"{PREFIX}/jobs/{_level(job_id)}/events"


def status(node: str) -> str:
    return f"{PREFIX}/nodes/{_level(node)}/status"


def requests(node: str) -> str:
    return f"{PREFIX}/nodes/{_level(node)}/requests"


def replies(node: str) -> str:
    return f"{PREFIX}/nodes/{_level(node)}/replies"


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
    """The one identity allowed to write `topic`, for topics that name one (DESIGN.md 3)."""
    parts = topic.split("/")
    if len(parts) == 5 and parts[2] == "nodes" and parts[4] in ("status", "replies"):
        return parts[3]
    if len(parts) == 6 and parts[2] == "jobs" and parts[4] == "updates":
        return parts[5]
    return None


def job_of(topic: str) -> str | None:
    """The job a `fbm/v1/jobs/{job}...` topic is about."""
    parts = topic.split("/")
    return parts[3] if len(parts) >= 4 and parts[2] == "jobs" else None
