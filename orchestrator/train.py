"""The public entry point: ``train(cfg)`` runs the configured algorithm on Ray."""
from __future__ import annotations

import logging
from pathlib import Path

import ray
import yaml

from orchestrator.config import RunConfig
from orchestrator.dpo_loop import TrainResult, run_dpo
from orchestrator.evaluate import load_reward_fn
from orchestrator.rl_loop import run_rl
from orchestrator.roles import connect

log = logging.getLogger(__name__)
LOOPS = {"dpo": run_dpo, "grpo": run_rl, "rloo": run_rl, "reinforce_pp": run_rl}


def train(cfg: RunConfig) -> TrainResult:
    """Validate files, write the run dir's config.yaml, join or start Ray, run the loop, leave
    Ray as it was found."""
    cfg.check()
    cfg.check_paths()
    load_reward_fn(cfg.eval.reward_fn)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    started = connect(cfg.cluster)
    try:
        return LOOPS[cfg.algorithm](cfg)
    finally:
        if started:
            ray.shutdown()
