"""What the running node tells the outside about itself through its database (the web console's
Status page): a heartbeat and whether it is connected to the broker."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from node.db import Database

HEARTBEAT = "heartbeat"


@dataclass(frozen=True)
class Heartbeat:
    at: float
    connected: bool
    broker: str
    jobs: list[str]

    def age_s(self, now: float | None = None) -> float:
        return (now or time.time()) - self.at


class NodeState:
    """A small key/value table the node process writes and the console reads."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def put(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO node_state (key, value, updated_at) VALUES (?, ?, ?)",
                        (key, json.dumps(value), time.time()))

    def get(self, key: str) -> tuple[Any, float] | None:
        rows = self.db.execute("SELECT value, updated_at FROM node_state WHERE key = ?", (key,))
        return (json.loads(rows[0]["value"]), rows[0]["updated_at"]) if rows else None

    def beat(self, connected: bool, broker: str, jobs: list[str]) -> None:
        self.put(HEARTBEAT, {"connected": connected, "broker": broker, "jobs": jobs})

    def heartbeat(self) -> Heartbeat | None:
        got = self.get(HEARTBEAT)
        if got is None:
            return None
        value, at = got
        return Heartbeat(at=at, connected=bool(value.get("connected")), broker=str(value.get("broker", "")),
                         jobs=list(value.get("jobs", [])))
