"""Issue 21: only training processes import torch. The node process (`fbm-node start`), the broker,
`fbm-node doctor` and `fbm-node ui` never do, observed from outside: a process that imported
torch has libtorch mapped (/proc/PID/maps), and a child process reports its own `sys.modules`."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from broker.local import LocalFederation, free_port
from common.identity import Identity
from researcher.experiment import Experiment
from scripts import fmnist
from tests.conftest import wait_until

pytestmark = pytest.mark.integration


def _maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def _children(pid: int) -> list[int]:
    """Every child of `pid`, whichever of its threads started it."""
    return [int(k) for task in Path(f"/proc/{pid}/task").iterdir() for k in (task / "children").read_text().split()]


def _run_then_report(role: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`fbm-ROLE ARGV...` in a fresh interpreter that says afterwards whether torch was imported."""
    code = (f"import sys\nfrom {role}.cli import main\nsys.argv = ['fbm-{role}', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('TORCH-IMPORTED' if 'torch' in sys.modules else 'TORCH-ABSENT')\n")
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)


def test_the_node_modules_import_no_torch():
    code = ("import sys\nimport node.cli, node.service, node.doctor, node.trainer, broker.cli\n"
            "import node.ui.app, node.ui.views\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_the_catalog_matches_the_zoo():
    from common.training.catalog import ZOO_ALGORITHMS
    from common.training.zoo import ZOO

    assert {name: tuple(cls.supported_algorithms) for name, cls in ZOO.items()} == ZOO_ALGORITHMS


@pytest.fixture(scope="module")
def fed():
    fed = LocalFederation().start()
    try:
        shards = fmnist.write_shards(fed.root / "data", 1, limit=300, seed=3)
        fed.add_nodes(fed.shard_datasets(["light-1"], shards))
        fed.add_aggregator("agg-light")
        fed.enroll("alice", "researcher")
        fed.wait_online({"light-1"})
        yield fed
    finally:
        fed.stop()
        shutil.rmtree(fed.root, ignore_errors=True)


def test_a_training_node_process_never_imports_torch_only_its_training_process_does(fed):
    node = fed.process("node-light-1")
    assert not _maps_torch(node.pid)
    exp = Experiment(Identity.load(fed.ws.bundle_dir("alice")), plan="mlp", tags=["fmnist"], rounds=1, quorum=1,
                     model_args={"hidden": [16]}, training_args={"epochs": 1, "batch_size": 32}, round_deadline_s=120)
    trained_in: list[int] = []

    def a_child_has_torch() -> bool:  # the node's own template's, or the host's (LocalFederation's)
        parents = [node.pid, *(p.pid for label, p in fed.procs if label == "template")]
        trained_in.extend(k for parent in parents for k in _children(parent) if _maps_torch(k))
        return bool(trained_in)

    try:
        exp.submit()
        assert wait_until(a_child_has_torch, 120)  # the job's training process (forked from the template)
        state = exp.watch(timeout_s=180, progress=False)
    finally:
        exp.close()
    assert state.status == "done", state.reason
    assert not _maps_torch(node.pid), "the node process imported torch"


def test_the_broker_cli_doctor_and_the_console_never_import_torch(fed):
    site = fed.root / "nodes" / "light-1"
    doctor = _run_then_report("node", ["doctor", "--dir", str(site)])
    assert doctor.stdout.strip().endswith("TORCH-ABSENT"), doctor.stdout + doctor.stderr
    for argv in (["status", str(fed.ws.root)], ["identities", str(fed.ws.root)]):
        broker = _run_then_report("broker", argv)
        assert broker.stdout.strip().endswith("TORCH-ABSENT"), broker.stdout + broker.stderr
    added = subprocess.run([sys.executable, "-m", "node", "user", "add", "steward", "--dir", str(site),
                            "--password-stdin"], input="long enough pw\n", text=True, capture_output=True, timeout=60)
    assert added.returncode == 0, added.stdout
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "node", "ui", "--dir", str(site), "--port", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def served() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).status == 200
            except OSError:
                return False

        assert wait_until(served, 60)
        for page in ("/login", "/"):  # rendered, or refused (redirected to log in): either way served
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}{page}", timeout=5).read()
        assert not _maps_torch(ui.pid)
    finally:
        ui.terminate()
        ui.wait(timeout=20)
