"""The steward sees what left the hospital (issue 19): on a dataset's page its effective privacy
policy, its epsilon budget, spent and left, and the jobs that spent it; on the Jobs page each
job's epsilon. Real headless Chromium against a real `fbm-node ui` on a node folder whose
ledger holds a DP-SGD job's reservation (as the node process writes it on acceptance)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from broker.local import free_port
from broker.workspace import Workspace
from node.audit import AuditTrail
from node.db import Database
from node.privacy_budget import PrivacyLedger
from tests.conftest import require, require_module, wait_until
from tests.ui.test_console import CHROMIUM, _login, _shot, _up

pytestmark = pytest.mark.e2e
playwright_api = require_module("playwright.sync_api", "the playwright package (pip install -e '.[dev]')")
PASSWORD = "correct horse battery"


def _cli(*args: str, stdin: str | None = None) -> None:
    subprocess.run([sys.executable, "-m", "node", *args], input=stdin, text=True, check=True, capture_output=True,
                   timeout=120)


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    require(Path(CHROMIUM).exists(), f"Debian's chromium at {CHROMIUM}")
    root = tmp_path_factory.mktemp("privacy-ui")
    ws = Workspace(root / "federation")
    ws.init("ui-privacy", port=free_port(), bind="127.0.0.1")
    site = root / "site"
    _cli("init", str(site), "--bundle", str(ws.enroll("site-priv", "node")))
    rng = np.random.default_rng(0)
    np.savetxt(root / "cohort.csv", np.column_stack([rng.normal(size=(60, 2)), rng.integers(0, 2, 60)]),
               delimiter=",", header="a,b,label", comments="", fmt="%g")
    _cli("dataset", "add", "--dir", str(site), "--name", "cohort", "--type", "csv", "--path", str(root / "cohort.csv"),
         "--tag", "cohort", "--target", "label")
    _cli("user", "add", "steward", "--dir", str(site), "--password-stdin", stdin=PASSWORD + "\n")
    db = Database(site / "node.db")
    audit = AuditTrail(db)
    for job, eps in (("job-dpsgd", 3.155), ("job-client", 4.75)):
        audit.record("job_accepted", job=job, dataset="cohort", plan_sha256="zoo:logreg", actor="alice")
        PrivacyLedger(db).reserve("cohort", job, eps, 1e-5)
        audit.record("privacy_spent", job=job, dataset="cohort", epsilon=eps, delta=1e-5)
    audit.record("job_accepted", job="job-plain", dataset="cohort", plan_sha256="zoo:logreg", actor="alice")
    port = free_port()
    env = {**os.environ, "FBM_NODE_PRIVACY__EPSILON_BUDGET": "12", "FBM_NODE_PRIVACY__MIN_BATCH_SIZE": "16"}
    proc = subprocess.Popen([sys.executable, "-m", "node", "ui", "--dir", str(site), "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: _up(f"http://127.0.0.1:{port}"), 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def page():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        pg = browser.new_context(viewport={"width": 1280, "height": 860}).new_page()
        yield pg
        browser.close()


def test_a_datasets_page_shows_its_policy_budget_and_the_jobs_that_spent_it(console, page):
    _login(page, console)
    page.goto(console + "/datasets/cohort")
    policy = page.inner_text("#privacy-policy")
    assert "min_batch_size" in policy and "16" in policy and "epsilon_budget" in policy
    assert page.inner_text("#epsilon-budget") == "12"
    assert page.inner_text("#epsilon-spent") == "7.905"
    assert page.inner_text("#epsilon-left") == "4.095"
    spend = page.inner_text("#privacy-spend")
    assert "job-dpsgd" in spend and "3.155" in spend and "job-client" in spend and "4.750" in spend
    assert "job-plain" not in spend
    _shot(page, "dataset-privacy")


def test_the_jobs_page_shows_each_jobs_epsilon(console, page):
    _login(page, console)
    page.goto(console + "/jobs")
    rows = {r.inner_text().split()[0]: r.inner_text() for r in page.query_selector_all("#jobs tbody tr")}
    assert "3.155" in rows["job-dpsgd"] and "4.750" in rows["job-client"]
    assert page.inner_text("#jobs tbody tr:has-text('job-plain') td.epsilon") == "-"
    _shot(page, "jobs-epsilon")
