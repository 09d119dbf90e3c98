"""Experiment trackers: where a run's config, per-step metrics and final summary go besides
metrics.jsonl. ``log.trackers`` names them: ``tensorboard`` (event files in the run dir),
``wandb`` (Weights & Biases; online, or offline files under ``<run_dir>/wandb``) and
``mlflow`` (any MLflow tracking store; by default MLFLOW_TRACKING_URI, else an sqlite store
``<run_dir>/mlflow.db`` with artifacts in ``<run_dir>/mlruns``: ``mlflow ui --backend-store-uri
sqlite:///<run_dir>/mlflow.db`` shows it).
W&B and MLflow are optional extras (``pip install 'rayalign[wandb]'`` / ``'rayalign[mlflow]'``):
the config check names the missing one before any actor starts.

Every tracker gets the same calls: :meth:`log` with a step's numbers (non-finite values and
anything not a number, such as the ledger's row lists, are left out), :meth:`summary` with the
final evaluation, :meth:`close` with how the run ended. A resumed run continues the tracker
run it began: the W&B and MLflow run ids are kept in ``<run_dir>/trackers.json``. Steps redone
after a rewind appear again with the same step number (W&B plots them against the ``step``
key, which may go back; its own counter only grows).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

KINDS = ("tensorboard", "wandb", "mlflow")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
IDS_FILE = "trackers.json"


def missing(trackers: list[str]) -> list[str]:
    """The named trackers whose package is not installed here."""
    return [t for t in trackers if importlib.util.find_spec(PACKAGES[t]) is None]


def numbers(metrics: dict) -> dict[str, float]:
    """The finite numbers of a metrics row (bools count as 0/1)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(v)}


def flat(tree: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys (``policy.zero_stage``) to strings, for stores of flat
    parameters."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flat(value, name))
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out


class TensorBoard:
    def __init__(self, run_dir: Path, **_):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def summary(self, values: dict[str, float]) -> None:
        pass  # the final/* metrics of the last step carry it

    def flush(self) -> None:
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class WandB:
    """One W&B run per rayalign run, its id kept for a resume. ``mode`` None leaves W&B's own
    choice (``WANDB_MODE``, else online); the API key comes from the environment or
    ``wandb login``, never from the config."""

    def __init__(self, run_dir: Path, config: dict, project: str, name: str,
                 run_id: str | None, mode: str | None, **_):
        import wandb
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True)
        self.run = wandb.init(project=project, name=name, config=config, dir=str(run_dir),
                              id=run_id, resume="allow",
                              mode=mode, settings=settings, reinit="create_new")
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.id = self.run.id

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"step": step, **values})

    def summary(self, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def flush(self) -> None:
        pass  # the W&B service writes as it goes

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status != "failed" else 1)


class MLflow:
    """One MLflow run per rayalign run (resumed by id), in experiment ``project``; the config as
    flat parameters and as ``config.json``, the summary as ``summary/*`` metrics and
    ``summary.json``."""

    STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}

    def __init__(self, run_dir: Path, config: dict, project: str, name: str,
                 run_id: str | None, uri: str | None, **_):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
        local = uri is None
        self.client = MlflowClient(tracking_uri=uri or f"sqlite:///{run_dir.resolve()}/mlflow.db")
        if run_id is not None:
            self.id = self.client.get_run(run_id).info.run_id
            self.client.update_run(self.id, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name(project)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            project, artifact_location=(run_dir / "mlruns").resolve().as_uri() if local else None)
        self.id = self.client.create_run(exp_id, run_name=name).info.run_id
        params = [Param(k, v[:6000]) for k, v in sorted(flat(config).items())]
        for i in range(0, len(params), 100):  # the store takes at most 100 per batch
            self.client.log_batch(self.id, params=params[i:i + 100])
        self.client.log_dict(self.id, config, "config.json")

    def log(self, step: int, values: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.id, metrics=metrics[i:i + 1000])

    def summary(self, values: dict[str, float]) -> None:
        self.log(0, {f"summary/{k}": v for k, v in values.items()})
        self.client.log_dict(self.id, values, "summary.json")

    def flush(self) -> None:
        pass  # every call is written through

    def close(self, status: str) -> None:
        self.client.set_terminated(self.id, self.STATUS[status])


def _mlflow_key(key: str) -> str:
    """MLflow allows letters, digits, ``_ - . / :`` and spaces in a metric name."""
    return re.sub(r"[^\w\-./: ]", "_", key)


CLASSES = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def open_trackers(run_dir: Path, kinds: list[str], config: dict, log_cfg,
                  resume: bool) -> list:
    """The trackers of ``kinds``; a resumed run reopens the W&B/MLflow runs whose ids it saved
    in ``trackers.json``, a fresh one starts new runs and records their ids there."""
    ids_path = run_dir / IDS_FILE
    ids = json.loads(ids_path.read_text()) if resume and ids_path.exists() else {}
    name = log_cfg.run_name or run_dir.name
    opened = []
    for kind in kinds:
        opened.append(CLASSES[kind](run_dir=run_dir, config=config, project=log_cfg.project,
                                    name=name, run_id=ids.get(kind), mode=log_cfg.wandb_mode,
                                    uri=log_cfg.mlflow_uri))
        log.info("tracker %s: %s", kind, getattr(opened[-1], "id", run_dir / "tensorboard"))
    new_ids = {k: t.id for k, t in zip(kinds, opened) if hasattr(t, "id")}
    if new_ids:
        ids_path.write_text(json.dumps(new_ids) + "\n")
    return opened
