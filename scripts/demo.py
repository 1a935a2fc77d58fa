"""`make demo`: a local federation, three identities, signed messages through the TLS broker."""

from __future__ import annotations

import queue

import torch
from rich.console import Console
from rich.table import Table

from broker.local import LocalFederation
from common import topics
from common.identity import Identity
from common.logging import configure_logging
from common.messages import GlobalModel, Reply, Request
from common.messenger import Messenger


def main() -> None:
    console = Console()
    configure_logging("warning")
    with LocalFederation() as fed:
        console.print(f"[bold]broker[/bold] up on 127.0.0.1:{fed.port} (workspace {fed.ws.root})")
        ids = {name: Identity.load(fed.enroll(name, role)) for name, role in
               [("hospital-a", "node"), ("fedavg-1", "aggregator"), ("alice", "researcher")]}
        node, agg, res = (Messenger(ids[n]) for n in ("hospital-a", "fedavg-1", "alice"))
        seen: queue.Queue = queue.Queue()

        def on_request(msg):
            seen.put(("hospital-a", msg))
            node.send(topics.replies("hospital-a"), "reply",
                      Reply(command=msg.body.command, in_reply_to=msg.id, data={"answer": "pong"}))

        node.subscribe(topics.requests("hospital-a"), on_request)
        node.subscribe(topics.model("demo"), lambda m: seen.put(("hospital-a", m)), retained_chunks=True)
        res.subscribe(topics.replies("hospital-a"), lambda m: seen.put(("alice", m)))
        for m in (node, agg, res):
            m.connect()
        res.send(topics.requests("hospital-a"), "request", Request(command="ping", payload={"x": torch.arange(4.0)}))
        agg.send(topics.model("demo"), "model", GlobalModel(round=0, params={"w": torch.zeros(3)}),
                 job="demo", retain=True)
        table = Table("received by", "type", "from (verified role)", "content")
        for _ in range(3):
            who, msg = seen.get(timeout=15)
            content = {"request": lambda b: f"{b.command} + tensor {list(b.payload['x'].shape)}",
                       "reply": lambda b: str(b.data), "model": lambda b: f"round {b.round}, params {list(b.params)}"}
            table.add_row(who, msg.type, f"{msg.sender} ({msg.role})", content[msg.type](msg.body))
        console.print(table)
        agg.clear(topics.model("demo"))
        for m in (node, agg, res):
            m.close()
    console.print("broker stopped; every message above was signed, checked and ACL-filtered")


if __name__ == "__main__":
    main()
