"""GRPO step time and time to reward: rayalign's RL loop (on-policy and async, on vLLM and on
transformers rollouts) against TRL's GRPOTrainer, one run.

Builds (or reuses) a ``--size`` Llama (``orchestrator.tiny_model.build_model``, "tiny" by
default) and the synthetic task's prompts (``orchestrator.synthetic.write_dataset``; the
``prompt`` column of train.jsonl, ``steps * 8`` rows, so each system sees every prompt once)
in ``--out``, then runs GRPO up to six times, one after the other in this process:

* rayalign, for each rollout backend (``--backends``: ``vllm``, a vLLM engine; ``hf``,
  a transformers model decoded in the rollout actor) on-policy (``rl.async_rollout: false``, the
  default loop) and async (``rl.async_rollout: true``: the engine samples the next step while
  this one scores, trains and syncs): ``orchestrator.train`` with an embedded local Ray, set up
  like ``configs/grpo-tiny.yaml``: 1 policy actor (ZeRO-0; ``--policy-cpus`` torch threads),
  1 reference actor, 1 reward actor (0.5 CPU, ``orchestrator.synthetic:reward``), 1 rollout
  engine (``--rollout-cpus``; vLLM with 0.25 GiB KV cache; max_model_len 256); weights synced
  to the engine after every optimizer step. Policy, rollout and reference get 2 CPUs each
  on-policy, where they take turns on the 2 cores (generate, then score, then train); async,
  where they run at the same time, policy and rollout get 1 each and the reference 0.5.
* TRL: ``trl.GRPOTrainer`` on CPU in this process with 2 torch threads, generation with
  Hugging Face ``generate`` (no vLLM), the reference model a separate copy (beta > 0); once
  before rayalign's runs and once after, and the faster of the two is what rayalign is
  compared with.

All: 8 prompts x 8 completions (64 samples) per optimizer step, at most 16 new tokens,
temperature 1, no top-k/top-p cut, the same reward (``orchestrator.synthetic.reward`` on the
decoded completion), the same chat template, group-normalised advantages (mean and std),
ratio clip 0.2, KL to the reference as a loss term with coefficient 0.01 (k3), lr 2e-3
constant, grad clip 1.0, float32, no gradient checkpointing, 2 micro-batches of 32 per step
(one optimizer step per generation batch), one pass over each batch. Attention: each
system's own way of laying out a micro-batch; rayalign's default ``varlen`` (one row without
padding, each group's prompt once for its 8 samples), TRL's padded rows under ``sdpa``.

Throughput, with the first ``--warmup-steps`` steps left out on every side:

* rayalign: ``timing/*`` of each step row of ``run_dir/metrics.jsonl`` (driver wall time):
  ``generate`` (waiting for the rollout engine; async: for the batch started a step earlier),
  ``score`` (reward scoring with the reference log-probs computed at the same time), ``train``
  (policy update), ``sync`` (weights to the engine), ``other`` (advantages and batch assembly
  on the driver) and ``step`` (all of it). Orchestration = step - (generate + score + train +
  sync): the driver's own work (``other``, sampling prompts, building the metrics row) and
  whatever the Ray calls add around the work the actors time; target: at most 10% of step time.
* TRL: ``on_step_begin`` to ``on_step_end`` of a ``TrainerCallback`` (generation, reward,
  reference log-probs, forward/backward, optimizer step).

samples/s = 64 / median step time.

Time to reward, every step counted: the sum of step times until the training reward (mean
reward of a step's 64 samples), averaged over 3 consecutive steps, first reaches
``--reward-target``. It folds throughput and learning per step into one figure: async steps
are shorter, but learn from samples one update old.

Run from the repository root (about 6 minutes on 2 cores, much of it rayalign's start-ups)::

    .venv/bin/python benchmarks/rl_step.py              # both modes x both backends and TRL
    .venv/bin/python benchmarks/rl_step.py --modes async --backends hf --steps 15
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench_env import REPO, setup_logging  # noqa: E402,F401  (sets the environment first)
from bench_env import memory_line, process_peak_mib, role_peaks

log = logging.getLogger("rl_step")

CORES = 2                        # the benchmark machine's cores; both systems get all of them
PROMPTS_PER_STEP, GROUP_SIZE = 8, 8
SAMPLES_PER_STEP = PROMPTS_PER_STEP * GROUP_SIZE
MICRO_BATCH = 32                 # samples per forward/backward on both sides
MAX_NEW_TOKENS = 16
MEDIUM_NEW_TOKENS = 64
LR, KL_COEF = 2e-3, 0.01
PHASES = ("generate", "score", "train", "sync")   # work; the rest of a step is orchestration
ORCH_TARGET = 0.10
MODES = ("on-policy", "async")
BACKENDS = ("vllm", "hf")       # rollout.backend: vLLM engine, or a transformers model
REWARD_WINDOW = 3                # steps averaged for the time-to-reward threshold


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="tiny", help="tiny_model size (tiny, small, medium, base)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"tokens sampled per completion at most (default {MAX_NEW_TOKENS}; "
                        f"{MEDIUM_NEW_TOKENS} at --size medium)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per system")
    p.add_argument("--warmup-steps", type=int, default=2,
                   help="first steps left out of the timing on both sides")
    p.add_argument("--eval-prompts", type=int, default=16,
                   help="held-out prompts for rayalign's eval/reward before and after")
    p.add_argument("--out", default="runs/bench/rl", help="work dir: model, data, run dirs, results")
    p.add_argument("--skip-trl", action="store_true", help="run rayalign only")
    p.add_argument("--modes", default=",".join(MODES),
                   help="rayalign loops to run, comma-separated: on-policy, async")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="rayalign rollout backends to run, comma-separated: vllm (vLLM engine), "
                        "hf (a transformers model decoded in the rollout actor)")
    p.add_argument("--reward-target", type=float, default=0.5,
                   help=f"training reward ({REWARD_WINDOW}-step mean) whose first crossing "
                        "times each system")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override of rayalign's config, e.g. rollout.enforce_eager=false")
    p.add_argument("--policy-cpus", type=int, default=None,
                   help="rayalign policy CPUs (torch threads); default 2 on-policy (the engine "
                        "and the trainer take turns, so each may use both cores), 1 async (they "
                        "run at the same time)")
    p.add_argument("--rollout-cpus", type=int, default=None,
                   help="rayalign rollout CPUs (the hf backend's torch threads; vLLM binds its "
                        "own); default as --policy-cpus")
    args = p.parse_args(argv)
    for flag, allowed in (("modes", MODES), ("backends", BACKENDS)):
        chosen = [x.strip() for x in getattr(args, flag).split(",") if x.strip()]
        if not chosen or any(x not in allowed for x in chosen):
            p.error(f"--{flag}: a comma-separated subset of {', '.join(allowed)}")
        setattr(args, flag, chosen)
    if args.max_new_tokens is None:
        args.max_new_tokens = MEDIUM_NEW_TOKENS if args.size == "medium" else MAX_NEW_TOKENS
    if args.steps < 1 or args.eval_prompts < 1:
        p.error("--steps and --eval-prompts must be at least 1")
    if not 0 <= args.warmup_steps < args.steps:
        p.error("--warmup-steps must be in [0, --steps)")
    return args


# ---- model and data ------------------------------------------------------------------------
def prepare(args) -> tuple[Path, dict[str, Path], list[str], int]:
    """Model dir (built once per size), data files, the train prompts, #params."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from orchestrator import synthetic
    from orchestrator.tiny_model import build_model

    out = Path(args.out)
    model_dir = out / f"model-{args.size}"
    if (model_dir / "config.json").is_file() and (model_dir / "tokenizer_config.json").is_file():
        log.info("reusing the %s model in %s", args.size, model_dir)
    else:
        build_model(model_dir, args.size)
    paths = synthetic.write_dataset(out / "data", n_train=args.steps * PROMPTS_PER_STEP,
                                    n_eval=args.eval_prompts, seed=0)
    prompts = [json.loads(line)["prompt"] for line in paths["train"].read_text().splitlines()
               if line.strip()]
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(model_dir)).parameters())
    log.info("model %s (%.2fM parameters), %d train prompts (%d distinct), %d eval prompts",
             args.size, n_params / 1e6, len(prompts), len(set(prompts)), args.eval_prompts)
    return model_dir, paths, prompts, n_params


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


