"""A whole federation on one host, for the demo, the tests and the benchmarks.

It creates a workspace on a free port bound to 127.0.0.1, starts the broker, enrols
identities, and starts role processes (`fbm-node`, `fbm-aggregator`, ...) as real child
processes that it stops, in reverse order, on exit.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from broker import process
from broker.workspace import Workspace
from common import topics
from common.identity import Identity
from common.messenger import Messenger
from common.settings import TransportSettings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reachable_tempdir(prefix: str = "fbm-") -> Path:
    """A temp dir Mosquitto's own user can enter when we run as root (mkdtemp gives 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


class LocalFederation:
    """Broker + identities + role processes in one folder; a context manager."""

    def __init__(self, root: Path | None = None, *, port: int | None = None, name: str = "local",
                 shared_template: bool = True) -> None:
        self.root = Path(root) if root else reachable_tempdir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.ws = Workspace(self.root / "federation")
        self.port = port or free_port()
        self.name = name
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.shared_template = shared_template  # the nodes (one user, one host) share one training template
        self.template_dir: Path | None = None
        self._template_lock = threading.Lock()  # add_nodes starts nodes from several threads

    def start(self) -> LocalFederation:
        if not self.ws.exists():
            self.ws.init(self.name, port=self.port, bind="127.0.0.1")
        process.start(self.ws)
        return self

    def enroll(self, name: str, role: str) -> Path:
        bundle = self.ws.bundle_dir(name)
        if not (bundle / "bundle.json").exists():
            bundle = self.ws.enroll(name, role)
            process.reload(self.ws)
        return bundle

    def spawn(self, label: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
              log: Path | None = None) -> subprocess.Popen:
        """Start a role process; its output goes to `log` (default ROOT/logs/LABEL.log)."""
        log = log or self.root / "logs" / f"{label}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self.procs.append((label, proc))
        return proc

    def run_cli(self, *argv: str) -> str:
        """Run a role's CLI (`python -m node ...`) to completion; raise with its output on failure."""
        done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(argv)}` failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def add_node(self, name: str, datasets: Sequence[dict[str, str]] = (), *, start: bool = True,
                 env: dict[str, str] | None = None, approve: Sequence[tuple[Path, str]] = ()) -> Path:
        """Enrol a node, set up its folder, register `datasets` (dicts of `fbm-node dataset add`
        options: name, type, path, tag, target), approve custom plans given as (file, class),
        and start it."""
        bundle = self.enroll(name, "node")
        node_dir = self.root / "nodes" / name
        if not (node_dir / "node.toml").exists():
            self.run_cli("node", "init", str(node_dir), "--bundle", str(bundle))
            for ds in datasets:
                args = ["node", "dataset", "add", "--dir", str(node_dir)]
                for key, value in ds.items():
                    for v in (value if isinstance(value, list | tuple) else [value]):
                        args += [f"--{key}", str(v)]
                self.run_cli(*args)
            for source, class_name in approve:
                self.run_cli("node", "plan", "approve", "--dir", str(node_dir), "--file", str(source), "--class", class_name)
        if start:
            self.start_node(name, env=env)
        return node_dir

    def add_nodes(self, datasets: Mapping[str, Sequence[dict[str, str]]], *, start: bool = True,
                  env: dict[str, str] | None = None, workers: int = 4) -> None:
        """`add_node` for many sites at once, `workers` in parallel (each spends ~1 s in the
        enrol and `dataset add` CLIs, which would add up for 25 sites)."""
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda item: self.add_node(item[0], item[1], start=start, env=env), datasets.items()))

    @staticmethod
    def shard_datasets(names: Sequence[str], shards: Sequence[Path], *, name: str = "fm",
                       tag: str | list[str] = "fmnist") -> dict[str, list[dict]]:
        """One npz dataset per site: the `datasets` argument of `add_nodes` for data shards."""
        return {n: [{"name": name, "type": "npz", "path": str(p), "tag": tag}] for n, p in zip(names, shards, strict=True)}

    def process(self, label: str) -> subprocess.Popen:
        """The latest process started under `label` (e.g. "node-site-1", "agg-aggregator")."""
        return next(p for lab, p in reversed(self.procs) if lab == label)

    def start_template(self) -> Path:
        """The host's training template for this federation's nodes (`fbm-node template`), started
        once, before the first node; its runtime folder. Stopped last (started first)."""
        with self._template_lock:
            if self.template_dir is None or self.process("template").poll() is not None:
                self.template_dir = self.root / "template"
                self.spawn("template", [sys.executable, "-m", "node", "template", "--runtime-dir", str(self.template_dir)])
            return self.template_dir

    def start_node(self, name: str, *, env: dict[str, str] | None = None) -> subprocess.Popen:
        node_dir = self.root / "nodes" / name
        if self.shared_template:
            env = {"FBM_NODE_TRAINING_TEMPLATE": str(self.start_template()), **(env or {})}
        return self.spawn(f"node-{name}", [sys.executable, "-m", "node", "start", "--dir", str(node_dir)], env=env)

    def add_aggregator(self, name: str = "aggregator", *, start: bool = True, env: dict[str, str] | None = None) -> Path:
        bundle = self.enroll(name, "aggregator")
        if start:
            self.start_aggregator(name, env=env)
        return bundle

    def start_aggregator(self, name: str = "aggregator", *, env: dict[str, str] | None = None) -> subprocess.Popen:
        bundle = self.ws.bundle_dir(name)
        state = self.root / "aggregators" / name
        return self.spawn(f"agg-{name}", [sys.executable, "-m", "aggregators", "start", "--bundle", str(bundle),
                                          "--state-dir", str(state)], env=env)

    def wait_online(self, names: set[str], timeout_s: float = 120.0, *, observer: str = "fbm-observer",
                    aggregators: bool = True) -> None:
        """Block until every node in `names`, and (`aggregators`) every aggregator this federation
        started that still runs, has published an online status (admin observer): a job submitted
        before its aggregator listens would lose the nodes' first answers (declines, pending plans)."""
        got: queue.Queue = queue.Queue()
        identity = Identity.load(self.enroll(observer, "admin"))
        settings = TransportSettings(clean_start=True, session_expiry_s=0)
        m = Messenger(identity, settings, client_id=f"{observer}-{uuid.uuid4().hex[:6]}")
        m.subscribe(topics.every("status"), got.put, types={"node_status"})
        m.subscribe(topics.every("agg_status"), got.put, types={"aggregator_status"})
        m.connect()
        wanted = set(names) | {label[len("agg-"):] for label, proc in self.procs
                               if aggregators and label.startswith("agg-") and proc.poll() is None}
        online: set[str] = set()
        deadline = time.monotonic() + timeout_s
        try:
            while not wanted <= online and time.monotonic() < deadline:
                try:
                    msg = got.get(timeout=0.2)
                except queue.Empty:
                    continue
                (online.add if msg.body.state == "online" else online.discard)(msg.sender)
        finally:
            m.close()
        if not wanted <= online:
            raise TimeoutError(f"not online after {timeout_s:.0f}s: {sorted(wanted - online)}")

    def stop_processes(self, timeout_s: float = 20.0) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for _, proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        self.template_dir = None

    def stop(self) -> None:
        self.stop_processes()
        process.stop(self.ws)

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
