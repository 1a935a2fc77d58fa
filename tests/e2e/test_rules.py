"""One job per family of rules through the real broker, nodes and aggregator: FedProx, SCAFFOLD,
FedAdam, Krum and ADMM; plus node selection and federated evaluation."""

from __future__ import annotations

import shutil

import pytest
import torch

from broker.local import LocalFederation
from common.identity import Identity
from researcher.experiment import Experiment
from scripts import fmnist

pytestmark = pytest.mark.e2e

NODES = ["site-1", "site-2", "site-3", "site-4"]
MODEL = {"in_features": 784, "hidden": [32], "n_classes": 10}


@pytest.fixture(scope="module")
def fed():
    fed = LocalFederation().start()
    try:
        shards = fmnist.write_shards(fed.root / "data", len(NODES), limit=2400, seed=5)
        fed.add_nodes(fed.shard_datasets(NODES, shards))
        tiny = fed.root / "data" / "tiny.csv"
        tiny.write_text("a,b,label\n" + "".join(f"{i},{i * 2},{i % 2}\n" for i in range(5)))
        fed.add_node("site-tiny", [{"name": "tiny", "type": "csv", "path": str(tiny), "tag": "tiny", "target": "label"}])
        fed.add_aggregator("agg-1")
        fed.enroll("alice", "researcher")
        fed.wait_online({*NODES, "site-tiny"})
        yield fed
    finally:
        fed.stop()
        shutil.rmtree(fed.root, ignore_errors=True)


def _run(fed, rounds=3, **kw):
    # pinned: an aggregator started later (the plug-in test's) would otherwise claim these
    # retained jobs again, not knowing another aggregator finished them
    kw.setdefault("aggregator_identity", "agg-1")
    exp = Experiment(Identity.load(fed.ws.bundle_dir("alice")), plan="mlp", tags=["fmnist"], rounds=rounds,
                     quorum=kw.pop("quorum", len(NODES)), round_deadline_s=90, model_args=MODEL, seed=3,
                     training_args={"epochs": 1, "lr": 0.05, "batch_size": 32, **kw.pop("training_args", {})}, **kw)
    exp.submit()
    state = exp.watch(timeout_s=240, progress=False)
    exp.close()
    assert state.status == "done", state.reason
    return state


def _loss(state, r):
    return state.history[r]["metrics"]["train_loss"]


@pytest.fixture(scope="module")
def fedavg(fed):
    return _run(fed)


def test_fedprox_runs_the_proximal_term_on_the_nodes(fed, fedavg):
    state = _run(fed, aggregator="fedprox", training_args={"mu": 1.0})
    assert _loss(state, -1) < _loss(state, 0)
    # same seeds, same data: only the proximal term differs, and it keeps nodes nearer the global model
    diff = sum(float((state.params[k] - fedavg.params[k]).abs().sum()) for k in state.params)
    assert diff > 0


def test_scaffold_publishes_control_variates_and_converges(fed, fedavg):
    state = _run(fed, aggregator="scaffold")
    assert _loss(state, -1) < _loss(state, 0)
    controls = {k: v for k, v in state.extra.items() if k.startswith("c/")}
    assert set(controls) == {f"c/{k}" for k in state.params}
    assert any(float(v.abs().sum()) > 0 for v in controls.values())


def test_fedadam_steps_on_the_server(fed, fedavg):
    state = _run(fed, aggregator="fedadam", aggregator_args={"lr": 0.01})
    assert _loss(state, -1) < _loss(state, 0)
    assert not all(torch.equal(state.params[k], fedavg.params[k]) for k in state.params)


def test_multi_krum_keeps_m_updates_and_records_which(fed):
    state = _run(fed, rounds=2, aggregator="krum", aggregator_args={"byzantine": 1, "m": 2})
    for h in state.history:
        assert len(h["notes"]["selected"]) == 2 and set(h["notes"]["selected"]) <= set(NODES)


def test_admm_reaches_consensus(fed):
    state = _run(fed, aggregator="admm", training_args={"rho": 0.5})
    assert _loss(state, -1) < _loss(state, 0)


def test_a_random_fraction_of_nodes_per_round_is_recorded(fed):
    state = _run(fed, rounds=3, quorum=2, selection={"mode": "fraction", "fraction": 0.5, "seed": 11})
    for h in state.history:
        assert len(h["reports"]) == 2
    assert len({tuple(sorted(r["node"] for r in h["reports"])) for h in state.history}) >= 2  # not always the same


def test_federated_evaluation_reports_global_and_local_validation_metrics(fed):
    state = _run(fed, rounds=2, training_args={"val_fraction": 0.2})
    for h in state.history:
        for rep in h["reports"]:
            assert {"val_loss_global", "val_loss_local", "val_accuracy_global", "val_accuracy_local"} <= set(rep["metrics"])
            assert rep["n_samples"] == 480  # 600 per shard, 20% held out
        assert 0 < h["metrics"]["val_accuracy_local"] <= 1
    # the global model of round 2 is the average of round 1's local models: better than the initial one
    assert state.history[1]["metrics"]["val_accuracy_global"] > state.history[0]["metrics"]["val_accuracy_global"]