def time_to_reward(step_s: list[float], rewards: list, target: float) -> dict:
    """Seconds (sum of step times) and steps until the REWARD_WINDOW-step mean of the
    training reward first reaches target; None for both when it never does."""
    elapsed = 0.0
    for i, s in enumerate(step_s):
        elapsed += s
        window = rewards[max(0, i + 1 - REWARD_WINDOW):i + 1]
        if (i + 1 >= REWARD_WINDOW and all(isinstance(r, (int, float)) for r in window)
                and statistics.mean(window) >= target):
            return {"seconds": elapsed, "steps": i + 1}
    return {"seconds": None, "steps": None}


# ---- rayalign --------------------------------------------------------------------------------
def run_rayalign(args, model_dir: Path, paths: dict[str, Path], mode: str, backend: str) -> dict:
    from orchestrator import RunConfig, train

    run_dir = Path(args.out) / f"rayalign-{mode}-{backend}"
    shutil.rmtree(run_dir, ignore_errors=True)   # a fresh run: no old metrics lines
    turn = 1 if mode == "async" else 2  # async: engine and trainer run at once; else in turns
    policy_cpus, rollout_cpus = args.policy_cpus or turn, args.rollout_cpus or turn
    # on-policy the reference's log-probs are all that runs while the batch is scored, so it
    # takes both cores too; async it runs beside the trainer and the engine
    ref_cpus = 0.5 if mode == "async" else turn
    num_cpus = math.ceil(0.5 + ref_cpus + policy_cpus + rollout_cpus)  # the reward takes 0.5
    cfg = RunConfig.from_dict({
        "algorithm": "grpo",
        "run_dir": str(run_dir),
        # rayalign's default attention: each micro-batch in one row, a group's prompt laid out
        # once for its samples (actors/logprobs.py one_row); TRL pads them (sdpa)
        "model": {"path": str(model_dir), "dtype": "float32", "attn_implementation": "varlen"},
        "data": {"train": str(paths["train"]), "eval": str(paths["eval"]), "max_length": 128},
        "policy": {"actors": 1, "cpus": policy_cpus, "zero_stage": 0, "gradient_checkpointing": False},
        "reference": {"actors": 1, "cpus": ref_cpus},
        "reward": {"actors": 1, "cpus": 0.5, "kind": "function",
                   "function": "orchestrator.synthetic:reward"},
        "rollout": {"actors": 1, "cpus": rollout_cpus, "kv_cache_gib": 0.25, "max_model_len": 256,
                    "backend": backend},
        "rl": {"prompts_per_step": PROMPTS_PER_STEP, "group_size": GROUP_SIZE,
               "max_new_tokens": args.max_new_tokens, "kl_coef": KL_COEF,
               "async_rollout": mode == "async"},
        "optim": {"lr": LR, "warmup_steps": 0, "schedule": "constant", "grad_clip": 1.0},
        "train": {"batch_size": SAMPLES_PER_STEP, "micro_batch_size": MICRO_BATCH,
                  "max_steps": args.steps, "seed": 0},
        "eval": {"num_prompts": args.eval_prompts},
        "cluster": {"num_cpus": num_cpus},
        "log": {"progress_bar": False, "trackers": []},
    }, args.set)
    log.info("rayalign %s, %s: GRPO, %d steps; policy 1 x %d CPU (ZeRO-0), reference %g, reward "
             "0.5, rollout 1 %s engine x %d CPU; embedded Ray with %d logical CPUs", mode, backend,
             args.steps, policy_cpus, ref_cpus, backend, rollout_cpus, num_cpus)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    steps = sorted((r for r in rows if "timing/step" in r), key=lambda r: r["step"])
    if len(steps) != args.steps:
        raise RuntimeError(f"rayalign: expected {args.steps} step rows in metrics.jsonl, "
                           f"found {len(steps)}")
    timed = [r for r in steps if r["step"] > args.warmup_steps]
    step_s = [r["timing/step"] for r in timed]
    orch_s = [r["timing/step"] - sum(r.get(f"timing/{k}", 0.0) for k in PHASES) for r in timed]
    phase_keys = [k[len("timing/"):] for k in timed[0] if k.startswith("timing/") and k != "timing/step"]
    phases = {k: {"median_s": _med([r.get(f"timing/{k}", 0.0) for r in timed]),
                  "mean_s": statistics.mean(r.get(f"timing/{k}", 0.0) for r in timed)}
              for k in phase_keys}
    phases["orchestration"] = {"median_s": _med(orch_s), "mean_s": statistics.mean(orch_s)}
    phases["step"] = {"median_s": _med(step_s), "mean_s": statistics.mean(step_s)}
    all_s = [r["timing/step"] for r in steps]
    rewards = [r.get("reward/mean", float("nan")) for r in steps]
    out = {
        "mode": mode, "backend": backend, "policy_cpus": policy_cpus,
        "rollout_cpus": rollout_cpus,
        "median_step_s": _med(step_s),
        "samples_per_s": SAMPLES_PER_STEP / _med(step_s),
        "samples_per_s_mean": SAMPLES_PER_STEP * len(step_s) / sum(step_s),
        "phases": phases,
        # share of the timed steps' total time; and the median of the per-step shares
        "orchestration_share": sum(orch_s) / sum(step_s),
        "orchestration_share_median": _med([o / s for o, s in zip(orch_s, step_s)]),
        "step_s": [round(s, 4) for s in all_s],
        "reward_per_step": [round(r, 4) for r in rewards],
        "length_per_step": [round(r.get("response/length", float("nan")), 2) for r in steps],
        "to_reward": time_to_reward(all_s, rewards, args.reward_target),
        "eval_reward_before": result.before.get("eval/reward"),
        "eval_reward_after": result.after.get("eval/reward"),
        "train_call_s": wall, "load_avg_before": load_before, "load_avg": load_after,
        "peak_rss_mib": role_peaks(result.usage),
    }
    log.info("rayalign %s, %s: median step %.3fs (%.1f samples/s), orchestration %.1f%% of step "
             "time; train() %.1fs in all", mode, backend, out["median_step_s"], out["samples_per_s"],
             100 * out["orchestration_share"], wall)
    return out


