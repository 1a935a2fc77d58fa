"""The field's data through the real broker: clinical tables with categories and gaps, and
scikit-learn plans, each trained over three real nodes and compared with central training."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from broker.local import LocalFederation
from common.identity import Identity
from common.training.zoo import ZOO
from node import datasets
from node.loaders.tabular import prepare
from node.plan_rounds import fit_round
from node.worker import run_task, to_tensors
from researcher.analytics import federated_statistics
from researcher.experiment import Experiment
from researcher.tabular import aligned_encoding, node_datasets
from researcher.tracking import mlflow_client
from scripts import clinical
from tests.conftest import require_module

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # ~60 s with the fixture: make test-slow (and CI)

NODES = ["site-1", "site-2", "site-3"]
SCALE = {"age": [70, 10], "mmse": [25, 5], "abeta": [0.5, 0.5]}  # units the researcher knows
TABLE_ARGS = {"epochs": 1, "lr": 0.6, "batch_size": 32, "seed": 0}
TABLE_ROUNDS = 40


def _breast_cancer_split():
    sk = require_module("sklearn", "scikit-learn (pip install -e '.[dev]')")
    from sklearn.model_selection import train_test_split

    x, y = sk.datasets.load_breast_cancer(return_X_y=True)
    return train_test_split(x.astype(np.float32), y, test_size=0.3, random_state=0, stratify=y)


@pytest.fixture(scope="module")
def fed():
    fed = LocalFederation().start()
    try:
        data = fed.root / "data"
        paths = clinical.write_sites(data, seed=0)
        xtr, _, ytr, _ = _breast_cancer_split()
        sites = {}
        for k, (name, rows) in enumerate(zip(NODES, np.array_split(np.arange(len(xtr)), 3), strict=True)):
            np.savez(data / f"bc-{k}.npz", x=xtr[rows], y=ytr[rows])
            sites[name] = [{"name": "memory-clinic", "type": "table", "path": str(paths[name]), "target": "dx",
                            "tag": "dementia"},
                           {"name": "breast-cancer", "type": "npz", "path": str(data / f"bc-{k}.npz"), "tag": "bc"}]
        fed.add_nodes(sites)
        fed.add_aggregator("fedavg-1")
        fed.enroll("alice", "researcher")
        fed.wait_online(set(NODES))
        fed.paths = paths
        yield fed
    finally:
        fed.stop()
        shutil.rmtree(fed.root, ignore_errors=True)


def _alice(fed) -> Identity:
    return Identity.load(fed.ws.bundle_dir("alice"))


def _accuracy(plan, margs, targs, params, x, y) -> float:
    model = plan(margs, targs).build_model()
    model.load_state_dict(params)
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def _central_table(path, plan, margs, targs) -> dict[str, torch.Tensor]:
    """The same pipeline on the pooled rows: the node's own encoder and training loop."""
    table = datasets.load("table", path, target="dx")
    torch.manual_seed(0)
    params = {k: v.detach().clone() for k, v in plan(margs, targs).build_model().state_dict().items()}
    for r in range(1, TABLE_ROUNDS + 1):
        params = to_tensors(run_task({"round": r, "training_args": targs, "model_args": margs, "params": params},
                                     table, plan)["params"])
    return params


@pytest.mark.slow  # 40 rounds: make test-slow (and CI)
def test_clinical_table_aligned_over_three_sites(fed):
    infos = node_datasets(_alice(fed), tags=["dementia"])
    assert sorted(infos) == NODES
    # what researchers see: categories, never the rare one (3 rows of `unknown` at site-2), no ids
    assert infos["site-2"].columns["smoking"]["categories"] == ["current", "former", "never"]
    assert infos["site-2"].columns["smoking"]["suppressed"] == 1
    assert infos["site-3"].columns["dx"]["categories"] == ["CN", "MCI"]  # this clinic sees no AD
    assert infos["site-1"].columns["patient_id"]["kind"] == "dropped"
    assert "categories" not in infos["site-1"].columns["patient_id"]
    assert infos["site-1"].columns["visit_date"]["kind"] == "dropped"

    encoding = aligned_encoding(infos.values(), target="dx", one_hot=["sex", "apoe", "smoking"],
                                numeric=["age", "mmse", "abeta"], scale=SCALE)
    assert encoding["classes"] == ["AD", "CN", "MCI"]
    assert encoding["one_hot"]["smoking"] == ["current", "former", "never"]
    width = 3 + sum(len(c) for c in encoding["one_hot"].values())
    targs = {**TABLE_ARGS, "encoding": encoding}
    margs = {"in_features": width, "n_classes": 3}
    exp = Experiment(_alice(fed), plan="logreg", tags=["dementia"], rounds=TABLE_ROUNDS, quorum=3,
                     model_args=margs, training_args=targs, round_deadline_s=60)
    try:
        exp.submit()
        state = exp.watch(timeout_s=300, progress=False)
        assert state.status == "done", state.reason
        reports = [r for h in state.history for r in h["reports"]]
        # every site encoded the same columns in the same order
        assert {r["metrics"]["encoded_width"] for r in reports} == {float(width)}
        assert len({r["metrics"]["encoding_digest"] for r in reports}) == 1
        fed_params = dict(state.params)
    finally:
        exp.close()

    plan = ZOO["logreg"]
    test = prepare(datasets.load("table", fed.paths["test"], target="dx"), targs)
    assert test.meta["encoded_features"][3:5] == ["sex=F", "sex=M"]
    central = _central_table(fed.paths["pooled"], plan, margs, targs)
    acc_fed = _accuracy(plan, margs, targs, fed_params, test.x, test.y)
    acc_central = _accuracy(plan, margs, targs, central, test.x, test.y)
    print(f"clinical table: federated {acc_fed:.4f}, central {acc_central:.4f}")
    assert acc_central > 0.8, acc_central
    assert abs(acc_fed - acc_central) <= 0.02, (acc_fed, acc_central)


