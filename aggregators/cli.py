"""`fbm-aggregator`: the federator service that drives jobs' rounds."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console

from common.errors import ConnectError
from common.identity import Identity
from common.logging import configure_logging
from common.memory import release_large_buffers_to_os, settle_collector
from common.service import run_until_terminated
from common.settings import TransportSettings

console = Console(soft_wrap=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Run a fedbiomq aggregator (federator): it claims jobs, opens and closes rounds, folds the
    nodes' updates with the job's rule and publishes each new global model.

    \b
      fbm-aggregator start --bundle ./fedavg-1 --state-dir ./agg-state
      fbm-aggregator rules
    """


@main.command()
@click.option("--bundle", required=True, envvar="FBM_AGG_BUNDLE", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Identity bundle from `fbm-broker enroll --role aggregator` (or env FBM_AGG_BUNDLE).")
@click.option("--state-dir", required=True, envvar="FBM_AGG_STATE", type=click.Path(file_okay=False, path_type=Path),
              help="Where per-job, per-round checkpoints go; a restart resumes from them.")
@click.option("--log-level", default="info", show_default=True)
@click.option("--connect-timeout", default=0.0, help="Give up if the broker is unreachable this long (0: keep trying).")
@click.option("--threads", default=1, show_default=True, envvar="FBM_AGG_THREADS", type=click.IntRange(1, 256),
              help="torch threads for checking and folding updates (env FBM_AGG_THREADS). Folding is "
                   "memory-bound: with more than one, each small tensor operation waits for a thread "
                   "pool that the nodes' training keeps busy (~50 ms an update on 2 shared cores).")
def start(bundle: Path, state_dir: Path, log_level: str, connect_timeout: float, threads: int) -> None:
    """Run until SIGTERM/Ctrl-C. Broker settings can be overridden with FBM_MQTT_* variables."""
    import torch

    from aggregators.service import AggregatorService

    torch.set_num_threads(threads)
    configure_logging(log_level)
    try:
        identity = Identity.load(bundle)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(1)
    if identity.role != "aggregator":
        console.print(f"[red]error:[/red] {bundle} is a {identity.role} bundle, not an aggregator's")
        sys.exit(1)
    state_dir.mkdir(parents=True, exist_ok=True)
    release_large_buffers_to_os()  # folding many big updates must not grow the heap
    service = AggregatorService(identity, state_dir, TransportSettings())
    settle_collector()  # torch's modules out of every full collection (docs/performance.md)
    try:
        run_until_terminated(service.start, service.stop, connect_timeout)
    except ConnectError as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)


@main.command()
def rules() -> None:
    """List the installed aggregation rules (built in, and from plug-in packages)."""
    from rich.table import Table

    from aggregators.rules import broken_plugins, rule_class, rule_names

    table = Table("rule", "memory", "nodes run", "what it does")
    for name in rule_names():
        cls = rule_class(name)
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        table.add_row(name, "O(model)" if cls.streaming else "N x model", cls.local_algorithm, " ".join(doc.split()))
    console.print(table)
    for name, error in broken_plugins().items():
        console.print(f"[red]plug-in {name!r} failed to load:[/red] {error}")


@main.command()
@click.option("--state-dir", required=True, envvar="FBM_AGG_STATE", type=click.Path(file_okay=False, path_type=Path),
              help="The running aggregator's --state-dir.")
@click.option("--max-age", default=20.0, show_default=True, help="Seconds after which a silent aggregator is unhealthy.")
def health(state_dir: Path, max_age: float) -> None:
    """Exit 0 if the aggregator in STATE_DIR is running and connected, 1 if not (health checks)."""
    import json
    import time

    try:
        beat = json.loads((state_dir / "heartbeat.json").read_text())
    except (OSError, ValueError):
        console.print(f"unhealthy: no heartbeat in {state_dir} (not started?)")
        sys.exit(1)
    age = time.time() - float(beat.get("at", 0))
    if age > max_age or not beat.get("connected"):
        console.print(f"unhealthy: last heartbeat {age:.0f} s ago, connected={beat.get('connected')}")
        sys.exit(1)
    console.print(f"healthy: connected, {len(beat.get('jobs', []))} job(s), heartbeat {age:.0f} s ago")
