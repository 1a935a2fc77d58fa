"""`fbm-node`: set up a site, register its datasets, run it."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Column, Table

from common.errors import ConnectError
from common.identity import Identity
from common.logging import configure_logging
from common.service import run_until_terminated
from node.audit import AuditTrail
from node.config import NodeSettings, write_default_config
from node.datasets import TYPES, DatasetError
from node.db import Database
from node.plans import PlanStatus, PlanStore
from node.registry import Registry

console = Console(soft_wrap=True)
NODE_DIR = click.option(
    "--dir", "node_dir", envvar="FBM_NODE_DIR", default=".", show_default=True,
    type=click.Path(file_okay=False, path_type=Path), help="The node folder (or env FBM_NODE_DIR).",
)


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[red]error:[/red] {message}")
    sys.exit(code)


def _settings(node_dir: Path) -> NodeSettings:
    try:
        return NodeSettings.load(node_dir)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
        raise  # unreachable


def _registry(node_dir: Path) -> Registry:
    return Registry(Database(_settings(node_dir).database))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Run a fedbiomq node: the site process that keeps data local and trains models on it.

    \b
      fbm-node init ./site --bundle ./hospital-a        # bundle from `fbm-broker enroll`
      fbm-node --help dataset
      fbm-node dataset add --dir ./site --name fmnist --type idx --path train-images-idx3-ubyte.gz --tag fmnist
      fbm-node plan list --dir ./site               # plans waiting for your approval
      fbm-node start --dir ./site
    """


@main.command()
@click.argument("node_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Identity bundle folder written by `fbm-broker enroll --role node`.")
@click.option("--force", is_flag=True, help="Overwrite an existing node.toml and bundle copy.")
def init(node_dir: Path, bundle: Path, force: bool) -> None:
    """Create a node folder: config (node.toml), a copy of the bundle, the SQLite database."""
    try:
        identity = Identity.load(bundle)
    except ValueError as exc:
        _fail(str(exc))
    if identity.role != "node":
        _fail(f"{bundle} is a {identity.role} bundle; a node needs one enrolled with --role node")
    node_dir.mkdir(parents=True, exist_ok=True)
    if (node_dir / "node.toml").exists() and not force:
        _fail(f"{node_dir} is already a node folder (use --force to overwrite its config)")
    target = node_dir / "bundle"
    if target.resolve() != bundle.resolve():
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(bundle, target)
        target.chmod(0o700)
    write_default_config(node_dir)
    db = Database(node_dir / "node.db")
    AuditTrail(db).record("node_initialised", actor=_admin(), identity=identity.name)
    db.close()
    console.print(f"node [bold]{identity.name}[/bold] set up in {node_dir.resolve()}")
    console.print(f"  broker: {identity.broker_host}:{identity.broker_port}; config: {node_dir / 'node.toml'}")


@main.group()
def dataset() -> None:
    """Register, list, show and remove this site's datasets (the data never leaves the node)."""


@dataset.command("add")
@NODE_DIR
@click.option("--name", required=True, help="Unique name of the dataset on this node.")
@click.option("--type", "kind", required=True, type=click.Choice(TYPES),
              help="csv (needs --target for supervised data), npy/npz (x [, y]), idx (MNIST format; labels found beside or --labels), images (one folder per class).")
@click.option("--path", required=True, type=click.Path(path_type=Path), help="File or folder with the data.")
@click.option("--tag", "tags", multiple=True, required=True, help="Tag jobs select datasets by (repeatable).")
@click.option("--description", default="", help="Free text shown to researchers.")
@click.option("--target", default=None, help="csv: the column to predict.")
@click.option("--labels", default=None, type=click.Path(path_type=Path), help="idx: the labels file, if not beside the images.")
def dataset_add(node_dir: Path, name: str, kind: str, path: Path, tags: tuple[str, ...], description: str,
                target: str | None, labels: Path | None) -> None:
    """Register a dataset: it is read once now, so a bad file is refused here, not mid-job."""
    registry = _registry(node_dir)
    try:
        ds = registry.add(name, kind, path, list(tags), description=description, target=target, labels=labels)
    except DatasetError as exc:
        _fail(f"dataset not added: {exc}")
    AuditTrail(registry.db).record("dataset_added", dataset=name, actor=_admin(), path=ds.path, type=kind)
    info = ds.public()
    console.print(f"added [bold]{name}[/bold]: {info.n_samples} samples, shape {info.shape}, tags {ds.tags}"
                  + (f", {info.n_classes} classes" if info.n_classes else ""))


