"""`fbm-node`: set up a site, register its datasets, run it."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Column, Table

from common.errors import ConnectError
from common.identity import Identity
from common.logging import configure_logging
from common.memory import release_large_buffers_to_os
from common.service import run_until_terminated
from node import admin
from node.audit import AuditTrail
from node.config import NodeSettings, write_default_config
from node.datasets import TYPES
from node.db import Database
from node.display import for_rich, visible
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


def _db(node_dir: Path) -> Database:
    return Database(_settings(node_dir).database)


def _registry(node_dir: Path) -> Registry:
    return Registry(_db(node_dir))


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
@click.argument("name")
@NODE_DIR
@click.option("--role", default="node", show_default=True, type=click.Choice(["node", "researcher", "aggregator"]),
              help="The role to ask for (researchers and aggregators may use this too).")
@click.option("--force", is_flag=True, help="Replace an existing key (the old certificate becomes useless).")
def request(name: str, node_dir: Path, role: str, force: bool) -> None:
    """Make this site's private key and a certificate request for the federation admin.

    \b
    The key is written to NODE_DIR/bundle/identity.key (mode 600) and never leaves this folder;
    NODE_DIR/NAME.csr holds only the public key, the name and the role. Send the .csr to the
    admin, who runs `fbm-broker enroll WORKSPACE --csr NAME.csr --out DIR` and sends DIR back;
    then: fbm-node init NODE_DIR --bundle DIR
    """
    from common.csr import create_request, write_private
    from common.identity import KEY_FILE

    key_path = node_dir / "bundle" / KEY_FILE
    if key_path.exists() and not force:
        _fail(f"{key_path} exists already (use --force to make a new key; its certificate then stops working)")
    try:
        csr_pem, key_pem = create_request(name, role)
    except ValueError as exc:
        _fail(str(exc))
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.chmod(0o700)
    write_private(key_path, key_pem)
    csr_path = node_dir / f"{name}.csr"
    csr_path.write_bytes(csr_pem)
    console.print(f"key: {key_path} (keep it here; back it up like a password)")
    console.print(f"request: {csr_path}  -> send it to the federation admin")
    console.print(f"  admin: fbm-broker enroll WORKSPACE --csr {csr_path.name} --out {name}-bundle")
    console.print(f"  then here: fbm-node init {node_dir} --bundle {name}-bundle")


@main.command()
@click.argument("node_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Identity bundle folder from `fbm-broker enroll` (with or without the key, see `fbm-node request`).")
@click.option("--force", is_flag=True, help="Overwrite an existing node.toml and bundle copy.")
def init(node_dir: Path, bundle: Path, force: bool) -> None:
    """Create a node folder: config (node.toml), a copy of the bundle, the SQLite database.

    A bundle without identity.key answers a `fbm-node request` made in NODE_DIR: its
    certificate is joined to the key already there (and must match it).
    """
    from common.identity import KEY_FILE

    target = node_dir / "bundle"
    keyless = not (bundle / KEY_FILE).exists()
    if (node_dir / "node.toml").exists() and not force:
        _fail(f"{node_dir} is already a node folder (use --force to overwrite its config)")
    if keyless:
        identity = _join_certificate(bundle, target)
    else:
        try:
            identity = Identity.load(bundle)
        except ValueError as exc:
            _fail(str(exc))
        if target.resolve() != bundle.resolve():
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(bundle, target)
            target.chmod(0o700)
    if identity.role != "node":
        _fail(f"{bundle} is a {identity.role} bundle; a node needs one enrolled with --role node")
    node_dir.mkdir(parents=True, exist_ok=True)
    write_default_config(node_dir)
    db = Database(node_dir / "node.db")
    AuditTrail(db).record("node_initialised", actor=admin.os_admin(), identity=identity.name,
                          key="made on this site" if keyless else "from the bundle")
    db.close()
    console.print(f"node [bold]{identity.name}[/bold] set up in {node_dir.resolve()}")
    console.print(f"  broker: {identity.broker_host}:{identity.broker_port}; config: {node_dir / 'node.toml'}")


def _join_certificate(bundle: Path, target: Path) -> Identity:
    """Put a key-less bundle's files beside the site's own key; refuse if they do not match."""
    from common.identity import KEY_FILE

    if not (target / KEY_FILE).exists():
        _fail(f"{bundle} has no private key: it answers a `fbm-node request`; run init with the --dir "
              f"where you made the request (no key found at {target / KEY_FILE})")
    staging = target / ".incoming"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    try:
        for item in bundle.iterdir():
            if item.is_file() and item.name != KEY_FILE:
                shutil.copy2(item, staging / item.name)
        os.link(target / KEY_FILE, staging / KEY_FILE)  # a second name for the same file: no copy of the key
        try:
            Identity.load(staging)
        except ValueError as exc:
            _fail(f"{bundle} does not fit this site's key: {exc}")
        for item in staging.iterdir():
            if item.name != KEY_FILE:
                item.replace(target / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Identity.load(target)


@main.group()
def dataset() -> None:
    """Register, list, show and remove this site's datasets (the data never leaves the node)."""


