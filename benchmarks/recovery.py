"""Recovery in place, timed: each role of a PPO run killed once (``kill -9``), and how long the
run takes to get going again, next to what starting that role from nothing costs.

Builds (or reuses) a ``--size`` Llama and the synthetic task in ``--out``, a reward model (the
same Llama as a one-output sequence classifier; its scores mean nothing, its start-up and
forward cost are those of a real one), then, in one embedded local Ray:

1. Cold starts, each role alone, one after another: its placement group and replicas started
   and ready (rollout: the engine up, first ``--backend``; reward and reference: model loaded;
   policy and critic: the torch.distributed world joined and the DeepSpeed engine built). For
   the trainers also a checkpoint save and the load of it (DeepSpeed state and RNG), the part
   of a trainer recovery a cold start lacks.
2. One PPO run (policy 2 ranks ZeRO-2, critic, reference, reward model, rollout engine; a
   checkpoint after every step) with ``fault.inject`` killing a replica of each role at a
   different step: ``rollout@3,reward@5,reference@7,policy:1@9,critic@11`` by default. From
   the run's metrics, per role: ``recovery`` (the driver's replacement: new group, and for an
   engine its weight sync; for a trainer the rebuilt world and the checkpoint loaded), and
   ``kill -> next step`` (from the kill to the end of the next completed step: detecting the
   death, recovering, and taking the step again), next to the median step of the run.

Targets (issue 14): engine and reward recovery within 1.5x their cold start; trainer recovery
within its cold start (world set-up) plus the checkpoint load, plus 20%.

Run from the repository root (about 4 minutes on 2 cores with vLLM)::

    .venv/bin/python benchmarks/recovery.py
    .venv/bin/python benchmarks/recovery.py --backend hf --steps 12
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench_env import REPO, setup_logging  # noqa: F401  (sets the environment first)

log = logging.getLogger("recovery")

INJECT = "rollout@3,reward@5,reference@7,policy:1@9,critic@11"
ORDER = ("rollout", "reward", "reference", "policy", "critic")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench-recovery", help="work dir (model, data, runs)")
    p.add_argument("--size", default="tiny", help="model size of orchestrator.tiny_model")
    p.add_argument("--backend", default="vllm", choices=("vllm", "hf"), help="rollout engine")
    p.add_argument("--steps", type=int, default=13, help="PPO steps (the last kill is at 11)")
    p.add_argument("--inject", default=INJECT, help="fault.inject of the run")
    p.add_argument("--json", default=None, help="also write the figures here")
    return p.parse_args(argv)


def prepare(args) -> tuple[Path, dict, Path]:
    """Model, data and a reward-model dir under --out (reused when present)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from orchestrator import synthetic
    from orchestrator.tiny_model import build_model

    out = Path(args.out)
    model_dir = out / f"model-{args.size}"
    if not (model_dir / "config.json").is_file():
        build_model(model_dir, args.size)
    rm_dir = out / f"rm-{args.size}"
    if not (rm_dir / "config.json").is_file():
        rm = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
        tok = AutoTokenizer.from_pretrained(model_dir)
        rm.config.pad_token_id = tok.pad_token_id
        rm.save_pretrained(rm_dir)
        tok.save_pretrained(rm_dir)
    paths = synthetic.write_dataset(out / "data", n_train=512, n_eval=16, seed=0)
    return model_dir, paths, rm_dir


def config(args, model_dir: Path, paths: dict, rm_dir: Path, inject: str | None):
    from orchestrator import RunConfig
    run_dir = Path(args.out) / ("run-killed" if inject else "run-cold")
    shutil.rmtree(run_dir, ignore_errors=True)
    return RunConfig.from_dict({
        "algorithm": "ppo", "run_dir": str(run_dir),
        "model": {"path": str(model_dir)},
        "data": {"train": str(paths["train"]), "max_length": 128},
        "policy": {"actors": 2, "cpus": 0.5, "zero_stage": 2},
        "critic": {"actors": 1, "cpus": 0.5, "zero_stage": 0, "lr": 1e-3},
        "reference": {"actors": 1, "cpus": 0.5},
        "reward": {"actors": 1, "cpus": 0.5, "kind": "model", "model_path": str(rm_dir)},
        "rollout": {"actors": 1, "cpus": 1, "max_model_len": 256, "backend": args.backend,
                    "kv_cache_gib": 0.25},
        "rl": {"prompts_per_step": 8, "group_size": 2, "max_new_tokens": 16},
        "optim": {"lr": 1e-3},
        "train": {"batch_size": 16, "micro_batch_size": 8, "max_steps": args.steps},
        "checkpoint": {"every": 1, "keep": 2},
        "fault": {"inject": inject, "max_restarts": 1},
        "cluster": {"num_cpus": 4},
        "log": {"progress_bar": False, "trackers": []},
    })