@dataset.command("list")
@NODE_DIR
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def dataset_list(node_dir: Path, as_json: bool) -> None:
    """List registered datasets."""
    items = _registry(node_dir).list()
    if as_json:
        click.echo(json.dumps([d.public().model_dump() | {"path": d.path} for d in items], indent=2))
        return
    table = Table("name", "type", "tags", "samples", "shape", "path")
    for d in items:
        table.add_row(d.name, d.type, ",".join(d.tags), str(d.meta.get("n_samples")), str(d.meta.get("shape")), d.path)
    console.print(table)


@dataset.command("show")
@NODE_DIR
@click.argument("name")
def dataset_show(node_dir: Path, name: str) -> None:
    """Show one dataset's metadata."""
    ds = _registry(node_dir).get(name)
    if ds is None:
        _fail(f"no dataset named {name!r}")
    click.echo(json.dumps({**ds.public().model_dump(), "path": ds.path, "labels": ds.labels, "meta": ds.meta}, indent=2))


@dataset.command("remove")
@NODE_DIR
@click.argument("name")
def dataset_remove(node_dir: Path, name: str) -> None:
    """Unregister a dataset (the files are left alone)."""
    registry = _registry(node_dir)
    if not registry.remove(name):
        _fail(f"no dataset named {name!r}")
    AuditTrail(registry.db).record("dataset_removed", dataset=name, actor=_admin())
    console.print(f"removed {name}")


def _admin() -> str:
    """Who ran an admin command, for the audit trail (the OS account)."""
    import getpass

    try:
        return f"admin:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "admin"


@main.group()
def plan() -> None:
    """Review and decide on training plans: a plan runs here only once approved.

    \b
    A job whose plan this node has not approved waits as *pending*; the researcher is told.
      fbm-node plan list --dir ./site --status pending
      fbm-node plan show 3fa2c1 --dir ./site          # read the code before deciding
      fbm-node plan approve 3fa2c1 --dir ./site       # the waiting job starts within seconds
      fbm-node plan approve --file plan.py --class MyPlan --dir ./site   # ahead of any job
      fbm-node plan reject 3fa2c1 --dir ./site --note "reads files outside its dataset"
      fbm-node plan revoke 3fa2c1 --dir ./site        # running jobs with it stop
    """


def _plans(node_dir: Path) -> PlanStore:
    return PlanStore(Database(_settings(node_dir).database))