def test_a_third_party_rule_plugs_in_without_touching_fedbiomq(fed, tmp_path):
    """The docs' worked example (docs/aggregators.md), installed beside a real aggregator."""
    from tests.plugin_site import install_example_plugin

    site = install_example_plugin(tmp_path / "site")
    fed.add_aggregator("agg-plugin", env={"PYTHONPATH": str(site)})
    state = _run(fed, rounds=2, aggregator="geomedian", aggregator_args={"iterations": 20}, aggregator_identity="agg-plugin")
    assert _loss(state, -1) < _loss(state, 0)
    log = (fed.root / "logs" / "agg-agg-plugin.log").read_text()
    assert "geomedian" in log


def test_federated_statistics_equal_the_pooled_values_and_standardize_a_job(fed):
    import numpy as np

    from node import datasets
    from researcher.analytics import StatisticsError, federated_statistics

    alice = Identity.load(fed.ws.bundle_dir("alice"))
    stats = federated_statistics(alice, NODES, tags=["fmnist"], bins=5, ranges=[[0.0, 1.0]])
    shards = [datasets.load("npz", p).x.reshape(600, -1).double().numpy()
              for p in sorted((fed.root / "data").glob("shard-*.npz"))]
    pooled = np.concatenate(shards)
    assert stats.n == len(pooled) == 2400 and stats.per_node == dict.fromkeys(NODES, 600)
    assert np.allclose(stats.mean, pooled.mean(axis=0), rtol=1e-9, atol=1e-12)
    assert np.allclose(stats.std, pooled.std(axis=0), rtol=1e-7, atol=1e-9)
    assert stats.min is None and stats.max is None  # one patient's value each: off by default
    # each node's cells under 5 patients are sent as 0, then the counts add up
    per_node = [np.stack([np.histogram(x[:, j], bins=5, range=(0, 1))[0] for j in range(x.shape[1])]) for x in shards]
    suppressed = sum(int(((h > 0) & (h < 5)).sum()) for h in per_node)
    assert np.array_equal(stats.hist, sum(np.where(h < 5, 0, h) for h in per_node))
    assert stats.suppressed_cells == suppressed > 0
    with pytest.raises(StatisticsError, match="at least 10"):  # 5 rows: refused, nothing leaves
        federated_statistics(alice, ["site-tiny"], tags=["tiny"])

    state = _run(fed, rounds=2, training_args={"standardize": stats.standardization()})
    assert _loss(state, -1) < _loss(state, 0)


def test_differential_privacy_clips_and_noises_on_the_nodes(fed):
    state = _run(fed, rounds=2, training_args={"dp": {"clip": 0.5, "sigma": 0.5}})  # the default policy: sigma >= 0.5
    for h in state.history:
        for rep in h["reports"]:  # nothing data-dependent and un-noised is published (was dp_update_norm)
            assert rep["n_samples"] > 0 and not [m for m in rep["metrics"] if m.startswith("dp_")]


def test_a_rule_whose_node_side_does_not_match_is_refused_up_front(fed):
    exp = Experiment(Identity.load(fed.ws.bundle_dir("alice")), plan="mlp", tags=["fmnist"], rounds=2,
                     aggregator="scaffold", training_args={"algorithm": "sgd"}, model_args=MODEL, quorum=1)
    exp.submit()
    state = exp.watch(timeout_s=60, progress=False)
    exp.close()
    assert state.status == "failed" and "needs the nodes to run the 'scaffold'" in state.reason
    assert state.history == []


@pytest.mark.parametrize("compression", [{"kind": "float16"}, {"kind": "int8"}, {"kind": "topk", "fraction": 0.05}])
def test_compressed_updates_reach_nearly_the_same_model(fed, fedavg, compression):
    state = _run(fed, training_args={"compression": compression})
    assert _loss(state, -1) < _loss(state, 0)
    gap = abs(_loss(state, -1) - _loss(fedavg, -1)) / _loss(fedavg, -1)
    assert gap < (0.02 if compression["kind"] != "topk" else 0.5), gap
    if compression["kind"] == "float16":  # nearly lossless: the models themselves agree
        diff = max(float((state.params[k] - fedavg.params[k]).abs().max()) for k in state.params)
        assert diff < 1e-2, diff


def test_an_invalid_compression_setting_is_refused_up_front(fed):
    exp = Experiment(Identity.load(fed.ws.bundle_dir("alice")), plan="mlp", tags=["fmnist"], rounds=1,
                     quorum=1, round_deadline_s=30, model_args=MODEL, aggregator_identity="agg-1",
                     training_args={"epochs": 1, "compression": {"kind": "zip"}})
    exp.submit()
    state = exp.watch(timeout_s=60, progress=False)
    exp.close()
    assert state.status == "failed" and "compression" in state.reason
