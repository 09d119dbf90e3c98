"""Shared assets for end-to-end runs: a tiny model and the synthetic task, built once."""
from __future__ import annotations

import copy

import pytest

from orchestrator import RunConfig
from orchestrator.synthetic import write_dataset
from orchestrator.tiny_model import build_model


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    model = build_model(root / "model", "tiny", seed=0)
    data = write_dataset(root / "data", n_train=1000, n_eval=128, seed=0, min_words=4, max_words=16)
    return {"model": str(model), **{name: str(path) for name, path in data.items()}}


BASE = {
    "algorithm": "dpo",
    "data": {"max_length": 96},
    "policy": {"actors": 2, "cpus": 1, "zero_stage": 2},
    "reference": {"actors": 1, "cpus": 1, "precompute": True},
    "dpo": {"loss": "sigmoid", "beta": 0.1},
    "optim": {"lr": 2e-3, "warmup_steps": 3, "schedule": "cosine"},
    "train": {"batch_size": 16, "micro_batch_size": 8, "max_steps": 40, "seed": 0},
    "eval": {"max_pairs": 128, "reward_fn": "orchestrator.synthetic:reward", "num_prompts": 32,
             "max_new_tokens": 16},
    "checkpoint": {"every": 0, "keep": 2},
    "cluster": {"num_cpus": 3},
    "log": {"progress_bar": False, "tensorboard": True},
}


@pytest.fixture
def make_config(assets, tmp_path):
    """RunConfig for the tiny task in a fresh run dir, with dotted overrides."""
    def make(*overrides: str, run_dir=None) -> RunConfig:
        data = copy.deepcopy(BASE)
        data["run_dir"] = str(run_dir or tmp_path / "run")
        data["model"] = {"path": assets["model"]}
        data["data"].update(train=assets["train"], eval=assets["eval"])
        return RunConfig.from_dict(data, list(overrides))
    return make
