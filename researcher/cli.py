"""`fbm-researcher`: see the federation's nodes, submit jobs, follow them, fetch results."""

from __future__ import annotations

import datetime as dt
import queue
import sys
import tomllib
import uuid
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from common import topics
from common.errors import ConnectError, PublishDenied
from common.identity import Identity
from common.logging import configure_logging
from common.messenger import Messenger
from common.training.loader import PlanError
from researcher.experiment import Experiment, JobError, researcher_settings

console = Console(soft_wrap=True)
BUNDLE = click.option("--bundle", required=True, envvar="FBM_RESEARCHER_BUNDLE",
                      type=click.Path(exists=True, file_okay=False, path_type=Path),
                      help="Researcher identity bundle (or env FBM_RESEARCHER_BUNDLE).")

JOB_KEYS = {"plan", "plan_class", "tags", "rounds", "quorum", "round_deadline_s", "stragglers", "aggregator", "aggregator_args",
            "aggregator_identity", "nodes", "selection", "model_args", "training_args", "seed", "description", "job_id"}


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[red]error:[/red] {message}")
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="warning", show_default=True)
def main(log_level: str) -> None:
    """Work with a fedbiomq federation as a researcher.

    \b
      fbm-researcher nodes --bundle ./alice
      fbm-researcher submit job.toml --bundle ./alice --watch
      fbm-researcher status JOB --bundle ./alice
      fbm-researcher results JOB --bundle ./alice --out results/
    """
    configure_logging(log_level)


@main.command()
@BUNDLE
@click.option("--wait", default=2.0, show_default=True, help="Seconds to collect node statuses.")
def nodes(bundle: Path, wait: float) -> None:
    """List the federation's nodes (online or offline) and their datasets."""
    identity = Identity.load(bundle)
    got: queue.Queue = queue.Queue()
    m = Messenger(identity, researcher_settings(), client_id=uuid.uuid4().hex[:8])
    m.subscribe(topics.every("status"), got.put, types={"node_status"})
    try:
        m.connect()
    except ConnectError as exc:
        _fail(str(exc), 2)
    statuses: dict[str, Any] = {}
    try:
        while True:
            msg = got.get(timeout=wait)
            statuses[msg.sender] = msg
    except queue.Empty:
        pass
    m.close()
    table = Table("node", "state", "since", "datasets (name: tags, samples)")
    for name, msg in sorted(statuses.items()):
        st = msg.body
        since = dt.datetime.fromtimestamp(msg.ts).strftime("%Y-%m-%d %H:%M:%S")
        sets = "; ".join(f"{d.name}: {','.join(d.tags)}, {d.n_samples}" for d in st.datasets)
        table.add_row(name, st.state, since, sets)
    console.print(table if statuses else "no node has ever connected to this federation")


@main.command("plan-status")
@click.argument("plan")
@BUNDLE
@click.option("--node", "nodes", multiple=True, required=True, help="Node to ask (repeatable).")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for each node's answer.")
def plan_status(plan: str, bundle: Path, nodes: tuple[str, ...], timeout: float) -> None:
    """Ask nodes whether they would run PLAN (a .py file, its sha256, or zoo:NAME).

    A node runs a plan only once its admin approved that exact source; until then a job with
    it waits there as pending.
    """
    from common.training.loader import source_sha256
    from researcher.ask import ask

    path = Path(plan)
    pid = source_sha256(path.read_text()) if plan.endswith(".py") and path.is_file() else plan
    identity = Identity.load(bundle)
    table = Table("node", "plan", "status", "note")
    for node in nodes:
        try:
            reply = ask(identity, node, "plan_status", {"plan": pid}, timeout_s=timeout)
            table.add_row(node, pid[:16], str(reply.data.get("status")), str(reply.data.get("note", "")))
        except TimeoutError as exc:
            table.add_row(node, pid[:16], "no answer", str(exc))
        except ConnectError as exc:
            _fail(str(exc), 2)
    console.print(table)


def _load_job_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        _fail(f"cannot read {path}: {exc}")
    unknown = set(data) - JOB_KEYS
    if unknown:
        _fail(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(JOB_KEYS)}")
    if "tags" not in data:
        _fail(f"{path}: `tags` is required (the dataset tags nodes must hold)")
    plan = data.get("plan", "mlp")
    if str(plan).endswith(".py"):
        plan_path = Path(plan)
        data["plan"] = plan_path if plan_path.is_absolute() else path.parent / plan_path
    return data


