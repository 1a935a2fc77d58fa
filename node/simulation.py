"""Many simulated sites in one process, through the real broker: a developer's federation.

Each simulated node is a real identity (its own certificate), with its own MQTT connection and
persistent session, its own status, its own signed updates; the broker and the aggregator
cannot tell it from a real site. What is shared is the process: one event-loop thread drives
every connection (paho's external-loop API over one epoll selector), a message that reaches
all nodes (the job, the round's model) is checked and decoded once, and training runs in one
warm interpreter with torch imported once, node after node, with the real `node.worker.train`.

Limits (by design, see docs/simulation.md): zoo plans only (no sandbox: nothing foreign runs),
synthetic data made in memory, models small enough to travel unchunked (< 1 MiB), no update
re-sending (a simulated node that loses its connection skips the round), training serial on
one core. Sockets: one per node in this process and in the broker (raise `ulimit -n`); other
paho clients in the same process must connect before the fleet (paho's own threaded loop uses
select(), which cannot watch a file descriptor numbered 1024 or more).
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import resource
import selectors
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import structlog
import torch
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from common import chunking, topics
from common.envelope import Message, open_envelope, seal
from common.errors import BadMessage
from common.identity import Identity, TrustStore
from common.messages import DatasetInfo, NodeStatus, Update, is_selective
from common.training.loader import load_plan_class
from node.datasets import LoadedData

log = structlog.get_logger("simulation")


def synthetic_data(index: int, samples: int, features: int = 10, classes: int = 2) -> LoadedData:
    """A small classification set per node (its own seed, its own class balance)."""
    gen = torch.Generator().manual_seed(1000 + index)
    y = torch.randint(0, classes, (samples,), generator=gen)
    centres = torch.randn(classes, features, generator=torch.Generator().manual_seed(7))
    x = centres[y] + 0.8 * torch.randn(samples, features, generator=gen)
    return LoadedData(x, y, {"n_samples": samples, "shape": [features], "n_classes": classes})


@dataclass
class _Sim:
    """One simulated site."""

    identity: Identity
    data: LoadedData
    client: mqtt.Client
    connected: bool = False
    jobs: set[str] = field(default_factory=set)
    trained: set[tuple[str, int]] = field(default_factory=set)


class SimulatedFleet:
    """N node identities in one process (see the module docstring)."""

    def __init__(self, bundles: list[Path], *, tag: str = "sim", samples: int = 32, features: int = 10,
                 connect_workers: int = 4, keepalive_s: int = 60) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < len(bundles) + 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, len(bundles) + 1024), hard))
        self.tag, self.keepalive_s, self.connect_workers = tag, keepalive_s, connect_workers
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._pending: queue.Queue[Callable[[], None]] = queue.Queue()  # work for the loop thread
        self._decoded: OrderedDict[bytes, Message | None] = OrderedDict()  # one decode per distinct payload
        self._specs: dict[str, Any] = {}  # job id -> its spec
        self._plan_classes: dict[str, Any] = {}  # zoo name -> plan class
        self._stop = threading.Event()
        self.updates_sent = 0
        self.nodes: dict[str, _Sim] = {}
        for i, bundle in enumerate(bundles):
            identity = Identity.load(bundle)
            self.nodes[identity.name] = _Sim(identity, synthetic_data(i, samples, features), self._client(identity))
        first = next(iter(self.nodes.values())).identity
        self.trust = TrustStore(first.ca_pem)
        self.host, self.port = first.broker_host, first.broker_port
        self._thread = threading.Thread(target=self._loop, name="fbm-sim-loop", daemon=True)

    # --- connections -----------------------------------------------------------------------------

    def _client(self, identity: Identity) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=identity.name, protocol=mqtt.MQTTv5)
        c.username_pw_set(identity.name)
        c.tls_set(ca_certs=str(identity.ca_path), certfile=str(identity.cert_path), keyfile=str(identity.key_path),
                  cert_reqs=ssl.CERT_REQUIRED)
        offline = seal(identity, "node_status", NodeStatus(state="offline"))[1]
        c.will_set(topics.status(identity.name), offline, qos=1, retain=True)
        c.user_data_set(identity.name)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_socket_open = lambda client, userdata, sock: self._later(lambda: self._register(client, sock))
        c.on_socket_close = lambda client, userdata, sock: self._later(lambda: self._unregister(sock))
        c.on_socket_register_write = lambda client, userdata, sock: self._later(lambda: self._want_write(client, sock, True))
        c.on_socket_unregister_write = lambda client, userdata, sock: self._later(lambda: self._want_write(client, sock, False))
        return c

    def _later(self, work: Callable[[], None]) -> None:
        """Run `work` on the loop thread (paho calls these from whichever thread touched it)."""
        if threading.current_thread() is self._thread:
            work()
            return
        self._pending.put(work)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _register(self, client: mqtt.Client, sock) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.register(sock, selectors.EVENT_READ, client)

    def _unregister(self, sock) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)

    def _want_write(self, client: mqtt.Client, sock, on: bool) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0), client)

    def start(self, timeout_s: float = 600.0) -> float:
        """Connect every node (TLS handshakes on a few threads); seconds until all are online."""
        started = time.monotonic()
        # training is serial on the loop thread: one torch thread (more spin in OpenMP barriers
        # while the broker and the aggregator want the other cores; measured 20x slower under load)
        torch.set_num_threads(1)
        self._thread.start()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600

        def connect(sim: _Sim) -> None:
            sim.client.connect(self.host, self.port, keepalive=self.keepalive_s, clean_start=False, properties=props)

        with ThreadPoolExecutor(self.connect_workers) as pool:
            list(pool.map(connect, self.nodes.values()))
        while not all(s.connected for s in self.nodes.values()):
            if time.monotonic() - started > timeout_s:
                missing = [n for n, s in self.nodes.items() if not s.connected]
                raise TimeoutError(f"{len(missing)} simulated nodes not connected after {timeout_s:.0f}s: {missing[:5]}...")
            time.sleep(0.05)
        return time.monotonic() - started

    def stop(self) -> None:
        for sim in self.nodes.values():
            self._later(sim.client.disconnect)
        time.sleep(0.5)
        self._stop.set()
        self._thread.join(timeout=10)
        self.sel.close()

    # --- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        last_misc = time.monotonic()
        while not self._stop.is_set():
            for key, mask in self.sel.select(timeout=0.05):
                self._serve(key.data, mask)
                # keepalives between events too: a burst of N deliveries trains N nodes in a row,
                # which on a loaded machine outlasts 1.5 keepalives (the broker then drops them)
                last_misc = self._misc(last_misc)
            while True:
                try:
                    self._pending.get_nowait()()
                except queue.Empty:
                    break
            last_misc = self._misc(last_misc)

    def _serve(self, client: mqtt.Client | None, mask: int) -> None:
        if client is None:
            with contextlib.suppress(BlockingIOError):
                while self._wake_r.recv(4096):
                    pass
            return
        if mask & selectors.EVENT_READ:
            client.loop_read()
            sock = client.socket()
            while isinstance(sock, ssl.SSLSocket) and sock.pending():  # decrypted, unread
                client.loop_read()
        if mask & selectors.EVENT_WRITE:
            client.loop_write()

    def _misc(self, last: float) -> float:
        """paho's keepalive pings and reconnect bookkeeping for every node, every 5 s (keepalive 60 s)."""
        now = time.monotonic()
        if now - last <= 5.0:
            return last
        for sim in self.nodes.values():
            sim.client.loop_misc()
        return now

    # --- protocol --------------------------------------------------------------------------------

    def _on_connect(self, client, name, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("sim_connect_refused", node=name, reason=str(reason_code))
            return
        sim = self.nodes[name]
        sim.connected = True
        client.subscribe([(topics.every("job"), 0), (topics.every("model"), 0), (topics.requests(name), 1)])
        info = DatasetInfo(name="sim", tags=[self.tag], type="npz", n_samples=len(sim.data),
                           shape=list(sim.data.meta["shape"]), n_classes=sim.data.meta.get("n_classes"))
        status = seal(sim.identity, "node_status", NodeStatus(state="online", datasets=[info], version="sim"))[1]
        client.publish(topics.status(name), status, qos=1, retain=True)

    def _open(self, payload: bytes, topic: str) -> Message | None:
        """Check and decode a payload once, however many simulated nodes receive it."""
        key = hashlib.sha256(payload).digest() + topic.encode()
        if key in self._decoded:
            return self._decoded[key]
        msg: Message | None = None
        if payload and chunking.frame_kind(payload) == "message":
            try:
                msg = open_envelope(payload, self.trust, topic)
            except BadMessage as exc:
                log.warning("sim_message_dropped", topic=topic, reason=exc.reason)
        self._decoded[key] = msg
        if len(self._decoded) > 256:
            self._decoded.popitem(last=False)
        return msg

    def _on_message(self, client, name, message) -> None:
        topic = message.topic
        msg = self._open(bytes(message.payload), topic)
        if msg is None:
            return
        sim = self.nodes[name]
        if msg.type == "job":
            spec = msg.body
            if spec.plan.zoo is not None and set(spec.tags) <= {self.tag} and (spec.nodes is None or name in spec.nodes):
                sim.jobs.add(spec.job_id)
                self._specs.setdefault(spec.job_id, spec)
        elif msg.type == "model":
            job = topics.job_of(topic) or ""
            model = msg.body
            if job not in sim.jobs or model.status != "running" or model.open_round is None:
                return
            if is_selective(model.selection) and name not in model.nodes:
                return
            if (job, model.open_round) in sim.trained:
                return
            sim.trained.add((job, model.open_round))
            self._train_and_send(sim, job, model)

    def _train_and_send(self, sim: _Sim, job: str, model) -> None:
        from node.worker import train

        spec = self._specs[job]
        plan_cls = self._plan_class(spec)
        task = {"job": job, "round": model.open_round, "plan": spec.plan.model_dump(), "model_args": spec.model_args,
                "training_args": spec.training_args, "params": dict(model.params), "extra": {}, "local_state": {}}
        result = train(task, sim.data, plan_cls)
        params = {k: torch.from_numpy(v) if not isinstance(v, torch.Tensor) else v for k, v in result["params"].items()}
        update = Update(round=model.open_round, params=params, n_samples=result["n_samples"],
                        metrics=result["metrics"], timings=result["timings"], dataset="sim")
        wire = seal(sim.identity, "update", update, job=job, round_=model.open_round)[1]
        sim.client.publish(topics.update(job, sim.identity.name), wire, qos=1)
        self.updates_sent += 1

    def _plan_class(self, spec) -> Any:
        key = spec.plan.zoo
        if key not in self._plan_classes:
            self._plan_classes[key] = load_plan_class(spec.plan)
        return self._plan_classes[key]
