"""`fbm-broker`: create a federation, enrol its parties, run its Mosquitto broker."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from broker import process
from broker.process import BrokerError
from broker.workspace import Workspace
from common.identity import ROLES

console = Console(soft_wrap=True)


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Run a fedbiomq federation's broker.

    A federation is one folder (the workspace) holding its CA, the broker's TLS config, the
    role ACL and every identity's bundle. Typical use:

    \b
      fbm-broker init ./fed --host broker.example.org
      fbm-broker enroll ./fed --role node --id hospital-a
      fbm-broker start ./fed
      fbm-broker revoke ./fed --id hospital-a      # cut a site off, broker keeps running
    """


@main.command()
@click.argument("workspace", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default="fedbiomq", show_default=True, help="Federation name (goes into the CA).")
@click.option("--port", default=8883, show_default=True, type=click.IntRange(1, 65535), help="TLS listener port.")
@click.option("--host", "hosts", multiple=True, help="Host name or IP sites use to reach the broker (repeatable; the first goes into bundles). localhost and 127.0.0.1 are always valid.")
@click.option("--bind", default="", help="Address to listen on (default: all interfaces).")
@click.option("--force", is_flag=True, help="Replace an existing federation in WORKSPACE (its CA and every cert!).")
def init(workspace: Path, name: str, port: int, hosts: tuple[str, ...], bind: str, force: bool) -> None:
    """Create a federation in WORKSPACE: CA, broker cert, mosquitto.conf, empty ACL."""
    try:
        fed = Workspace(workspace).init(name, port=port, hosts=list(hosts), bind=bind, force=force)
    except (FileExistsError, ValueError) as exc:
        _fail(str(exc))
    console.print(f"federation [bold]{fed.name}[/bold] created in {Path(workspace).resolve()}")
    console.print(f"  broker address for sites: {fed.host}:{fed.port}")
    console.print(f"  next: fbm-broker enroll {workspace} --role node --id SITE, then fbm-broker start {workspace}")


@main.command()
@click.argument("workspace", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--role", type=click.Choice(ROLES), default=None,
              help="What the identity may do (required without --csr; with --csr, must match the request's).")