def cold_starts(cfg) -> dict[str, dict]:
    """Seconds to start each role alone (placement, replicas, ready); for the trainers also a
    checkpoint's save and load."""
    import ray

    from actors.critic import Critic
    from actors.policy_trainer import PolicyTrainer
    from actors.reference import Reference
    from actors.reward import RewardScorer
    from orchestrator.roles import (reward_settings, setup_trainers, start_group, start_rollout,
                                    stop_group)

    out, timeout = {}, cfg.cluster.placement_timeout_s
    starts = {
        "rollout": lambda: start_rollout(cfg.model, cfg.rollout, timeout, cfg.cluster),
        "reward": lambda: start_group("reward", RewardScorer, cfg.reward, timeout,
                                      (reward_settings(cfg),)),
        "reference": lambda: start_group("reference", Reference, cfg.reference, timeout, (cfg,)),
        "policy": lambda: start_group("policy", PolicyTrainer, cfg.policy, timeout, (cfg,)),
        "critic": lambda: start_group("critic", Critic, cfg.critic, timeout, (cfg,)),
    }
    for role in ORDER:
        t0 = time.perf_counter()
        group = starts[role]()
        if role in ("policy", "critic"):
            setup_trainers(group)
        elif role != "rollout":
            ray.get([a.ready.remote() for a in group.actors])
        out[role] = {"cold_s": time.perf_counter() - t0}
        if role in ("policy", "critic"):
            ckpt = Path(cfg.run_dir) / f"cold-{role}"
            t0 = time.perf_counter()
            group.run("save", str(ckpt), None)
            out[role]["save_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            group.run("load", str(ckpt), None)
            out[role]["load_s"] = time.perf_counter() - t0
        stop_group(group)
        log.info("cold start %s: %s", role, {k: round(v, 2) for k, v in out[role].items()})
    return out


def killed_run(cfg) -> dict:
    """Train with the injected kills; per role the recovery figures from metrics.jsonl."""
    from orchestrator import train

    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text()
            .splitlines() if line.strip()]
    steps = sorted((r for r in rows if "timing/step" in r), key=lambda r: r["step"])
    plain = [r["timing/step"] for r in steps if "recovery" not in r and r["step"] > 1]
    out = {"wall_s": wall, "median_step_s": statistics.median(plain), "roles": {}}
    for row in steps:
        for rec in row.get("recovery", []):
            out["roles"][rec["role"]] = {
                "recovery_s": rec["seconds"],
                "to_next_step_s": row["time"] - rec["killed_at"] if "killed_at" in rec else None,
                "killed_at_step": rec["step"], "next_step": row["step"],
                "rebuild_s": rec.get("rebuild_seconds"), "load_s": rec.get("load_seconds")}
    return out


def report(args, cold: dict, run: dict) -> str:
    lines = [f"## Recovery in place, PPO ({args.backend} engine, {args.size} model), "
             f"kills {args.inject}", "",
             "| role | cold start s | recovery s | kill -> next step s | recovery / target | "
             "target |", "|---|---:|---:|---:|---:|---|"]
    for role in ORDER:
        c, r = cold.get(role), run["roles"].get(role)
        if c is None or r is None:
            lines.append(f"| {role} | {c and round(c['cold_s'], 2)} | not recovered | | | |")
            continue
        if role in ("policy", "critic"):
            target = 1.2 * (c["cold_s"] + c["load_s"])
            what = f"1.2 x (cold {c['cold_s']:.2f} + load {c['load_s']:.2f})"
        elif role in ("rollout", "reward"):
            target, what = 1.5 * c["cold_s"], "1.5 x cold start"
        else:
            target, what = None, "none set"
        ratio = f"{r['recovery_s'] / target:.2f}" if target else ""
        nxt = "" if r["to_next_step_s"] is None else f"{r['to_next_step_s']:.2f}"
        lines.append(f"| {role} | {c['cold_s']:.2f} | {r['recovery_s']:.2f} | {nxt} | {ratio} | "
                     f"{what} |")
    lines += ["", f"Median step of the run (steps without a recovery): {run['median_step_s']:.2f} "
              f"s; train() {run['wall_s']:.1f} s for {args.steps} steps with a checkpoint after "
              "each. recovery: the driver replacing the role (trainers: world rebuilt "
              "+ newest checkpoint loaded; engines: started + weights synced); kill -> next step "
              "adds detecting the death and taking the step again (trainers: the step after the "
              "checkpoint)."]
    for role in ("policy", "critic"):
        r = run["roles"].get(role)
        if r and r.get("rebuild_s") is not None:
            lines.append(f"{role}: rebuild {r['rebuild_s']:.2f} s + checkpoint load "
                         f"{r['load_s']:.2f} s (killed at step {r['killed_at_step']}, next "
                         f"completed step {r['next_step']}).")
    return "\n".join(lines)


def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    model_dir, paths, rm_dir = prepare(args)
    from orchestrator.roles import connect
    cold_cfg = config(args, model_dir, paths, rm_dir, None)
    connect(cold_cfg.cluster)
    Path(cold_cfg.run_dir).mkdir(parents=True, exist_ok=True)
    cold = cold_starts(cold_cfg)
    run = killed_run(config(args, model_dir, paths, rm_dir, args.inject))
    text = report(args, cold, run)
    sys.stdout.write(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"cold": cold, "run": run}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
