"""The public entry point: ``train(cfg)`` runs the configured algorithm on Ray."""
from __future__ import annotations

import logging
from pathlib import Path

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
         "ppo": run_rl, "grpo": run_rl, "rloo": run_rl, "reinforce_pp": run_rl,
         "online_dpo": run_rl}


def train(cfg: RunConfig) -> TrainResult:
    """Validate files, write the run dir's config.yaml, join or start Ray, run the loop, leave
    Ray as it was found."""
    cfg.check()
    cfg.check_paths()
    load_reward_fn(cfg.eval.reward_fn)
    if cfg.algorithm == "online_dpo" and cfg.rl.rounds:
        return _iterative(cfg)
    storage = RunStorage(cfg.run_dir)  # a bad URI or missing credentials fail here
    storage.write_text("config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    started = connect(cfg.cluster)
    try:
        return LOOPS[cfg.algorithm](cfg, storage)
    finally:
        if started:
            ray.shutdown()


def _iterative(cfg: RunConfig) -> TrainResult:
    """Iterative DPO (``rl.rounds``): its rounds as pipeline stages under the run dir
    (orchestrator/rounds.py); the result of the last round, with every round's usage."""
    from orchestrator.schema import ConfigError
    from orchestrator.pipelines import Stage, expand_rounds, final_checkpoint, run_pipeline
    from orchestrator.roles import merge_usage
    if "://" in cfg.run_dir:
        raise ConfigError(f"run_dir: {cfg.run_dir}: iterative DPO's rounds read each other's "
                          f"files, so its run_dir is a local path (shared storage on a cluster)")
    root = Path(cfg.run_dir)
    stages = expand_rounds(Stage("dpo", [], cfg, ()), root)
    result = run_pipeline(root, stages)
    trained = [r for r in result.stages if r.algorithm == "dpo"]
    return TrainResult(root, cfg.train.max_steps, final_checkpoint(stages[-1].cfg),
                       trained[-1].model_dir, trained[0].before, trained[-1].after,
                       usage=merge_usage([r.usage for r in result.stages]))
