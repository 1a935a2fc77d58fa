"""The node's web console: server-rendered pages over the same database as `fbm-node`.

Every change goes through `node.admin` (as the CLI's do), so the console and the CLI are two
doors to one registry, one plan store and one audit trail. Pages need a session (login);
every form carries the session's CSRF token; responses forbid framing, caching and foreign
scripts.
"""

from __future__ import annotations

import datetime as dt
import hmac
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlparse

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool

from node import admin
from node.audit import AuditTrail
from node.config import NodeSettings
from node.datasets import TYPES
from node.db import Database
from node.display import visible
from node.doctor import CheckResult
from node.plans import PlanStatus, PlanStore
from node.privacy_budget import PrivacyLedger
from node.registry import Registry
from node.state import NodeState
from node.ui import views
from node.ui.accounts import Accounts, Session, SessionPolicy

HERE = Path(__file__).parent
SESSION_COOKIE = "fbm_session"
LOGIN_COOKIE = "fbm_login_csrf"
HEARTBEAT_STALE_S = 15.0
DECISIONS = {"approve": PlanStatus.APPROVED, "reject": PlanStatus.REJECTED, "revoke": PlanStatus.REVOKED}


class _LoginRequired(Exception):
    def __init__(self, next_path: str) -> None:
        self.next_path = next_path


class _BadCsrf(Exception):
    pass


@dataclass(frozen=True)
class ConsoleConfig:
    """What the console needs besides the node's settings."""

    secure_cookies: bool = False  # set when served over TLS
    policy: SessionPolicy = field(default_factory=SessionPolicy)
    browse_start: Path = field(default_factory=Path.home)