@click.option("--id", "name", default=None, help="Identity name: the site, researcher or service (letters, digits, . _ -).")
@click.option("--csr", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Sign this certificate request from `fbm-node request`: the site keeps its key; the bundle has none.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also copy the bundle to this folder (what you send to the site).")
@click.option("--days", default=825, show_default=True, type=click.IntRange(1, 3650), help="Certificate lifetime.")
@click.option("--force", is_flag=True, help="Re-issue an identity that already exists.")
def enroll(workspace: Path, role: str | None, name: str | None, csr: Path | None, out: Path | None, days: int,
           force: bool) -> None:
    """Issue an identity's certificate, grant its role's topics, reload the running broker.

    \b
    Two ways:
      fbm-broker enroll ./fed --role node --id hospital-a          # key made here, sent with the bundle
      fbm-broker enroll ./fed --csr hospital-b.csr --out ./to-b    # the site made its key (recommended)
    """
    import shutil

    ws = Workspace(workspace)
    try:
        if csr is not None:
            from broker.pki import read_request

            request = read_request(csr.read_bytes())
            if name and name != request.name:
                _fail(f"the request is for {request.name!r}, not {name!r}")
            name = request.name
            bundle = ws.enroll_request(csr.read_bytes(), role, days=days, force=force)
            role = ws.identities()[name]["role"]
        else:
            if not role or not name:
                _fail("give --role and --id (or --csr with a site's certificate request)")
            bundle = ws.enroll(name, role, days=days, force=force)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for item in bundle.iterdir():
            shutil.copy2(item, out / item.name)
    reloaded = process.reload(ws)
    console.print(f"enrolled [bold]{name}[/bold] as {role}; bundle: {out or bundle}")
    console.print("  the broker " + ("reloaded its ACL" if reloaded else "is not running; the ACL applies at start"))
    if csr is not None:
        console.print(f"  send the bundle to the site (no secret in it); there: fbm-node init SITE_DIR --bundle {out or bundle}")
    else:
        console.print("  copy the bundle folder to the site over a safe channel: it holds the identity's private key")


@main.command()
@click.argument("workspace", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--plugin-dir", envvar="FBM_BROKER_PLUGIN_DIR", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="A prebuilt fbm_auth plugin (the broker image has one) instead of compiling it.")
def serve(workspace: Path, plugin_dir: Path | None) -> None:
    """Run Mosquitto in the foreground, for containers and systemd (no fork, logs on stderr).

    The config is rewritten for WORKSPACE's path on this host first (a mounted workspace
    may sit elsewhere than where `fbm-broker init` ran); the pid file lets `fbm-broker
    enroll/revoke/reload` on the same host reload it.
    """
    import os

    from broker.auth_plugin import PluginBuildError

    ws = Workspace(workspace)
    try:
        ws.write_broker_config(prebuilt_plugin=plugin_dir)
        binary = process.mosquitto_binary()
    except (FileNotFoundError, PluginBuildError, BrokerError) as exc:
        _fail(str(exc))
    ws.pid_file.write_text(f"{os.getpid()}\n")  # exec keeps the pid
    sys.stdout.flush()
    os.execv(binary, [binary, "-c", str(ws.conf_file)])


@main.command()
@click.argument("workspace", type=click.Path(exists=True, file_okay=False, path_type=Path))
def reload(workspace: Path) -> None:
    """Rewrite the ACL and the refused-certificate list from identities.json, then reload.

    The fix when the broker's acl_file was edited by hand or lost (`fbm-node doctor` says the
    ACL is too open or lacks a node). The running broker re-reads it without a restart.
    """
    ws = Workspace(workspace)
    try:
        ws.write_acl()
    except FileNotFoundError as exc:
        _fail(str(exc))
    reloaded = process.reload(ws)
    console.print("ACL rewritten; the broker " + ("reloaded it" if reloaded else "is not running; it applies at start"))


@main.command()
@click.argument("workspace", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--wait", default=15.0, show_default=True, help="Seconds to wait for the listener.")
def start(workspace: Path, wait: float) -> None:
    """Start the federation's Mosquitto in the background (pid and log in WORKSPACE/broker)."""
    ws = Workspace(workspace)
    try:
        pid = process.start(ws, wait_s=wait)
    except (BrokerError, FileNotFoundError) as exc:
        _fail(str(exc))
    console.print(f"broker started (pid {pid}) on port {ws.federation().port}; log: {ws.log_file}")


@main.command()
@click.argument("workspace", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--kill", is_flag=True, help="SIGKILL instead of SIGTERM (loses what was not autosaved).")
def stop(workspace: Path, kill: bool) -> None:
    """Stop the federation's broker (SIGTERM: sessions and queued messages are saved)."""
    ws = Workspace(workspace)
    try:
        stopped = process.stop(ws, hard=kill)
    except FileNotFoundError as exc:
        _fail(str(exc))
    console.print("broker stopped" if stopped else "broker was not running")


@main.command()
@click.argument("workspace", type=click.Path(exists=True, file_okay=False, path_type=Path))
def status(workspace: Path) -> None:
    """Say whether the broker runs and listens, and why not. Exit code 0 only if it does."""
    ws = Workspace(workspace)
    try:
        st = process.status(ws)
    except FileNotFoundError as exc:
        _fail(str(exc))
    console.print(st.detail)
    sys.exit(0 if st.running and st.listening else 3)


@main.command()
@click.argument("workspace", type=click.Path(exists=True, file_okay=False, path_type=Path))
def identities(workspace: Path) -> None:
    """List the federation's identities, roles, state and certificate expiry."""
    import datetime as dt

    try:
        entries = Workspace(workspace).identities()
    except FileNotFoundError as exc:
        _fail(str(exc))
    table = Table("identity", "role", "state", "expires", "fingerprint (sha256)")
    now = dt.datetime.now().timestamp()
    for name, entry in sorted(entries.items()):
        not_after = entry.get("not_after")
        expires = dt.datetime.fromtimestamp(not_after).strftime("%Y-%m-%d") if not_after else "?"
        state = "revoked" if entry.get("revoked") else ("expired" if not_after and not_after < now else "active")
        table.add_row(name, entry["role"], state, expires, entry["fingerprint"][:16])
    console.print(table)


@main.command()
@click.argument("workspace", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--id", "name", required=True, help="The identity to cut off.")
def revoke(workspace: Path, name: str) -> None:
    """Cut an identity off now: its connection is closed and its certificates refused.

    The broker keeps running: the ACL loses the identity's entry, its certificates'
    fingerprints go on the broker's refused list, and a reload (SIGHUP) re-checks every
    connected client. Enrol the name again (--force) to give the site a new key.
    """
    ws = Workspace(workspace)
    try:
        entry = ws.revoke(name)
    except (KeyError, FileNotFoundError) as exc:
        _fail(str(exc.args[0]) if isinstance(exc, KeyError) else str(exc))
    reloaded = process.reload(ws)
    console.print(f"revoked [bold]{name}[/bold] ({entry['role']}, {len(entry.get('certs', [1]))} certificate(s))")
    console.print("  the broker " + ("disconnected it and refuses it from now on" if reloaded
                                     else "is not running; it will refuse the identity at start"))


@main.command()
@click.argument("workspace", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--id", "name", required=True, help="The identity whose certificate to renew.")
@click.option("--days", default=825, show_default=True, type=click.IntRange(1, 3650), help="New certificate lifetime.")
def renew(workspace: Path, name: str, days: int) -> None:
    """Issue a new certificate for an identity's existing key (before the old one expires).

    Only identity.crt in the bundle changes: copy it to the site, which picks it up at its
    next restart. The old certificate stays valid until it expires.
    """
    ws = Workspace(workspace)
    try:
        bundle = ws.renew(name, days=days)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc.args[0]) if isinstance(exc, KeyError) else str(exc))
    console.print(f"renewed [bold]{name}[/bold] for {days} days: copy {bundle / 'identity.crt'} to the site")


@main.command()
@click.argument("workspace", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--job", default=None, help="Print this job's trail (submission to last model) instead of recording.")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The trail's SQLite file (default: WORKSPACE/audit/audit.sqlite).")
@click.option("--duration", default=0.0, show_default=True, help="Record for this many seconds (0: until SIGTERM/Ctrl-C).")
@click.option("--json", "as_json", is_flag=True, help="With --job: one JSON object a line.")
def audit(workspace: Path, job: str | None, db: Path | None, duration: float, as_json: bool) -> None:
    """Record the header of every message on the broker (type, sender, job, round, size, body
    sha256, time; never the content) in SQLite, as an admin subscriber; with --job, print the
    trail of that job.

    \b
      fbm-broker audit ./fed &                 # the recorder (its identity is enrolled once)
      fbm-broker audit ./fed --job JOB         # the job's trail
    """
    from broker.audit import AuditLog

    ws = Workspace(workspace)
    log = AuditLog(db or ws.root / "audit" / "audit.sqlite")
    try:
        if job is not None:
            _print_trail(log, job, as_json)
        else:
            _record(ws, log, duration)
    finally:
        log.close()


def _record(ws: Workspace, log, duration: float) -> None:
    import signal
    import threading

    from broker.audit import AUDITOR, run_recorder

    if not (ws.bundle_dir(AUDITOR) / "bundle.json").exists():
        ws.enroll(AUDITOR, "admin")
        process.reload(ws)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if duration > 0:
        threading.Timer(duration, stop.set).start()
    console.print(f"recording every message's header into {ws.root / 'audit'} as {AUDITOR} (Ctrl-C to stop)")
    run_recorder(log, ws.bundle_dir(AUDITOR), stop)
    console.print(f"{log.count()} message(s) on the trail")


def _print_trail(log, job: str, as_json: bool) -> None:
    import dataclasses
    import datetime as dt
    import json

    from broker.audit import describe

    records = log.trail(job)
    if not records:
        _fail(f"no message about job {job!r} on the trail (was `fbm-broker audit WORKSPACE` recording?)")
    if as_json:
        for r in records:
            click.echo(json.dumps({**dataclasses.asdict(r), "event": describe(r)}))
        return
    table = Table("time (UTC)", "event", "round", "sender", "bytes", "body sha256", "topic")
    for r in records:
        when = dt.datetime.fromtimestamp(r.at, dt.UTC).strftime("%H:%M:%S.%f")[:-3]
        table.add_row(when, describe(r), "" if r.round is None else str(r.round), r.sender, str(r.size),
                      r.body_sha256[:16], r.topic.removeprefix("fbm/v1/"))
    console.print(f"job {job}: {len(records)} message(s)")
    console.print(table)
