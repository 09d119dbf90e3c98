"""Shared assets for end-to-end runs: a tiny model and the synthetic task, built once."""
from __future__ import annotations

import copy

import pytest

from orchestrator import RunConfig
from orchestrator.sampler import ResumableSampler
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
    "log": {"progress_bar": False, "trackers": ["tensorboard"]},
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


@pytest.fixture
def grpo_config(assets):
    """``grpo_config(run_dir, section={...}, key=value, ...)``: a small GRPO run on the synthetic
    task as a config dict (transformers rollout, function reward, 3 CPUs), the named sections
    updated and plain keys (``algorithm="ppo"``) replaced."""
    def make(run_dir, **sections) -> dict:
        data = {
            "algorithm": "grpo", "run_dir": str(run_dir),
            "model": {"path": assets["model"]},
            "data": {"train": assets["train"], "max_length": 128},
            "policy": {"actors": 1, "cpus": 1, "zero_stage": 0},
            "reference": {"actors": 1, "cpus": 0.5},
            "reward": {"actors": 1, "cpus": 0.5, "kind": "function",
                       "function": "orchestrator.synthetic:reward"},
            "rollout": {"actors": 1, "cpus": 1, "max_model_len": 256, "backend": "hf"},
            "rl": {"prompts_per_step": 8, "group_size": 4, "max_new_tokens": 8},
            "optim": {"lr": 1e-3},
            "train": {"batch_size": 32, "micro_batch_size": 32, "max_steps": 8},
            "checkpoint": {"every": 0, "keep": 2},
            "cluster": {"num_cpus": 3},
            "log": {"progress_bar": False, "trackers": []},
        }
        for key, value in sections.items():  # a section is updated, a plain key replaced
            data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
        return data
    return make


@pytest.fixture
def drawn_rows(assets):
    """``drawn_rows(cfg)``: the prompt rows an uninterrupted online run of config dict ``cfg``
    draws, step by step (every prompt of the synthetic train file kept: row i + 1 is prompt i)."""
    def rows(cfg: dict) -> list:
        n = sum(1 for _ in open(assets["train"]))
        sampler = ResumableSampler(n, cfg.get("train", {}).get("seed", 0))
        return [[i + 1 for i in sampler.next_batch(cfg["rl"]["prompts_per_step"])]
                for _ in range(cfg["train"]["max_steps"])]
    return rows


@pytest.fixture(scope="module")
def shared_ray():
    """One embedded Ray for a module's in-process runs (``usefixtures("shared_ray")``): a run
    uses the Ray it finds up and leaves it up, which saves each run Ray's start and stop
    (about 8 s on this machine). Not for modules whose drivers run in subprocesses or that
    make clusters of their own. 4 logical CPUs: the most any such run asks for."""
    import ray

    from orchestrator.config import ClusterConfig
    from orchestrator.roles import connect
    started = connect(ClusterConfig(num_cpus=4))
    yield
    if started:
        ray.shutdown()
