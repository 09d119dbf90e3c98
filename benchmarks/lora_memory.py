"""Memory of DPO with LoRA against full fine-tuning, per role, in one run of this script.

Trains the same DPO run (``--size`` Llama from ``rayalign tiny-model``, synthetic pairs, ZeRO
``--zero-stage``, ``--steps`` steps of ``--batch-size`` pairs, reference log-probs computed
every batch so the reference stays in memory while the policy trains) three ways, one after
the other:

* full: every weight trains; a reference actor holds a frozen copy of the model;
* lora: adapters of rank ``--rank`` on every linear layer; the reference actor as above;
* lora + policy_base: adapters, and the reference is the policy's own base weights with the
  adapters off (``reference.from: policy_base``): no reference actor at all.

Prints, per way, each role's peak resident memory (largest replica, MiB; the process's whole
resident set, so Python, torch, DeepSpeed and Ray's own share of a few hundred MiB is in
every figure), their sum, and pairs/s over the steps after the first; then the sum's ratio to
full fine-tuning's.

Run from the repository root::

    .venv/bin/python benchmarks/lora_memory.py --size medium --steps 6
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from bench_env import role_peaks, setup_logging  # (sets the environment first)

log = logging.getLogger("lora_memory")

WAYS = {
    "full": [],
    "lora": ["policy.lora.rank={rank}"],
    "lora + policy_base": ["policy.lora.rank={rank}", "reference.from=policy_base"],
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="medium", choices=("tiny", "small", "medium"))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", default="runs/bench-lora")
    return p.parse_args()


def run(args, model_dir: Path, data: Path, name: str, overrides: list[str]) -> dict:
    from orchestrator import RunConfig, train
    run_dir = Path(args.out) / name.replace(" + ", "-")
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = RunConfig.from_dict({
        "algorithm": "dpo", "run_dir": str(run_dir), "model": {"path": str(model_dir)},
        "data": {"train": str(data), "max_length": 128, "on_bad_row": "skip"},
        "policy": {"actors": 1, "cpus": 2, "zero_stage": args.zero_stage},
        "reference": {"actors": 1, "cpus": 1, "precompute": False},
        "optim": {"lr": 1e-4}, "eval": {"reward_fn": None, "max_pairs": 8},
        "train": {"batch_size": args.batch_size, "micro_batch_size": args.batch_size,
                  "max_steps": args.steps},
        "checkpoint": {"every": 0, "resume": "never"}, "cluster": {"num_cpus": 3},
        "log": {"progress_bar": False, "trackers": []},
    }, [o.format(rank=args.rank) for o in overrides])
    result = train(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "timing/step" in r][1:]
    peaks = role_peaks(result.usage)
    return {"peaks": peaks, "total": sum(m for m in peaks.values() if m),
            "pairs_per_s": len(steps) * args.batch_size / sum(r["timing/step"] for r in steps)}


def main() -> None:
    from orchestrator import synthetic
    from orchestrator.tiny_model import build_model
    args = parse_args()
    setup_logging()
    out = Path(args.out)
    model_dir = build_model(out / f"model-{args.size}", args.size)
    data = synthetic.write_dataset(out / "data", n_train=args.steps * args.batch_size * 2,
                                   n_eval=16, min_words=8, max_words=40)["train"]
    results = {name: run(args, model_dir, data, name, ov) for name, ov in WAYS.items()}
    full = results["full"]["total"]
    lines = [f"DPO, {args.size} model, ZeRO-{args.zero_stage}, LoRA rank {args.rank} on every "
             f"linear layer; peak resident MiB per role (largest replica)",
             f"{'way':<20} {'policy':>8} {'reference':>10} {'sum':>8} {'vs full':>8} "
             f"{'pairs/s':>8}"]
    for name, r in results.items():
        ref = r["peaks"].get("reference")
        lines.append(f"{name:<20} {r['peaks']['policy']:>8.0f} "
                     f"{(f'{ref:.0f}' if ref else '-'):>10} {r['total']:>8.0f} "
                     f"{r['total'] / full:>8.2f} {r['pairs_per_s']:>8.2f}")
    print("\n".join(lines))  # the benchmark's report


if __name__ == "__main__":
    main()
