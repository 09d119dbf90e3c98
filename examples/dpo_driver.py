"""Offline DPO from a Python driver script, through rayalign's public API.

It builds a tiny model and the synthetic preference task under ``--root``, trains, and reports
what it learned. The same script runs

- on a laptop (embedded local Ray, CPU):   python examples/dpo_driver.py
- as a Ray job, joining that job's cluster (``RAY_ADDRESS``, which Ray sets for the job):
  ray job submit --working-dir . -- python examples/dpo_driver.py --root /shared/example-dpo
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
    p.add_argument("--root", default="runs/example-dpo", help="where model, data and run go")
    p.add_argument("--steps", type=int, default=30, help="DPO steps (30 learn the preference)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root_dir = Path(args.root).absolute()
    model = build_model(root_dir / "model", "tiny")
    data = write_dataset(root_dir / "data", n_train=600, n_eval=64, min_words=4, max_words=16)
    cfg = RunConfig.from_dict({
        "run_dir": str(root_dir / "run"),
        "model": {"path": str(model)},
        "data": {"train": str(data["train"]), "eval": str(data["eval"]), "max_length": 96},
        "policy": {"actors": 2, "cpus": 1, "zero_stage": 2},
        "reference": {"actors": 1, "cpus": 1},
        "optim": {"lr": 2e-3, "warmup_steps": 3, "schedule": "cosine"},
        "train": {"batch_size": 16, "micro_batch_size": 8, "max_steps": args.steps},
        "eval": {"reward_fn": "orchestrator.synthetic:reward", "num_prompts": 32},
        "checkpoint": {"resume": "never"},
        "cluster": {"num_cpus": 3},
    })
    result = train(cfg)
    logging.getLogger("example").info(
        "accuracy %.2f -> %.2f, sampled reward %.3f -> %.3f; model in %s",
        result.before["eval/accuracy"], result.after["eval/accuracy"],
        result.before["eval/reward"], result.after["eval/reward"], result.model_dir)


if __name__ == "__main__":
    main()
