"""Online RL (GRPO, or PPO with a critic) from a Python driver script, through rayalign's
public API.

It builds a tiny model and the synthetic task under ``--root``, then trains the policy against
the task's programmatic reward with four roles (vLLM rollout engine, reward function, frozen
reference, policy trainer; PPO adds a critic, which the reward function shares a placement
bundle with), syncing the trainer's weights into the engine after every update, and reports
the held-out reward of the engine's samples before and after. The same script runs

- on a laptop (embedded local Ray, CPU):   python examples/rl_driver.py [--algorithm ppo]
- as a Ray job, joining that job's cluster (``RAY_ADDRESS``, which Ray sets for the job):
  ray job submit --working-dir . -- python examples/rl_driver.py --root /shared/example-rl
  (``--root`` must be a path every node sees; ``cluster.num_cpus`` is ignored when joining)
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from orchestrator import RunConfig, train
from orchestrator.synthetic import write_dataset
from orchestrator.tiny_model import build_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--root", default="runs/example-rl", help="where model, data and run go")
    p.add_argument("--algorithm", default="grpo", choices=("grpo", "ppo"))
    p.add_argument("--steps", type=int, default=30, help="RL steps (30 raise the reward)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root_dir = Path(args.root).absolute()
    model = build_model(root_dir / "model", "tiny")
    data = write_dataset(root_dir / "data", n_train=600, n_eval=64, min_words=4, max_words=16)
    ppo = args.algorithm == "ppo"
    cfg = RunConfig.from_dict({
        "algorithm": args.algorithm,
        "run_dir": str(root_dir / "run"),
        "model": {"path": str(model)},
        "data": {"train": str(data["train"]), "eval": str(data["eval"])},  # the prompts of each
        "policy": {"actors": 1, "cpus": 1, "zero_stage": 0},
        "reference": {"actors": 1, "cpus": 0.5},
        "reward": {"actors": 1, "cpus": 0.5, "kind": "function",
                   "function": "orchestrator.synthetic:reward",
                   "colocate_with": "critic" if ppo else None},
        "critic": {"actors": 1, "cpus": 1, "lr": 1e-3},  # started for PPO only
        "rollout": {"actors": 1, "cpus": 1, "kv_cache_gib": 0.25, "max_model_len": 256},
        "rl": {"prompts_per_step": 8, "group_size": 8, "max_new_tokens": 16, "kl_coef": 0.01,
               "kl_mode": "reward" if ppo else "loss"},
        "optim": {"lr": 2e-3},
        "train": {"batch_size": 64, "micro_batch_size": 32, "max_steps": args.steps},
        "eval": {"num_prompts": 32},
        "checkpoint": {"resume": "never"},
        "cluster": {"num_cpus": 4 if ppo else 3},
        "log": {"trackers": []},
    })
    result = train(cfg)
    logging.getLogger("example").info(
        "held-out reward %.3f -> %.3f, response length %.1f -> %.1f tokens; model in %s",
        result.before["eval/reward"], result.after["eval/reward"],
        result.before["eval/response_tokens"], result.after["eval/response_tokens"],
        result.model_dir)


if __name__ == "__main__":
    main()