@dataset.command("add")
@NODE_DIR
@click.option("--name", required=True, help="Unique name of the dataset on this node.")
@click.option("--type", "kind", required=True, type=click.Choice(TYPES),
              help="csv (needs --target for supervised data), npy/npz (x [, y]), idx (MNIST format; labels found beside or --labels), images (one folder per class), table (clinical CSV), medical-folder (NIfTI per subject folder), dicom (one series per subject folder).")
@click.option("--path", required=True, type=click.Path(path_type=Path), help="File or folder with the data.")
@click.option("--tag", "tags", multiple=True, required=True, help="Tag jobs select datasets by (repeatable).")
@click.option("--description", default="", help="Free text shown to researchers.")
@click.option("--target", default=None, help="csv: the column to predict.")
@click.option("--labels", default=None, type=click.Path(path_type=Path), help="idx: the labels file, if not beside the images; medical-folder/dicom: the demographics CSV, if not demographics.csv in the folder.")
def dataset_add(node_dir: Path, name: str, kind: str, path: Path, tags: tuple[str, ...], description: str,
                target: str | None, labels: Path | None) -> None:
    """Register a dataset: it is read once now, so a bad file is refused here, not mid-job."""
    try:
        ds = admin.add_dataset(_db(node_dir), admin.os_admin(), name, kind, path, list(tags), description=description,
                               target=target, labels=labels)
    except admin.AdminError as exc:
        _fail(str(exc))
    info = ds.public()
    console.print(f"added [bold]{name}[/bold]: {info.n_samples} samples, shape {info.shape}, tags {ds.tags}"
                  + (f", {info.n_classes} classes" if info.n_classes else ""))
    for warning in ds.meta.get("warnings") or []:  # medical images: incomplete subjects
        console.print(f"[yellow]warning:[/yellow] {warning}")


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


@dataset.command("privacy")
@NODE_DIR
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def dataset_privacy(node_dir: Path, name: str, as_json: bool) -> None:
    """Show a dataset's privacy: the policy in force (node.toml [privacy], its per-dataset
    overrides applied), its epsilon budget, what each job spent, statistics queries today.
    Set the policy in node.toml; the running node reads it at start."""
    from node.ui.views import dataset_privacy as privacy_of

    if _registry(node_dir).get(name) is None:
        _fail(f"no dataset named {name!r}")
    info = privacy_of(_settings(node_dir), _db(node_dir), name)
    if as_json:
        click.echo(json.dumps({**info.__dict__, "left": info.left}, indent=2, default=str))
        return
    budget = "none" if info.budget is None else f"{info.budget:g} (spent {info.spent:.3g}, left {info.left:.3g})"
    console.print(f"[bold]{for_rich(name)}[/bold]: epsilon budget {budget}; "
                  f"statistics queries today {info.queries_today}/{info.max_queries}")
    table = Table("policy", "value")
    for key, value in info.policy.items():
        table.add_row(key, for_rich(str(value)))
    console.print(table)
    spent = Table("job", "epsilon", "delta")
    for job in info.jobs:
        spent.add_row(for_rich(str(job.get("job"))), f"{float(job.get('epsilon', 0)):.4g}", f"{float(job.get('delta', 0)):g}")
    console.print(spent)


@dataset.command("remove")
@NODE_DIR
@click.argument("name")
def dataset_remove(node_dir: Path, name: str) -> None:
    """Unregister a dataset (the files are left alone)."""
    try:
        admin.remove_dataset(_db(node_dir), admin.os_admin(), name)
    except admin.AdminError as exc:
        _fail(str(exc))
    console.print(f"removed {name}")


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
        table.add_row(p.plan_id[:16], *map(for_rich, (p.class_name, str(p.status), p.first_job, p.first_sender)), seen,
                      for_rich(p.decided_by), for_rich(p.note))
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
    console.print(f"plan [bold]{for_rich(p.plan_id)}[/bold]  class {for_rich(p.class_name)}  status [bold]{p.status}[/bold]")
    console.print(f"first asked for by job {for_rich(p.first_job) or '-'} from {for_rich(p.first_sender)}; "
                  f"decided by {for_rich(p.decided_by) or '-'} {for_rich(p.note)}")
    if p.source:
        from rich.syntax import Syntax

        console.print(Syntax(visible(p.source), "python", line_numbers=True))  # Syntax reads no markup