@main.command()
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@BUNDLE
@click.option("--watch", is_flag=True, help="Follow the job until it ends.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="With --watch: write results here.")
def submit(job_file: Path, bundle: Path, watch: bool, out: Path | None) -> None:
    """Submit the job described in JOB_FILE (TOML: plan, tags, rounds, model_args, training_args, ...)."""
    try:
        exp = Experiment(bundle, **_load_job_file(job_file))
        job = exp.submit()
    except (PlanError, ValidationError, ValueError, TypeError) as exc:
        _fail(f"job not submitted: {exc}")
    except ConnectError as exc:
        _fail(str(exc), 2)
    console.print(f"submitted job [bold]{job}[/bold]")
    if watch:
        _watch(exp, out)
    exp.close()


def _watch(exp: Experiment, out: Path | None) -> None:
    state = exp.watch()
    if out:
        exp.results(out)
        console.print(f"results written to {out}")
    if state.status == "failed":
        _fail(f"job {exp.job_id} failed: {state.reason}", 4)
    console.print(f"job {exp.job_id} done after {state.round} rounds")


def _attach(bundle: Path, job: str, owner: str | None = None, wait_s: float = 10.0) -> Experiment:
    try:
        return Experiment.attach(bundle, job, owner=owner, timeout_s=wait_s)
    except JobError as exc:
        _fail(str(exc), 3)
    except ConnectError as exc:
        _fail(str(exc), 2)
    raise AssertionError


@main.command()
@click.argument("job")
@BUNDLE
def status(job: str, bundle: Path) -> None:
    """Show a job's state: status, rounds done, open round, per-round metrics."""
    exp = _attach(bundle, job)
    s = exp.state
    console.print(f"job [bold]{job}[/bold]: {s.status}, {len(s.history)}/{s.rounds} rounds"
                  + (f", round {s.open_round} open for {', '.join(s.nodes)}" if s.open_round else "")
                  + (f" ({s.reason})" if s.reason else ""))
    table = Table("round", "nodes", "missing", "duration s", "train loss")
    for h in s.history:
        table.add_row(str(h["round"]), str(len(h["reports"])), ",".join(h["missing"]), f"{h['duration_s']:.1f}",
                      f"{h['metrics'].get('train_loss', float('nan')):.4f}")
    console.print(table)
    exp.close()


@main.command()
@click.argument("job")
@BUNDLE
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Write results here at the end.")
def watch(job: str, bundle: Path, out: Path | None) -> None:
    """Follow a running job with a progress bar until it ends."""
    exp = _attach(bundle, job)
    _watch(exp, out)
    exp.close()


@main.command()
@click.argument("job")
@BUNDLE
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Experiment folder (default: results/JOB).")
@click.option("--tensorboard", is_flag=True, help="Also write TensorBoard event files (OUT/tensorboard).")
@click.option("--mlflow", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also export the job as MLflow runs into this local MLflow store folder.")
def results(job: str, bundle: Path, out: Path | None, tensorboard: bool, mlflow: Path | None) -> None:
    """Write the experiment folder: job.json, metrics (JSON/CSV), model.pt, loss and timing plots."""
    exp = _attach(bundle, job)
    folder = exp.results(out or Path("results") / job, tensorboard=tensorboard, mlflow=mlflow)
    console.print(f"{exp.state.status}: results of {job} written to {folder}")
    exp.close()


OWNER = click.option("--owner", default=None,
                     help="The job's owner, when it is not you (an admin identity may withdraw anyone's job).")
REASON = click.option("--reason", default="", help="Why (sent, signed, to the nodes and the aggregator).")
WAIT = click.option("--wait", default=10.0, show_default=True, help="Seconds to wait for the job's spec on the broker.")


@main.command(name="cancel")
@click.argument("job")
@BUNDLE
@OWNER
@REASON
@WAIT
def cancel(job: str, bundle: Path, owner: str | None, reason: str, wait: float) -> None:
    """Cancel (withdraw) a job: see `withdraw`."""
    withdraw.callback(job, bundle, owner, reason, wait)  # type: ignore[misc]


@main.command()
@click.argument("job")
@BUNDLE
@OWNER
@REASON
@WAIT
def withdraw(job: str, bundle: Path, owner: str | None, reason: str, wait: float) -> None:
    """Withdraw one of your jobs: a signed withdrawal replaces its retained spec (whose chunks,
    plan source and initial parameters included, are cleared); nodes drop it, the aggregator
    stops it. A job that is not yours is not found (exit 3) and nothing changes."""
    exp = _attach(bundle, job, owner, wait)
    try:
        exp.withdraw(reason, timeout_s=wait)
    except JobError as exc:
        _fail(str(exc), 3)
    except PublishDenied as exc:
        _fail(f"the broker refused the withdrawal (not your job?): {exc}", 3)
    finally:
        exp.close()
    console.print(f"job {job} withdrawn")