@plan.command("list")
@NODE_DIR
@click.option("--status", type=click.Choice([s.value for s in PlanStatus]), default=None, help="Only plans with this status.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan_list(node_dir: Path, status: str | None, as_json: bool) -> None:
    """List the plans jobs asked for (and the ones approved ahead), with their status."""
    import datetime as dt

    items = _plans(node_dir).list(PlanStatus(status) if status else None)
    if as_json:
        click.echo(json.dumps([{k: v for k, v in p.__dict__.items() if k != "source"} for p in items], indent=2, default=str))
        return
    table = Table("class", "status", "first job", "from", "seen", "decided by", "note")
    table.columns.insert(0, Column("plan", no_wrap=True, min_width=16))
    for p in items:
        seen = dt.datetime.fromtimestamp(p.seen_at).strftime("%Y-%m-%d %H:%M")
        table.add_row(p.plan_id[:16], p.class_name, str(p.status), p.first_job, p.first_sender, seen, p.decided_by, p.note)
    console.print(table)


@plan.command("show")
@NODE_DIR
@click.argument("plan_id")
def plan_show(node_dir: Path, plan_id: str) -> None:
    """Show a plan's status and its whole source code."""
    try:
        p = _plans(node_dir).find(plan_id)
    except KeyError as exc:
        _fail(str(exc.args[0]))
    console.print(f"plan [bold]{p.plan_id}[/bold]  class {p.class_name}  status [bold]{p.status}[/bold]")
    console.print(f"first asked for by job {p.first_job or '-'} from {p.first_sender}; decided by {p.decided_by or '-'} {p.note}")
    if p.source:
        from rich.syntax import Syntax

        console.print(Syntax(p.source, "python", line_numbers=True))


def _decide(node_dir: Path, plan_id: str, status: PlanStatus, note: str) -> None:
    store = _plans(node_dir)
    try:
        p = store.decide(store.find(plan_id).plan_id if not plan_id.startswith("zoo:") else _zoo(plan_id), status, _admin(), note)
    except KeyError as exc:
        _fail(str(exc.args[0]))
    AuditTrail(store.db).record(f"plan_{status}", plan_sha256=p.plan_id, actor=_admin(), note=note)
    console.print(f"plan {p.plan_id[:16]} ({p.class_name}) is now [bold]{p.status}[/bold]; a running node acts on it within seconds")


def _zoo(plan_id: str) -> str:
    from common.training.zoo import ZOO

    if plan_id.removeprefix("zoo:") not in ZOO:
        _fail(f"unknown zoo plan {plan_id!r}; the zoo has: {', '.join('zoo:' + z for z in sorted(ZOO))}")
    return plan_id


@plan.command("approve")
@NODE_DIR
@click.argument("plan_id", required=False)
@click.option("--file", "source_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Approve this source file ahead of any job (its sha256 is what gets approved).")
@click.option("--class", "class_name", default=None, help="With --file: the TrainingPlan class in it.")
@click.option("--note", default="", help="Why (kept in the audit trail).")
def plan_approve(node_dir: Path, plan_id: str | None, source_file: Path | None, class_name: str | None, note: str) -> None:
    """Approve a plan (by id prefix, `zoo:NAME`, or --file): jobs with it may run here."""
    if source_file is not None:
        if plan_id or not class_name:
            _fail("give either a PLAN_ID, or --file with --class")
        source = source_file.read_text()
        try:
            import ast

            tree = ast.parse(source)
        except SyntaxError as exc:
            _fail(f"{source_file} is not valid Python: {exc}")
        if not any(isinstance(n, ast.ClassDef) and n.name == class_name for n in tree.body):
            _fail(f"{source_file} defines no class {class_name!r}")
        store = _plans(node_dir)
        p = store.add_source(source, class_name, _admin(), note)
        AuditTrail(store.db).record("plan_approved", plan_sha256=p.plan_id, actor=_admin(), note=note, file=str(source_file))
        console.print(f"plan {p.plan_id} ({class_name}, from {source_file}) is now [bold]approved[/bold]")
        return
    if not plan_id:
        _fail("which plan? give a PLAN_ID (see `fbm-node plan list`) or --file")
    _decide(node_dir, plan_id, PlanStatus.APPROVED, note)


@plan.command("reject")
@NODE_DIR
@click.argument("plan_id")
@click.option("--note", default="", help="Why (sent to nobody; kept in the audit trail).")
def plan_reject(node_dir: Path, plan_id: str, note: str) -> None:
    """Reject a plan: jobs waiting for it are declined, and it will not run here."""
    _decide(node_dir, plan_id, PlanStatus.REJECTED, note)


@plan.command("revoke")
@NODE_DIR
@click.argument("plan_id")
@click.option("--note", default="", help="Why (kept in the audit trail).")
def plan_revoke(node_dir: Path, plan_id: str, note: str) -> None:
    """Withdraw an approval: running jobs with this plan stop taking part."""
    _decide(node_dir, plan_id, PlanStatus.REVOKED, note)


@main.command()
@NODE_DIR
@click.option("--limit", default=50, show_default=True)
@click.option("--job", default=None, help="Only this job's entries.")
def audit(node_dir: Path, limit: int, job: str | None) -> None:
    """Show the audit trail: jobs seen, accepted or refused, rounds trained, admin actions."""
    trail = AuditTrail(Database(_settings(node_dir).database))
    table = Table("time", "event", "actor", "job", "round", "dataset", "plan", "detail")
    import datetime as dt

    for e in reversed(trail.entries(job, limit)):
        when = dt.datetime.fromtimestamp(e["ts"]).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(when, e["event"], e["actor"] or "", e["job"] or "", str(e["round"] or ""), e["dataset"] or "",
                      (e["plan_sha256"] or "")[:16], json.dumps(e["detail"])[:80])
    console.print(table)


@main.command()
@NODE_DIR
@click.option("--connect-timeout", default=0.0, help="Give up if the broker is unreachable this long (0: keep trying).")
def start(node_dir: Path, connect_timeout: float) -> None:
    """Run the node until SIGTERM/Ctrl-C: publish status, take jobs, train, send updates."""
    from node.service import NodeService  # torch is imported only for commands that train

    settings = _settings(node_dir)
    configure_logging(settings.log_level)
    try:
        identity = Identity.load(settings.bundle)
    except ValueError as exc:
        _fail(str(exc))
    db = Database(settings.database)
    service = NodeService(settings, identity, Registry(db), AuditTrail(db))
    try:
        run_until_terminated(service.start, service.stop, connect_timeout)
    except ConnectError as exc:
        service.trainer.stop()
        _fail(str(exc), code=2)