# ---- TRL -------------------------------------------------------------------------------------
def synthetic_reward(prompts, completions, **kwargs) -> list[float]:
    """orchestrator.synthetic.reward with TRL's reward-function signature (text or chat)."""
    from orchestrator.synthetic import reward

    def text(x):  # a conversational completion is a list of (assistant) messages
        return x if isinstance(x, str) else "".join(m["content"] for m in x)

    return [reward(p if isinstance(p, str) else p[-1]["content"], text(c))
            for p, c in zip(prompts, completions)]


def run_trl(args, model_dir: Path, prompts: list[str]) -> dict:
    import datasets
    import torch
    import trl
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        PrinterCallback,
        TrainerCallback,
    )
    from trl import GRPOConfig, GRPOTrainer

    datasets.disable_progress_bars()
    torch.set_num_threads(CORES)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.trainer = None
            self.begin: dict[int, float] = {}
            self.end: dict[int, float] = {}
            self.reward: dict[int, float] = {}
            self.length: dict[int, float] = {}

        def on_step_begin(self, a, state, control, **kw):
            self.begin[state.global_step + 1] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.end[state.global_step] = time.perf_counter()
            # GRPOTrainer keeps one entry per generation batch until it logs (logging_steps is
            # larger than the run, so that is at the end); read the newest one
            metrics = getattr(self.trainer, "_metrics", {}).get("train", {})
            if metrics.get("reward"):
                self.reward[state.global_step] = metrics["reward"][-1]
            if metrics.get("completions/mean_length"):
                self.length[state.global_step] = metrics["completions/mean_length"][-1]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p}]}
                                          for p in prompts])
    run_dir = Path(args.out) / "trl"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = GRPOConfig(
        output_dir=str(run_dir),
        # TRL 1.x counts completions: 2 x 32 = one generation batch of 64 = 8 prompts x 8
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=SAMPLES_PER_STEP // MICRO_BATCH,
        num_generations=GROUP_SIZE,
        max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0,
        beta=KL_COEF,
        num_iterations=1,
        epsilon=0.2,
        scale_rewards="group",
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_steps=args.steps,
        use_vllm=False,
        use_cpu=True,
        # TRL's own defaults are bf16=True and gradient_checkpointing=True; rayalign trains in
        # float32 without checkpointing
        bf16=False,
        gradient_checkpointing=False,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=10**6,
        log_completions=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=synthetic_reward, args=config,
                          train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    timer.trainer = trainer
    trainer.remove_callback(PrinterCallback)   # no log dicts on stdout
    settings = {k: getattr(config, k) for k in (
        "generation_batch_size", "steps_per_generation", "loss_type", "scale_rewards",
        "optim", "disable_dropout", "mask_truncated_completions", "shuffle_dataset")}
    log.info("TRL %s: %s; ref_model %s", trl.__version__,
             ", ".join(f"{k}={v}" for k, v in settings.items()),
             "separate copy" if getattr(trainer, "ref_model", None) is not None else "none")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()

    done = sorted(timer.end)
    if len(done) != args.steps:
        raise RuntimeError(f"TRL: expected {args.steps} steps, saw {len(done)}")
    all_s = [timer.end[s] - timer.begin[s] for s in done]
    step_s = [timer.end[s] - timer.begin[s] for s in done if s > args.warmup_steps]
    out = {
        "median_step_s": _med(step_s),
        "mean_step_s": statistics.mean(step_s),
        "samples_per_s": SAMPLES_PER_STEP / _med(step_s),
        "samples_per_s_mean": SAMPLES_PER_STEP * len(step_s) / sum(step_s),
        "step_s": [round(s, 4) for s in all_s],
        "reward_per_step": [round(timer.reward[s], 4) if s in timer.reward else None for s in done],
        "length_per_step": [round(timer.length[s], 2) if s in timer.length else None for s in done],
        "to_reward": time_to_reward(all_s, [timer.reward.get(s) for s in done], args.reward_target),
        "train_call_s": wall, "load_avg_before": load_before, "load_avg": load_after,
        "settings": {k: str(v) for k, v in settings.items()},
        "peak_rss_mib": process_peak_mib(),
    }
    log.info("TRL: median step %.3fs (%.1f samples/s); train() %.1fs", out["median_step_s"],
             out["samples_per_s"], wall)
    return out


# ---- report ----------------------------------------------------------------------------------
def _fmt(x, spec=".3f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "n/a"


def _ends(xs: list, k: int = 3) -> tuple:
    """Mean of the first k and of the last k values (None skipped)."""
    xs = [x for x in xs if isinstance(x, (int, float))]
    if not xs:
        return None, None
    return statistics.mean(xs[:k]), statistics.mean(xs[-k:])


def _secs(t: dict) -> str:
    return f"{t['seconds']:.1f} s (step {t['steps']})" if t["seconds"] is not None else "not reached"


def faster(trl_runs: list[dict]) -> dict | None:
    """The TRL run rayalign is compared with: the one with the shorter median step."""
    return min(trl_runs, key=lambda r: r["median_step_s"]) if trl_runs else None


def report(args, n_params: int, runs: dict[str, dict], trl_runs: list[dict]) -> str:
    import torch
    import transformers
    import trl

    trl_res = faster(trl_runs)

    w = args.warmup_steps
    lines = ["", (f"## GRPO step throughput, steps {w + 1}-{args.steps} (first {w} not timed), "
                 f"{PROMPTS_PER_STEP} prompts x {GROUP_SIZE} completions per step"), "",
             "| system | median step s | samples/s (median) | samples/s (mean) | ratio to TRL "
             "(median; mean) |", "|---|---:|---:|---:|---:|"]
    for mode, res in runs.items():
        ratio = "n/a"
        if trl_res is not None:
            ratio = (f"**{res['samples_per_s'] / trl_res['samples_per_s']:.2f}x**; "
                     f"{res['samples_per_s_mean'] / trl_res['samples_per_s_mean']:.2f}x")
        engine = "vLLM" if res["backend"] == "vllm" else "transformers model"
        lines.append(f"| rayalign {mode} (Ray: {engine} rollout x {res['rollout_cpus']} CPU, "
                     f"policy ZeRO-0 x {res['policy_cpus']} CPU, reference, reward) | "
                     f"{res['median_step_s']:.3f} | "
                     f"{res['samples_per_s']:.1f} | {res['samples_per_s_mean']:.1f} | {ratio} |")
    if trl_res is not None:
        lines.append(f"| TRL GRPOTrainer {trl.__version__} (HF generate, in-process) | "
                     f"{trl_res['median_step_s']:.3f} | {trl_res['samples_per_s']:.1f} | "
                     f"{trl_res['samples_per_s_mean']:.1f} | 1x |")
        both = ", ".join(f"{r['median_step_s']:.3f} s" for r in trl_runs)
        lines += ["", (f"TRL ran before and after rayalign (median steps {both}); its row and "
                       f"every ratio use the faster run. Target: ratio >= 1x.")]

    names = {"score": "score (reward + reference/policy log-probs)",
             "other": "other (driver: advantages, batch; part of orchestration)",
             "orchestration": "**orchestration** = step - (generate+score+train+sync)"}
    first = next(iter(runs.values()))["phases"]
    order = [k for k in PHASES if k in first] + [k for k in first if k not in PHASES
                                                  and k not in ("orchestration", "step")]
    lines += ["", "### rayalign per phase (timed steps; median ms, share of the mean step)", "",
              "| phase | " + " | ".join(runs) + " |", "|---|" + "---:|" * len(runs)]
    for k in order + ["orchestration", "step"]:
        cells = [f"{res['phases'][k]['median_s'] * 1000:.0f} "
                 f"({100 * res['phases'][k]['mean_s'] / res['phases']['step']['mean_s']:.1f}%)"
                 if k in res["phases"] else "n/a" for res in runs.values()]
        lines.append(f"| {names.get(k, k)} | " + " | ".join(cells) + " |")
    for mode, res in runs.items():
        share = res["orchestration_share"]
        lines.append(f"\n**{mode}: orchestration {100 * share:.1f}%** of step time (sum over "
                     f"timed steps; median of per-step shares "
                     f"{100 * res['orchestration_share_median']:.1f}%; target <= "
                     f"{100 * ORCH_TARGET:.0f}%: {'met' if share <= ORCH_TARGET else 'NOT met'}).")

    target = args.reward_target
    lines += ["", "### reward", "",
              f"| system | first 3 steps | last 3 steps | held-out before -> after | time to "
              f"training reward {target:g} | TRL's time / this |", "|---|---:|---:|---:|---:|---:|"]
    trl_t = trl_res["to_reward"]["seconds"] if trl_res is not None else None
    for mode, res in runs.items():
        r0, r1 = _ends(res["reward_per_step"])
        mine = res["to_reward"]["seconds"]
        speed = f"**{trl_t / mine:.2f}x**" if trl_t and mine else "n/a"
        lines.append(f"| rayalign {mode} | {_fmt(r0)} | {_fmt(r1)} | "
                     f"{_fmt(res['eval_reward_before'])} -> {_fmt(res['eval_reward_after'])} | "
                     f"{_secs(res['to_reward'])} | {speed} |")
    if trl_res is not None:
        t0, t1 = _ends(trl_res["reward_per_step"])
        lines.append(f"| TRL | {_fmt(t0)} | {_fmt(t1)} | n/a | {_secs(trl_res['to_reward'])} | 1x |")
    lines += ["", ("Training reward = mean reward of the step's 64 samples (rayalign "
                  "`reward/mean`, TRL's logged `reward`); held-out = rayalign's `eval/reward`, "
                  f"one sample for each of {args.eval_prompts} eval prompts. Time to reward = "
                  f"sum of all step times until the {REWARD_WINDOW}-step mean of the training "
                  f"reward first reaches {target:g} (start-up not counted on either side).")]
    loads = ", ".join(f"rayalign {m} {r['load_avg'][0]:.2f}" for m, r in runs.items())
    if trl_res is not None:
        loads += f", TRL {trl_res['load_avg'][0]:.2f}"
    lines += ["", (f"Settings: model {args.size} Llama, {n_params / 1e6:.2f}M parameters, float32, "
                  f"attention rayalign varlen, TRL sdpa; {args.steps} steps, {w} warm-up; max {args.max_new_tokens} new tokens; "
                  f"lr {LR:g}"
                  f" constant; KL coef {KL_COEF} (k3, in the loss); micro-batch {MICRO_BATCH}; torch "
                  f"{torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}."),
              "", f"1-minute load average after each side (2 cores): {loads}."]
    if trl_res is not None:
        lines += ["", "TRL settings: " + ", ".join(f"{k}={v}" for k, v in trl_res["settings"].items())]
        lines += [""] + [f"{mode}: " + memory_line(res["peak_rss_mib"], trl_runs[0]["peak_rss_mib"])
                         for mode, res in runs.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    Path(args.out).mkdir(parents=True, exist_ok=True)

    model_dir, paths, prompts, n_params = prepare(args)
    # TRL runs before and after rayalign; the ratios use its faster run, so that a slow spell
    # of the machine during one TRL run does not flatter rayalign
    trl_runs = [] if args.skip_trl else [run_trl(args, model_dir, prompts)]
    runs = {f"{mode}, {backend}": run_rayalign(args, model_dir, paths, mode, backend)
            for backend in args.backends for mode in args.modes}
    if not args.skip_trl:
        trl_runs.append(run_trl(args, model_dir, prompts))
    trl_res = faster(trl_runs)

    print(report(args, n_params, runs, trl_runs), flush=True)
    results = {"args": vars(args), "model_params": n_params, "rayalign": runs, "trl": trl_res,
               "trl_runs": trl_runs}
    if trl_res is not None:
        results["ratio"] = {m: r["samples_per_s"] / trl_res["samples_per_s"] for m, r in runs.items()}
    res_path = Path(args.out) / "results.json"
    res_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    log.info("results written to %s", res_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
