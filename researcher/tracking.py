"""A finished job into the researcher's usual trackers: TensorBoard event files and MLflow runs.

Both read the job's history (per round: the aggregated metrics and every node's report), so
a job followed in `fbm-researcher` can be compared with local runs in the tools a lab uses.
Metric names: `global/<metric>` for the round's aggregate, `<node>/<metric>` for a site's own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from researcher.experiment import Experiment


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def scalars(history: list[dict[str, Any]]) -> list[tuple[str, int, float]]:
    """(tag, round, value) for every numeric metric of the history, global then per node."""
    out: list[tuple[str, int, float]] = []
    for h in history:
        step = int(h["round"])
        out += [(f"global/{k}", step, v) for k, raw in sorted(h["metrics"].items()) if (v := _number(raw)) is not None]
        out.append(("global/duration_s", step, float(h.get("duration_s", 0.0))))
        for r in h["reports"]:
            out += [(f"{r['node']}/{k}", step, v) for k, raw in sorted(r["metrics"].items())
                    if (v := _number(raw)) is not None]
            out.append((f"{r['node']}/n_samples", step, float(r["n_samples"])))
    return out


def write_tensorboard(folder: Path, exp: Experiment) -> Path:
    """Event files under `folder` (open with `tensorboard --logdir folder`)."""
    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

    folder.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(folder), comment=exp.job_id)
    try:
        for tag, step, value in scalars(exp.state.history):
            writer.add_scalar(tag, value, global_step=step)
        writer.add_text("job", json.dumps({"job_id": exp.job_id, "plan": exp.plan.model_dump(exclude={"source"}),
                                           "training_args": exp.training_args}, default=str))
    finally:
        writer.close()
    return folder


def _params(exp: Experiment) -> dict[str, str]:
    flat = {"job_id": exp.job_id, "plan": exp.plan.zoo or f"source:{exp.plan.class_name}",
            "rounds": exp.spec_fields.get("rounds"), "quorum": exp.spec_fields.get("quorum")}
    flat.update({f"model.{k}": v for k, v in exp.model_args.items()})
    flat.update({f"train.{k}": v for k, v in exp.training_args.items() if k not in ("encoding", "standardize")})
    return {k: json.dumps(v, default=str)[:500] if not isinstance(v, str) else v[:500] for k, v in flat.items()}


def mlflow_client(store: Path):
    """An MlflowClient on the local file store `store` (MLflow 3 keeps the file store, which
    needs no database server, behind an explicit opt-in: given here)."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=store.resolve().as_uri())


def write_mlflow(store: Path, exp: Experiment, *, experiment: str = "fedbiomq", model_file: Path | None = None) -> str:
    """The job as an MLflow run (global metrics, parameters, the model file) with one nested
    run per node, in the local file store `store`; the parent run's id."""
    from mlflow.entities import Metric, Param

    store.mkdir(parents=True, exist_ok=True)
    client = mlflow_client(store)
    found = client.get_experiment_by_name(experiment)
    exp_id = found.experiment_id if found else client.create_experiment(experiment)
    parent = client.create_run(exp_id, run_name=exp.job_id, tags={"fedbiomq.job": exp.job_id})
    runs = {"global": parent.info.run_id}
    metrics: dict[str, list[Metric]] = {}
    for tag, step, value in scalars(exp.state.history):
        node, name = tag.split("/", 1)
        if node not in runs:
            runs[node] = client.create_run(exp_id, run_name=f"{exp.job_id}/{node}", tags={
                "mlflow.parentRunId": parent.info.run_id, "fedbiomq.job": exp.job_id, "fedbiomq.node": node}).info.run_id
        metrics.setdefault(node, []).append(Metric(name, value, 0, step))
    params = [Param(k, v) for k, v in _params(exp).items()]
    for node, run_id in runs.items():
        client.log_batch(run_id, metrics=metrics.get(node, []), params=params if node == "global" else [])
        if node != "global":
            client.set_terminated(run_id)
    if model_file is not None and model_file.exists():
        client.log_artifact(parent.info.run_id, str(model_file))
    client.set_terminated(parent.info.run_id, "FINISHED" if exp.state.status == "done" else "FAILED")
    return parent.info.run_id