SK_MODEL = {"n_features": 30, "n_classes": 2, "loss": "log_loss", "alpha": 0.01}
SK_ROUNDS = 10


def test_sgd_classifier_over_three_sites(fed):
    xtr, xte, ytr, yte = _breast_cancer_split()
    stats = federated_statistics(_alice(fed), NODES, tags=["bc"])
    targs = {"epochs": 1, "seed": 0, "standardize": stats.standardization()}
    exp = Experiment(_alice(fed), plan="sgd_classifier", tags=["bc"], rounds=SK_ROUNDS, quorum=3,
                     model_args=SK_MODEL, training_args=targs, round_deadline_s=60)
    try:
        exp.submit()
        state = exp.watch(timeout_s=180, progress=False)
        assert state.status == "done", state.reason
        assert all(0 <= r["metrics"]["train_accuracy"] <= 1 for h in state.history for r in h["reports"])
        model = exp.model()
    finally:
        exp.close()
    plan = ZOO["sgd_classifier"]
    params = {k: v.detach().clone() for k, v in plan(SK_MODEL, targs).build_model().state_dict().items()}
    for r in range(1, SK_ROUNDS + 1):  # central: the same estimator over the pooled rows
        params = fit_round({"round": r, "training_args": targs, "model_args": SK_MODEL},
                           torch.from_numpy(xtr), torch.from_numpy(ytr), plan, params)["params"]
    central = plan(SK_MODEL, targs).build_model()
    central.load_state_dict(params)
    x = (torch.from_numpy(xte).double() - torch.tensor(stats.mean)) / torch.tensor(stats.std)
    with torch.no_grad():
        acc_fed = float(((model(x)[:, 0] > 0).long().numpy() == yte).mean())
        acc_central = float(((central(x)[:, 0] > 0).long().numpy() == yte).mean())
    print(f"breast cancer SGDClassifier: federated {acc_fed:.4f}, central {acc_central:.4f}")
    assert acc_central > 0.9, acc_central
    assert abs(acc_fed - acc_central) <= 0.02, (acc_fed, acc_central)


def test_results_to_tensorboard_and_mlflow(fed, tmp_path):
    require_module("tensorboard", "tensorboard")
    require_module("mlflow", "mlflow-skinny")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stats = federated_statistics(_alice(fed), NODES, tags=["bc"])
    exp = Experiment(_alice(fed), plan="sgd_classifier", tags=["bc"], rounds=3, quorum=3, model_args=SK_MODEL,
                     training_args={"epochs": 1, "seed": 0, "standardize": stats.standardization()}, round_deadline_s=60)
    try:
        job = exp.submit()
        assert exp.watch(timeout_s=120, progress=False).status == "done"
        history = exp.state.history
    finally:
        exp.close()
    out, store = tmp_path / "res", tmp_path / "mlruns"
    done = subprocess.run([sys.executable, "-m", "researcher", "results", job, "--bundle", str(fed.ws.bundle_dir("alice")),
                           "--out", str(out), "--tensorboard", "--mlflow", str(store)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"global/train_loss", "site-1/train_accuracy", "site-3/n_samples"} <= tags
    loss = events.Scalars("global/train_loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [round(e.value, 5) for e in loss] == [round(h["metrics"]["train_loss"], 5) for h in history]

    client = mlflow_client(store)
    runs = client.search_runs([client.get_experiment_by_name("fedbiomq").experiment_id])
    parent = next(r for r in runs if r.info.run_name == job)
    assert parent.info.status == "FINISHED" and parent.data.params["plan"] == "sgd_classifier"
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "train_loss")] == [1, 2, 3]
    children = {r.data.tags["fedbiomq.node"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == NODES
    site1 = [m.value for m in client.get_metric_history(children["site-1"].info.run_id, "train_accuracy")]
    assert site1 == [next(r for r in h["reports"] if r["node"] == "site-1")["metrics"]["train_accuracy"] for h in history]
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["model.pt"]


def test_quickstart_notebook_drives_the_federation(fed, tmp_path, monkeypatch):
    nbformat = require_module("nbformat", "nbformat")
    require_module("ipykernel", "ipykernel")
    from nbclient import NotebookClient

    monkeypatch.setenv("FBM_RESEARCHER_BUNDLE", str(fed.ws.bundle_dir("alice")))
    monkeypatch.setenv("FBM_TAGS", "bc")
    monkeypatch.setenv("FBM_ROUNDS", "3")
    monkeypatch.setenv("FBM_RESULTS", str(tmp_path / "results"))
    nb = nbformat.read(Path(__file__).parents[2] / "docs" / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert "status: done" in text, text
    assert text.count("round ") >= 3 and "site-2: breast-cancer" in text
    assert any("image/png" in o.get("data", {}) for o in outputs), "no inline plot"
    assert len(list((tmp_path / "results").glob("*/model.pt"))) == 1