def _decide(node_dir: Path, plan_id: str, status: PlanStatus, note: str) -> None:
    try:
        p = admin.decide_plan(_db(node_dir), admin.os_admin(), plan_id, status, note)
    except admin.AdminError as exc:
        _fail(str(exc))
    console.print(f"plan {p.plan_id[:16]} ({for_rich(p.class_name)}) is now [bold]{p.status}[/bold]; a running node acts on it within seconds")


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
        try:
            p = admin.approve_source(_db(node_dir), admin.os_admin(), source_file.read_text(), class_name, note,
                                     origin=str(source_file))
        except admin.AdminError as exc:
            _fail(str(exc))
        console.print(f"plan {p.plan_id} ({for_rich(class_name)}, from {for_rich(str(source_file))}) is now [bold]approved[/bold]")
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
    release_large_buffers_to_os()
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


@main.command()
@click.option("--runtime-dir", envvar="FBM_NODE_TRAINING_TEMPLATE", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="A 0700 folder of this user (created if missing): the socket and the token nodes read.")
def template(runtime_dir: Path) -> None:
    """Run one training template for every node of this user on this host, until SIGTERM.

    Nodes with `training_template = DIR` (or env FBM_NODE_TRAINING_TEMPLATE) fork their training
    processes from it: torch's memory is paid once per host instead of once per node.
    """
    from node.shared_template import exec_template  # noqa: PLC0415

    exec_template(runtime_dir)


@main.group()
def user() -> None:
    """Accounts of the web console (`fbm-node ui`), stored hashed in the node's database.

    \b
      fbm-node user add steward --dir ./site          # asks for the password twice
      echo "$PW" | fbm-node user add steward --dir ./site --password-stdin
      fbm-node user list --dir ./site
      fbm-node user passwd steward --dir ./site       # also ends the user's open sessions
      fbm-node user remove steward --dir ./site
    """


def _accounts(node_dir: Path):
    from node.ui.accounts import Accounts

    return Accounts(_db(node_dir))


def _password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\n")
    return click.prompt("password", hide_input=True, confirmation_prompt=True)


def _account_change(node_dir: Path, change, event: str, username: str, *args: str) -> None:
    """Apply one account change (an Accounts method), audit it, or fail with the reason."""
    from node.ui.accounts import AccountError

    accounts = _accounts(node_dir)
    try:
        change(accounts, username, *args)
    except AccountError as exc:
        _fail(str(exc))
    AuditTrail(accounts.db).record(event, actor=admin.os_admin(), user=username)


PASSWORD_STDIN = click.option("--password-stdin", is_flag=True,
                              help="Read the password from the first line of stdin (scripts).")


@user.command("add")
@NODE_DIR
@click.argument("username")
@PASSWORD_STDIN
def user_add(node_dir: Path, username: str, password_stdin: bool) -> None:
    """Create a console account (at least 10 characters of password)."""
    from node.ui.accounts import Accounts

    _account_change(node_dir, Accounts.add_user, "ui_user_added", username, _password(password_stdin), admin.os_admin())
    console.print(f"user [bold]{username}[/bold] can now log in to `fbm-node ui`")


@user.command("passwd")
@NODE_DIR
@click.argument("username")
@PASSWORD_STDIN
def user_passwd(node_dir: Path, username: str, password_stdin: bool) -> None:
    """Set a new password (the account's open sessions are closed)."""
    from node.ui.accounts import Accounts

    _account_change(node_dir, Accounts.set_password, "ui_password_changed", username, _password(password_stdin))
    console.print(f"password of {username} changed")


@user.command("remove")
@NODE_DIR
@click.argument("username")
def user_remove(node_dir: Path, username: str) -> None:
    """Delete a console account and close its sessions."""
    from node.ui.accounts import Accounts

    _account_change(node_dir, Accounts.remove_user, "ui_user_removed", username)
    console.print(f"user {username} removed")


@user.command("list")
@NODE_DIR
def user_list(node_dir: Path) -> None:
    """List console accounts (never their passwords)."""
    import datetime as dt

    table = Table("user", "created", "by")
    for u in _accounts(node_dir).users():
        table.add_row(u["username"], dt.datetime.fromtimestamp(u["created_at"]).strftime("%Y-%m-%d %H:%M"), u["created_by"])
    console.print(table)


@main.command()
@NODE_DIR
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback is served over TLS (see --cert).")
@click.option("--port", default=8470, show_default=True, type=click.IntRange(0, 65535))
@click.option("--cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="TLS certificate (PEM) for a non-loopback --host; default: a self-signed one made in NODE_DIR/ui-tls.")
@click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="Its key (PEM).")
@click.option("--tls/--no-tls", default=None,
              help="Force TLS on or off (default: on unless --host is loopback; off only behind your own TLS proxy).")
