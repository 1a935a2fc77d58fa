"""Many simulated sites in one process, through the real broker: a developer's federation.

Each simulated node is a real identity (its own certificate), with its own MQTT connection and
persistent session, its own status, its own signed updates; the broker and the aggregator
cannot tell it from a real site. What is shared is the process: one event-loop thread drives
every connection (paho's external-loop API over one epoll selector; a group of sites trains,
or one site's update is sent, per turn, between reads, so messages keep flowing), a message that reaches
all nodes (the job, the round's model) is checked and decoded once, and training runs in one
warm interpreter with torch imported once: the sites waiting for the same model train in one
batched pass (`node.batched.train_many`: each site's update equals what `node.worker.train`
gives it, within float rounding), or site by site with `node.worker.train` for what that
cannot reproduce exactly (other local algorithms, Adam, validation splits, DP).

Secure aggregation (issue 20) runs the real protocol per simulated site: each has its own
`node.secagg.SecureRounds` (the node's), answers the aggregator's retained stage state (decoded
once for the fleet) on its own `jobs/{job}/secagg/{node}` topic, signed with its own identity;
the next round's early shares (made after the unmask answers) run when the loop is idle (no
reads, no training), so they do not slow the unmask stage down. `silent` makes chosen sites stop answering at a stage (fault injection for tests, benchmarks).

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
from collections import OrderedDict, deque
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

from common import chunking, sealed, topics
from common.envelope import Message, SealTo, open_envelope, peek_header, seal
from common.errors import BadMessage, Reason
from common.identity import Identity, TrustStore
from common.messages import DatasetInfo, EncKey, JobKey, JobSpec, NodeStatus, Update
from common.sealed import ContentKeys, Keyring, is_sealed
from common.secagg.simulate import DROP_POINTS
from common.training.loader import load_plan_class
from node import jobs as site
from node.datasets import LoadedData
from node.jobs import Lookups, SiteJobs
from node.plans import PlanStatus
from node.registry import Dataset
from node.secagg import SecureRounds, as_params

# what a simulated site acts on; the rest (acks, requests) is not even opened: it re-sends nothing
_ACTED_ON = frozenset({"enc_key", "job_key", "secagg_state", "job", "model"})
# a site silent from DROP_POINTS[point] sends nothing of that stage or after
_SECAGG_ORDER = ("secagg_keys", "secagg_shares", "secagg_masked", "secagg_unmask")

log = structlog.get_logger("simulation")


def synthetic_data(index: int, samples: int, features: int = 10, classes: int = 2) -> LoadedData:
    """A small classification set per node (its own seed, its own class balance)."""
    gen = torch.Generator().manual_seed(1000 + index)
    y = torch.randint(0, classes, (samples,), generator=gen)
    centres = torch.randn(classes, features, generator=torch.Generator().manual_seed(7))
    x = centres[y] + 0.8 * torch.randn(samples, features, generator=gen)
    return LoadedData(x, y, {"n_samples": samples, "shape": [features], "n_classes": classes})


def _site_jobs(name: str, tag: str, samples: int) -> SiteJobs:
    """A simulated site decides on jobs and rounds as a real one does (node/jobs.py), with its
    lookups fixed: zoo plans only (trusted), one dataset with the fleet's tag, no caps, no
    privacy policy."""
    dataset = Dataset("sim", "npz", "", [tag], "synthetic", None, None, {"n_samples": samples}, 0.0)
    return SiteJobs(name, Lookups(
        refusal=lambda spec: None if spec.plan.zoo is not None else "simulated nodes run zoo plans only",
        datasets=lambda tags: [dataset] if set(tags) <= {tag} else [],
        privacy_refusal=lambda spec, ds: None,
        plan_status=lambda spec: PlanStatus.APPROVED))


@dataclass
class _Sim:
    """One simulated site."""

    identity: Identity
    data: LoadedData
    client: mqtt.Client
    site: SiteJobs
    connected: bool = False
    secure: SecureRounds | None = None  # its secure-aggregation rounds, one per job
    keyring: Keyring | None = None
    given: dict[str, dict[str | None, bytes]] = field(default_factory=dict)  # topic -> sender -> content key
    held: dict[str, bytes] = field(default_factory=dict)  # topic -> a message sealed for others (its key may come)

    def __post_init__(self) -> None:
        self.keyring = Keyring.of(self.identity.name, self.identity.key)


class SimulatedFleet:
    """N node identities in one process (see the module docstring)."""

    def __init__(self, bundles: list[Path], *, tag: str = "sim", samples: int = 32, features: int = 10,
                 connect_workers: int = 4, keepalive_s: int = 60, silent: dict[str, str] | None = None,
                 keep_updates: bool = False) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < len(bundles) + 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, len(bundles) + 1024), hard))
        self.tag, self.keepalive_s, self.connect_workers = tag, keepalive_s, connect_workers
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._pending: queue.Queue[Callable[[], None]] = queue.Queue()  # work for the loop thread
        self._trainings: deque[Callable[[], None]] = deque()  # one runs per loop turn, between reads
        # sites waiting to train, by (job, round, model): each group trains in one batched pass
        self._to_train: OrderedDict[tuple[str, int, int], list[tuple[_Sim, site.Train]]] = OrderedDict()
        self._background: deque[Callable[[], None]] = deque()  # one runs per idle loop turn (no reads, no training)
        self._decoded: OrderedDict[bytes, Message | None] = OrderedDict()  # one decode per distinct payload
        self._sealed_headers: OrderedDict[bytes, dict] = OrderedDict()  # payload sha256 -> its sealed header
        self._plan_classes: dict[str, Any] = {}  # zoo name -> plan class
        self._stop = threading.Event()
        self.updates_sent = 0
        self._keys: dict[str, bytes] = {}  # aggregators' (and everyone's) encryption keys
        self._content_keys = ContentKeys(max_streams=4 * len(bundles) + 4096)  # one per node's update stream: kept
        self._model_sender: dict[str, str] = {}  # job -> the aggregator of its last model (updates are sealed for it)
        self.silent = dict(silent or {})  # node -> a DROP_POINTS key
        self.trained_updates: dict[tuple[str, str, int], tuple[dict[str, torch.Tensor], int]] | None = (
            {} if keep_updates else None)  # (node, job, round) -> (params, n_samples), for tests
        self.nodes: dict[str, _Sim] = {}
        for i, bundle in enumerate(bundles):
            identity = Identity.load(bundle)
            sim = _Sim(identity, synthetic_data(i, samples, features), self._client(identity),
                       _site_jobs(identity.name, tag, samples))
            sim.secure = SecureRounds(identity.name, self._secagg_sender(sim), defer=self._background.append)
            self.nodes[identity.name] = sim
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
        offline = seal(identity, "node_status", NodeStatus(state="offline"), topic=topics.status(identity.name))[1]
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
            events = self.sel.select(timeout=0 if self._trainings or self._to_train or self._background else 0.05)
            for key, mask in events:
                self._serve(key.data, mask)
                # keepalives between events too: a burst of N deliveries trains N nodes in a row,
                # which on a loaded machine outlasts 1.5 keepalives (the broker then drops them)
                last_misc = self._misc(last_misc)
            while True:
                try:
                    self._pending.get_nowait()()
                except queue.Empty:
                    break
            if self._trainings:  # one site's training or sending, then the sockets again: the others'
                self._trainings.popleft()()  # messages (stage states, acks) are read while the fleet trains
            elif self._to_train:
                self._train_group(*self._to_train.popitem(last=False))
            elif self._background and not any(mask & selectors.EVENT_READ for _, mask in events):
                self._background.popleft()()  # e.g. the next round's early shares: after the unmask answers
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
            if sim.client.want_write():  # a ping out now: the selector may next return 10,000 reads first
                sim.client.loop_write()
        return now

    # --- protocol --------------------------------------------------------------------------------

    def _on_connect(self, client, name, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("sim_connect_refused", node=name, reason=str(reason_code))
            return
        sim = self.nodes[name]
        sim.connected = True
        filters = [(topics.every("job"), 0), (topics.every("model"), 0), (topics.every("secagg"), 0),
                   (topics.requests(name), 1)]
        if name == next(iter(self.nodes)):  # one node learns the keys for all (to seal updates)
            filters.append((topics.every("keys"), 0))
        client.subscribe(filters)
        assert sim.keyring is not None
        key = seal(sim.identity, "enc_key", EncKey(key=sim.keyring.public), topic=topics.keys(name))[1]
        client.publish(topics.keys(name), key, qos=1, retain=True)
        info = DatasetInfo(name="sim", tags=[self.tag], type="npz", n_samples=len(sim.data),
                           shape=list(sim.data.meta["shape"]), n_classes=sim.data.meta.get("n_classes"))
        status = seal(sim.identity, "node_status", NodeStatus(state="online", datasets=[info], version="sim"),
                      topic=topics.status(name))[1]
        client.publish(topics.status(name), status, qos=1, retain=True)

    def _open(self, payload: bytes, topic: str, sim: _Sim) -> Message | None:
        """Check and decode a payload once, however many simulated nodes receive it: once per
        node if it is sealed with a wrap for each (each opens it with its own key), once per
        content key if it is sealed with a key given to the nodes (`job_key`: a model for many).
        Types the fleet does not act on (acks: it re-sends nothing) are not opened at all."""
        if not payload or chunking.frame_kind(payload) != "message":
            return None
        try:
            header = peek_header(payload)  # not trusted: which key to try, whether to open at all
        except BadMessage:
            header = {}
        if header and header.get("type") not in _ACTED_ON:
            return None
        digest = hashlib.sha256(payload).digest()
        keys = sim.given.get(topic, {})
        given = keys.get(header.get("sender")) or keys.get(None) or self._own_wrap(sim, digest, header)
        key = digest + topic.encode()
        if given is not None:
            key += b"\0k" + given
        elif is_sealed(header.get("body") or b""):
            key += b"\0" + sim.identity.name.encode()
        if key in self._decoded:
            return self._decoded[key]
        msg: Message | None = None
        try:
            msg = self._open_as(sim, payload, topic, given)
        except BadMessage as exc:
            if exc.reason in (Reason.NOT_A_RECIPIENT, Reason.BAD_SEAL) and topics.job_of(topic):  # its key may come (`job_key`)
                sim.held[topic] = payload
                return None
            log.warning("sim_message_dropped", topic=topic, node=sim.identity.name, reason=exc.reason)
        self._decoded[key] = msg
        if len(self._decoded) > 256:
            self._decoded.popitem(last=False)
        return msg

    def _own_wrap(self, sim: _Sim, digest: bytes, header: dict) -> bytes | None:
        """The content key in `sim`'s own wrap of a sealed body (its own key agreement), None if
        it has none; the sealed header is parsed once per payload for all sites (a job for
        10,000 nodes carries 10,000 wraps: parsed by each, O(N^2), it outlasted keepalives)."""
        body = header.get("body") or b""
        if not is_sealed(body):
            return None
        parsed = self._sealed_headers.get(digest)
        if parsed is None:
            try:
                parsed = self._sealed_headers[digest] = sealed.header_of(body)
            except sealed.SealError:
                return None
            while len(self._sealed_headers) > 16:
                self._sealed_headers.popitem(last=False)
        try:
            return sealed.unwrap(sim.keyring, parsed) if sim.keyring is not None else None
        except sealed.SealError:
            return None  # not for it: opened (and refused) the usual way

    def _open_as(self, sim: _Sim, payload: bytes, topic: str, given: bytes | None) -> Message:
        """Open with the key given to `sim`, else (or if the message was sealed with a newer key,
        wrapped for `sim` in the message) with `sim`'s own key."""
        try:
            return open_envelope(payload, self.trust, topic, keyring=sim.keyring, content_key=given)
        except BadMessage as exc:
            if given is None or exc.reason != Reason.BAD_SEAL:
                raise
        return open_envelope(payload, self.trust, topic, keyring=sim.keyring)

    def _on_message(self, client, name, message) -> None:
        self._deliver(self.nodes[name], message.topic, bytes(message.payload))

    def _deliver(self, sim: _Sim, topic: str, payload: bytes) -> None:
        msg = self._open(payload, topic, sim)
        if msg is None:
            return
        if msg.type == "enc_key" and topics.writer_of(topic) == msg.sender:
            self._keys[msg.sender] = msg.body.key  # type: ignore[attr-defined]
        elif msg.type == "job_key" and topic == topics.requests(sim.identity.name):
            self._key_given(sim, msg)
        elif msg.type == "secagg_state":
            job = topics.job_of(topic) or ""
            kept = sim.site.jobs.get(job)
            if kept is not None and topic == topics.secagg(kept.spec.owner, job) and sim.secure is not None:
                sim.secure.on_state(job, msg.body)  # type: ignore[arg-type]
        elif msg.type == "job":
            self._perform(sim, sim.site.on_job(msg))
        elif msg.type == "model":
            self._model_sender[topics.job_of(topic) or ""] = msg.sender
            self._perform(sim, sim.site.on_model(msg, time.monotonic()))

    def _key_given(self, sim: _Sim, msg: Message) -> None:
        """A content key an aggregator gave this site (as to a node: node/service.py): it opens
        that aggregator's models of the job (or the job), and the one held, if any, now."""
        body: JobKey = msg.body  # type: ignore[assignment]
        topic, by = body.opens(msg.sender)
        sim.given.setdefault(topic, {})[by] = body.key
        held = sim.held.pop(topic, None)
        if held is not None:
            self._deliver(sim, topic, held)

    def _perform(self, sim: _Sim, actions: list[site.Action]) -> None:
        """What a simulated site does of its decisions: train, and take a held model again. It
        sends no replies and keeps no updates to re-send (see the module docstring)."""
        for action in actions:
            if isinstance(action, site.Train):
                spec = sim.site.jobs[action.job].spec
                if spec.secure_aggregation is not None and sim.secure is not None:
                    # keys and shares need no input: answered now, while the fleet trains (like a node)
                    sim.secure.open(spec, action.round, as_params(dict(action.params)))
                key = (action.job, action.round, id(action.params))  # the model decoded once for the fleet
                self._to_train.setdefault(key, []).append((sim, action))
            elif isinstance(action, site.Replay):
                self._perform(sim, sim.site.on_model(action.msg, time.monotonic()))

    def _train_group(self, key: tuple[str, int, int], group: list[tuple[_Sim, site.Train]]) -> None:
        """Train the sites waiting for one model of one job: in one batched pass where that equals
        each site's own `train` (node/batched.py), else site by site; each sends on its own turn."""
        from node.batched import train_many

        group = [(sim, task) for sim, task in group if task.job in sim.site.jobs]  # e.g. withdrawn since
        if not group:
            return
        spec = group[0][0].site.jobs[group[0][1].job].spec
        results = train_many(_task_args(spec, group[0][1]), [sim.data for sim, _ in group], self._plan_class(spec))
        if results is None:
            self._trainings.extend(lambda sim=sim, task=task: self._train_and_send(sim, task) for sim, task in group)
            return
        self._trainings.extend(lambda sim=sim, task=task, result=result: self._send_update(sim, task, result)
                               for (sim, task), result in zip(group, results, strict=True))

    def _train_and_send(self, sim: _Sim, task: site.Train) -> None:
        from node.worker import train

        spec = sim.site.jobs[task.job].spec
        self._send_update(sim, task, train(_task_args(spec, task), sim.data, self._plan_class(spec)))

    def _send_update(self, sim: _Sim, task: site.Train, result: dict[str, Any]) -> None:
        """Seal, sign and publish one site's update (or give it to its secure round)."""
        spec = sim.site.jobs[task.job].spec
        params = {k: torch.from_numpy(v) if not isinstance(v, torch.Tensor) else v for k, v in result["params"].items()}
        if self.trained_updates is not None:
            self.trained_updates[(sim.identity.name, task.job, task.round)] = (params, result["n_samples"])
        if spec.secure_aggregation is not None and sim.secure is not None:  # masked, never in the clear
            sim.secure.set_input(task.job, task.round, params, result["n_samples"])
            return
        update = Update(round=task.round, params=params, n_samples=result["n_samples"],
                        metrics=result["metrics"], timings=result["timings"], dataset="sim")
        topic = topics.update(spec.owner, task.job, sim.identity.name)
        aggregator = self._model_sender.get(task.job, "")
        if aggregator not in self._keys:  # never in clear: the node skips the round instead
            log.warning("sim_update_not_sent", node=sim.identity.name, job=task.job, reason=f"no key of {aggregator}")
            return
        to = SealTo(self._content_keys.for_recipients(topic, {aggregator: self._keys[aggregator]}), (aggregator,))
        wire = seal(sim.identity, "update", update, job=task.job, round_=task.round, seal_to=to, topic=topic)[1]
        sim.client.publish(topic, wire, qos=1)
        self.updates_sent += 1

    def _secagg_sender(self, sim: _Sim) -> Callable[[str, str, Any], None]:
        """How `sim` sends its stage messages: signed by it, on its own topic (from the loop thread),
        unless it went silent at that stage."""
        def send(topic: str, type_: str, body: Any) -> None:
            silent_from = DROP_POINTS.get(self.silent.get(sim.identity.name, ""), len(_SECAGG_ORDER))
            if _SECAGG_ORDER.index(type_) >= silent_from:
                return
            wire = seal(sim.identity, type_, body, job=topics.job_of(topic), round_=body.round, topic=topic)[1]
            sim.client.publish(topic, wire, qos=1)
            sim.client.loop_write()  # out now: the loop thread may train other sites next (a site trains
            # while its keys and shares travel; without this they would wait for every training)

        return send

    def _plan_class(self, spec: JobSpec) -> Any:
        key = spec.plan.zoo
        if key not in self._plan_classes:
            self._plan_classes[key] = load_plan_class(spec.plan)
        return self._plan_classes[key]


def _task_args(spec: JobSpec, task: site.Train) -> dict[str, Any]:
    """A round's task as `node.worker.train` (and `node.batched.train_many`) take it."""
    return {"job": task.job, "round": task.round, "plan": spec.plan.model_dump(), "model_args": spec.model_args,
            "training_args": spec.training_args, "params": dict(task.params), "extra": {}, "local_state": {}}
