"""The public entry point: ``train(cfg)`` runs the configured algorithm on Ray."""
from __future__ import annotations

import logging

import ray
import yaml

from orchestrator.config import RunConfig
from orchestrator.evaluate import load_reward_fn
from orchestrator.offline_loop import run_offline
from orchestrator.rl_loop import run_rl
from orchestrator.roles import connect
from orchestrator.session import TrainResult
from orchestrator.storage import RunStorage

log = logging.getLogger(__name__)
LOOPS = {"dpo": run_offline, "sft": run_offline, "rm": run_offline,
         "ppo": run_rl, "grpo": run_rl, "rloo": run_rl, "reinforce_pp": run_rl}


def train(cfg: RunConfig) -> TrainResult:
    """Validate files, write the run dir's config.yaml, join or start Ray, run the loop, leave
    Ray as it was found."""
    cfg.check()
    cfg.check_paths()
    load_reward_fn(cfg.eval.reward_fn)
    storage = RunStorage(cfg.run_dir)  # a bad URI or missing credentials fail here
    storage.write_text("config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    started = connect(cfg.cluster)
    try:
        return LOOPS[cfg.algorithm](cfg, storage)
    finally:
        if started:
            ray.shutdown()