@click.option("--idle-minutes", default=30.0, show_default=True, help="Close a session unused this long.")
@click.option("--browse-start", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder the dataset file picker opens in (default: your home folder).")
def ui(node_dir: Path, host: str, port: int, cert: Path | None, key: Path | None, tls: bool | None,
       idle_minutes: float, browse_start: Path | None) -> None:
    """Serve the node's web console (Datasets, Training plans, Jobs, Audit, Status).

    \b
    It uses the node's own database: what you do there is what `fbm-node dataset/plan` do, and
    is recorded in the audit trail as ui:<account>. Create the first account from the shell:
      fbm-node user add steward --dir ./site
      fbm-node ui --dir ./site                       # http://127.0.0.1:8470
      fbm-node ui --dir ./site --host 0.0.0.0        # https, self-signed (fingerprint printed)
    """
    import uvicorn

    from node.ui.accounts import SessionPolicy
    from node.ui.app import ConsoleConfig, create_app
    from node.ui.tls import ensure_console_cert, fingerprint, is_loopback

    settings = _settings(node_dir)
    if not _accounts(node_dir).users():
        _fail(f"no console account yet: create one first with `fbm-node user add NAME --dir {node_dir}`")
    use_tls = (not is_loopback(host)) if tls is None else tls
    if (cert is None) != (key is None):
        _fail("give both --cert and --key, or neither")
    if use_tls and cert is None:
        cert, key = ensure_console_cert(settings.node_dir, Identity.load(settings.bundle).name)
        click.echo(f"TLS certificate {cert} (self-signed); check the browser shows this sha256 fingerprint:")
        click.echo(f"  {fingerprint(cert)}")
    config = ConsoleConfig(secure_cookies=use_tls, policy=SessionPolicy(idle_minutes=idle_minutes),
                           browse_start=(browse_start or Path.home()).resolve())
    app = create_app(settings, config)
    scheme = "https" if use_tls else "http"
    console.print(f"node console on {scheme}://{host}:{port}  (Ctrl-C to stop)")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                ssl_certfile=str(cert) if use_tls else None, ssl_keyfile=str(key) if use_tls else None)


@main.command()
@NODE_DIR
@click.option("--max-age", default=15.0, show_default=True, help="Seconds after which a silent node is unhealthy.")
def health(node_dir: Path, max_age: float) -> None:
    """Exit 0 if the node process is running and connected to the broker, 1 if not.

    Cheap (reads the heartbeat the node writes to its database every few seconds): meant for
    container health checks and monitoring. `fbm-node doctor` finds out why.
    """
    from node.state import NodeState

    beat = NodeState(_db(node_dir)).heartbeat()
    if beat is None or beat.age_s() > max_age or not beat.connected:
        detail = "never started" if beat is None else f"last heartbeat {beat.age_s():.0f} s ago, connected={beat.connected}"
        console.print(f"unhealthy: {detail}")
        sys.exit(1)
    console.print(f"healthy: connected to {beat.broker}, jobs: {', '.join(beat.jobs) or 'none'}")


@main.command()
@NODE_DIR
@click.option("--timeout", default=5.0, show_default=True, help="Seconds per network step.")
@click.option("--min-free-gb", default=1.0, show_default=True, help="Free disk below this fails.")
def doctor(node_dir: Path, timeout: float, min_free_gb: float) -> None:
    """Check everything this site needs, one line per check, with a fix for each failure.

    \b
    config, bundle, certificate (validity, expiry), DNS, TCP, TLS handshake, MQTT login,
    topic permissions (reads its own topics, not other sites'), clock, datasets readable,
    free disk, the node process. Exit status 0 when nothing failed (warnings allowed), 1 if not.
    Safe to run while the node runs: it uses its own short session (client id NAME:doctor).
    """
    from node.doctor import Doctor

    marks = {"ok": "[green]✓[/green]", "warn": "[yellow]![/yellow]", "fail": "[red]✗[/red]", "skip": "[dim]-[/dim]"}
    failed = 0
    for result in Doctor(node_dir, timeout_s=timeout, min_free_gb=min_free_gb).run():
        console.print(f"{marks[result.status]} {result.name:<18} {result.detail}", highlight=False)
        if result.fix and result.status in ("fail", "warn"):
            console.print(f"  {'':<18} fix: {result.fix}", highlight=False)
        failed += result.status == "fail"
    if failed:
        console.print(f"[red]{failed} check(s) failed[/red]")
        sys.exit(1)
    console.print("[green]all checks passed[/green]")