@dataclass
class _Console:
    """What every page of the console shares: the database, the accounts, the templates."""

    settings: NodeSettings
    config: ConsoleConfig
    db: Database
    accounts: Accounts
    templates: Jinja2Templates
    node_name: str

    def session_of(self, request: Request) -> Session:
        session = self.accounts.session(request.cookies.get(SESSION_COOKIE))
        if session is None:
            raise _LoginRequired(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
        return session

    async def form_of(self, request: Request, session: Session) -> dict[str, str]:
        form = await request.form()
        if not hmac.compare_digest(str(form.get("csrf", "")), session.csrf):
            raise _BadCsrf()
        return {k: str(v) for k, v in form.items() if isinstance(v, str)}

    def page(self, request: Request, session: Session, name: str, status_code: int = 200, **context) -> HTMLResponse:
        return self.templates.TemplateResponse(request, name, {
            "session": session, "node": self.node_name, "flash": self.accounts.flash(session), **context,
        }, status_code=status_code)

    def done(self, session: Session, to: str, message: str) -> RedirectResponse:
        self.accounts.flash(session, message)
        return RedirectResponse(to, status_code=303)

    @staticmethod
    def actor(session: Session) -> str:
        return f"ui:{session.username}"


def create_app(settings: NodeSettings, config: ConsoleConfig | None = None) -> FastAPI:
    config = config or ConsoleConfig()
    db = Database(settings.database)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["when"] = _when
    templates.env.filters["short"] = lambda s, n=16: (s or "")[:n]
    templates.env.filters["visible"] = visible  # control and bidi characters as ⟨U+XXXX⟩ (node/display.py)
    app = FastAPI(title="fedbiomq node console", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    c = _Console(settings, config, db, Accounts(db, config.policy), templates, _node_name(settings))
    _security(app)
    for routes in (_login_routes, _dataset_routes, _plan_routes, _job_routes):
        routes(app, c)
    return app


def _security(app: FastAPI) -> None:
    """Headers on every response; a missing session goes to the login page, a bad CSRF token is a 403."""

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(_LoginRequired)
    async def to_login(request: Request, exc: _LoginRequired):
        return RedirectResponse(f"/login?next={quote(exc.next_path)}", status_code=303)

    @app.exception_handler(_BadCsrf)
    async def bad_csrf(request: Request, exc: _BadCsrf):
        return HTMLResponse("<h1>403</h1><p>The form was stale or forged (CSRF token mismatch). "
                            "Go back, reload the page and try again.</p>", status_code=403)


def _login_routes(app: FastAPI, c: _Console) -> None:
    """Log in (CSRF-checked, rate-limited), log out, the home page."""

    @app.get("/login", response_class=HTMLResponse)
    async def login_form(request: Request, next: str = "/", error: str = ""):
        token = secrets.token_urlsafe(24)
        response = c.templates.TemplateResponse(request, "login.html", {
            "node": c.node_name, "csrf": token, "next": _local(next), "error": error, "session": None})
        response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict", secure=c.config.secure_cookies)
        return response

    @app.post("/login")
    async def login(request: Request):
        form = await request.form()
        expected = request.cookies.get(LOGIN_COOKIE, "")
        if not expected or not hmac.compare_digest(str(form.get("csrf", "")), expected):
            raise _BadCsrf()
        username, password = str(form.get("username", "")).strip(), str(form.get("password", ""))
        client = request.client.host if request.client else "?"
        audit = AuditTrail(c.db)
        next_path = _local(str(form.get("next", "/")))
        if c.accounts.locked_out(username, client):
            audit.record("ui_login_refused", actor=f"ui:{username}", client=client, reason="too many failed logins")
            minutes = int(c.config.policy.failure_window_s // 60)
            return _login_again(c.templates, request, c.node_name, next_path,
                                f"Too many failed logins: try again in up to {minutes} minutes.", 429, c.config)
        session = await run_in_threadpool(c.accounts.login, username, password, client)
        if session is None:
            audit.record("ui_login_failed", actor=f"ui:{username}", client=client)
            return _login_again(c.templates, request, c.node_name, next_path, "Wrong user name or password.", 401, c.config)
        audit.record("ui_login", actor=f"ui:{username}", client=client)
        response = RedirectResponse(next_path, status_code=303)
        response.set_cookie(SESSION_COOKIE, session.token, httponly=True, samesite="strict", secure=c.config.secure_cookies)
        response.delete_cookie(LOGIN_COOKIE)
        return response

    @app.post("/logout")
    async def logout(request: Request):
        session = c.session_of(request)
        await c.form_of(request, session)
        c.accounts.logout(session.token)
        AuditTrail(c.db).record("ui_logout", actor=c.actor(session))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    @app.get("/")
    async def home(request: Request):
        c.session_of(request)
        return RedirectResponse("/datasets", status_code=303)


def _dataset_routes(app: FastAPI, c: _Console) -> None:
    """List, add (with a file browser), show and remove datasets."""

    @app.get("/datasets", response_class=HTMLResponse)
    async def datasets(request: Request):
        session = c.session_of(request)
        return c.page(request, session, "datasets.html", datasets=Registry(c.db).list(), tab="datasets")

    @app.get("/datasets/new", response_class=HTMLResponse)
    async def dataset_form(request: Request, browse: str | None = None, path: str = "", error: str = ""):
        session = c.session_of(request)
        listing = views.browse(browse or (str(Path(path).parent) if path else None), c.config.browse_start)
        return c.page(request, session, "dataset_new.html", tab="datasets", listing=listing, types=TYPES,
                      values={"path": path}, error=error)

    @app.post("/datasets")
    async def dataset_add(request: Request):
        session = c.session_of(request)
        form = await c.form_of(request, session)
        tags = [t.strip() for t in form.get("tags", "").split(",") if t.strip()]
        try:
            ds = await run_in_threadpool(
                admin.add_dataset, c.db, c.actor(session), form.get("name", "").strip(), form.get("type", ""),
                form.get("path", "").strip(), tags, description=form.get("description", ""),
                target=form.get("target", "").strip() or None, labels=form.get("labels", "").strip() or None)
        except admin.AdminError as exc:
            listing = views.browse(str(Path(form.get("path", "") or c.config.browse_start).parent), c.config.browse_start)
            return c.page(request, session, "dataset_new.html", status_code=400, tab="datasets", listing=listing,
                          types=TYPES, values=form, error=str(exc))
        return c.done(session, f"/datasets/{quote(ds.name)}", f"Dataset {ds.name} added: {ds.meta.get('n_samples')} samples.")

    @app.get("/datasets/{name}", response_class=HTMLResponse)
    async def dataset_show(request: Request, name: str):
        session = c.session_of(request)
        ds = Registry(c.db).get(name)
        if ds is None:
            return c.page(request, session, "missing.html", status_code=404, what=f"dataset {name!r}", tab="datasets")
        shown = await run_in_threadpool(views.preview, ds.type, ds.path, target=ds.target, labels=ds.labels)
        privacy = views.dataset_privacy(c.settings, c.db, ds.name)
        return c.page(request, session, "dataset.html", tab="datasets", ds=ds, info=ds.public(), preview=shown,
                      privacy=privacy)

    @app.post("/datasets/{name}/remove")
    async def dataset_remove(request: Request, name: str):
        session = c.session_of(request)
        await c.form_of(request, session)
        try:
            admin.remove_dataset(c.db, c.actor(session), name)
        except admin.AdminError as exc:
            return c.done(session, "/datasets", str(exc))
        return c.done(session, "/datasets", f"Dataset {name} removed (its files were left alone).")


def _plan_routes(app: FastAPI, c: _Console) -> None:
    """List and show training plans; approve, reject or revoke one."""

    @app.get("/plans", response_class=HTMLResponse)
    async def plans(request: Request, status: str = ""):
        session = c.session_of(request)
        wanted = PlanStatus(status) if status in {s.value for s in PlanStatus} else None
        return c.page(request, session, "plans.html", tab="plans", plans=PlanStore(c.db).list(wanted), status=status,
                      statuses=[s.value for s in PlanStatus])

    @app.get("/plans/{plan_id}", response_class=HTMLResponse)
    async def plan_show(request: Request, plan_id: str):
        session = c.session_of(request)
        plan = PlanStore(c.db).get(plan_id)
        if plan is None:
            return c.page(request, session, "missing.html", status_code=404, what=f"plan {plan_id!r}", tab="plans")
        jobs = [s for s in views.summarize_jobs(AuditTrail(c.db).entries(limit=5000)) if s.plan == plan.plan_id]
        return c.page(request, session, "plan.html", tab="plans", plan=plan, code=_highlight(plan.source), jobs=jobs)

    @app.post("/plans/{plan_id}/{decision}")
    async def plan_decide(request: Request, plan_id: str, decision: str):
        session = c.session_of(request)
        form = await c.form_of(request, session)
        if decision not in DECISIONS:
            return c.done(session, "/plans", f"Unknown decision {decision!r}.")
        try:
            plan = admin.decide_plan(c.db, c.actor(session), plan_id, DECISIONS[decision], form.get("note", ""))
        except admin.AdminError as exc:
            return c.done(session, "/plans", str(exc))
        return c.done(session, f"/plans/{quote(plan.plan_id)}",
                      f"Plan {plan.plan_id[:16]} ({plan.class_name}) is now {plan.status}; the running node acts on it within seconds.")


def _job_routes(app: FastAPI, c: _Console) -> None:
    """Jobs, the audit trail, the node's status, the health check."""

    @app.get("/jobs", response_class=HTMLResponse)
    async def jobs(request: Request):
        session = c.session_of(request)
        summaries = views.summarize_jobs(AuditTrail(c.db).entries(limit=5000))
        return c.page(request, session, "jobs.html", tab="jobs", jobs=summaries, epsilons=PrivacyLedger(c.db).by_job())

    @app.get("/jobs/{job}", response_class=HTMLResponse)
    async def job_show(request: Request, job: str):
        session = c.session_of(request)
        entries = AuditTrail(c.db).entries(job, limit=5000)
        summary = next(iter(views.summarize_jobs(entries)), None)
        if summary is None:
            return c.page(request, session, "missing.html", status_code=404, what=f"job {job!r}", tab="jobs")
        longest = max((r.train_s or 0 for r in summary.rounds), default=0) or 1
        return c.page(request, session, "job.html", tab="jobs", job=summary, entries=entries, longest=longest)

    @app.get("/audit", response_class=HTMLResponse)
    async def audit(request: Request, event: str = "", job: str = "", actor_: str = "", limit: int = 200):
        session = c.session_of(request)
        actor_filter = request.query_params.get("actor", actor_)
        entries = AuditTrail(c.db).entries(job or None, limit=5000)
        shown = [e for e in entries if (not event or event in e["event"]) and (not actor_filter or actor_filter in (e["actor"] or ""))]
        events = sorted({e["event"] for e in entries})
        return c.page(request, session, "audit.html", tab="audit", entries=shown[:max(1, min(limit, 5000))],
                      events=events, filters={"event": event, "job": job, "actor": actor_filter, "limit": limit})

    @app.get("/status", response_class=HTMLResponse)
    async def status(request: Request):
        session = c.session_of(request)
        return c.page(request, session, "status.html", tab="status", checks=_status(c.settings, c.db))

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response("ok\n", media_type="text/plain")


def _login_again(templates, request, node_name, next_path, error, code, config) -> HTMLResponse:
    token = secrets.token_urlsafe(24)
    response = templates.TemplateResponse(request, "login.html", {
        "node": node_name, "csrf": token, "next": next_path, "error": error, "session": None}, status_code=code)
    response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict", secure=config.secure_cookies)
    return response


def _local(path: str) -> str:
    """Only redirect within this site (no open redirect through ?next=)."""
    parsed = urlparse(path)
    if parsed.scheme or parsed.netloc or not path.startswith("/") or path.startswith("//"):
        return "/"
    return path


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _highlight(source: str) -> Markup:
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer

    return Markup(highlight(visible(source) or "# (zoo plan: built into fedbiomq)", PythonLexer(),
                            HtmlFormatter(linenos="table", cssclass="code")))


def _node_name(settings: NodeSettings) -> str:
    from common.identity import Identity

    try:
        return Identity.load(settings.bundle).name
    except ValueError:
        return settings.node_dir.name


def _status(settings: NodeSettings, db: Database) -> list[CheckResult]:
    """The node's health as the console sees it: the doctor's local checks, the broker link as
    the running node last reported it, plans waiting. Nothing secret (no key, no password)."""
    from node.doctor import Doctor

    lines = Doctor(settings.node_dir).local_checks(settings)
    beat = NodeState(db).heartbeat()
    if beat is not None and beat.age_s() <= HEARTBEAT_STALE_S:
        lines.append(CheckResult("broker connection", "ok" if beat.connected else "fail",
                                 ("connected to " if beat.connected else "not connected to ") + beat.broker,
                                 "" if beat.connected else "run `fbm-node doctor` for the reason"))
        lines.append(CheckResult("jobs taking part", "ok", ", ".join(beat.jobs) or "none"))
    pending = PlanStore(db).list(PlanStatus.PENDING)
    lines.append(CheckResult("plans awaiting review", "warn" if pending else "ok", str(len(pending)),
                             "see Training plans" if pending else ""))
    return lines
