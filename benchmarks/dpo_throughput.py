"""DPO training throughput: rayalign vs. TRL's DPOTrainer, same model, data and batch, one run.

Builds a "small" Llama (~2.9M parameters) and a synthetic preference set in ``--out``, then
trains DPO twice, one after the other in this process:

* rayalign: ``orchestrator.train`` (the public ``train``) with an embedded local Ray, the
  policy under DeepSpeed (ZeRO ``--zero-stage``) using the machine's 2 cores, reference
  log-probs precomputed once before step 1, sequences packed.
* TRL: ``trl.DPOTrainer`` on CPU with 2 torch threads, reference log-probs computed per batch
  by a reference copy of the model (TRL's default), sequences padded (TRL's default).

Both see the same pairs (``steps * batch_size`` rows, none repeated), the same chat template,
sigmoid DPO loss, beta 0.1, lr 5e-4, float32, no gradient checkpointing, no evaluation, no
checkpoints during training. The first ``--warmup-steps`` steps are left out of the timing on
both sides.

Throughput (pairs/s):

* rayalign steady state: pairs of the timed steps / the sum of their ``timing/step`` from
  ``metrics.jsonl`` (driver wall time per step: batch assembly, Ray calls, forward/backward
  and optimizer step in the policy actor).
* rayalign end-to-end: all pairs / (all step times + the one-time reference precompute,
  read from the "reference log-probs for N pairs in X s" log line). Ray and actor start-up
  are not counted (nor are TRL's model loading and dataset tokenization).
* TRL: pairs of the timed steps / the time from ``on_step_begin`` to ``on_step_end`` summed
  over those steps (a ``TrainerCallback``); the figure from ``on_step_end`` to the next
  ``on_step_end`` (which also covers the data loader and collation) is printed as well.

Run from the repository root::

    .venv/bin/python benchmarks/dpo_throughput.py               # 40 steps, 5 warm-up
    .venv/bin/python benchmarks/dpo_throughput.py --steps 12 --warmup-steps 2

The first rayalign start on a machine may JIT-build a DeepSpeed op (about a minute, cached
afterwards); it happens during actor set-up, outside the timed steps.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench_env import REPO, setup_logging  # noqa: E402,F401  (sets the environment first)

log = logging.getLogger("dpo_throughput")

CORES = 2            # the benchmark machine's cores; both systems get all of them
MIN_WORDS, MAX_WORDS = 8, 60
LR, BETA = 5e-4, 0.1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per system")
    p.add_argument("--warmup-steps", type=int, default=5,
                   help="first steps left out of the timing on both sides")
    p.add_argument("--batch-size", type=int, default=8, help="preference pairs per optimizer step")
    p.add_argument("--max-length", type=int, default=256, help="longest prompt+response in tokens")
    p.add_argument("--out", default="runs/bench/dpo", help="work dir: model, data, run dirs, results")
    p.add_argument("--rayalign-actors", type=int, default=1,
                   help="policy replicas for rayalign (they share the machine's cores)")
    p.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3),
                   help="DeepSpeed ZeRO stage for rayalign's policy")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be at least 1")
    if not 0 <= args.warmup_steps < args.steps:
        p.error("--warmup-steps must be in [0, --steps)")
    if args.rayalign_actors < 1:
        p.error("--rayalign-actors must be at least 1")
    return args


# ---- model and data ------------------------------------------------------------------------
def prepare(args) -> tuple[Path, Path, list[dict], int]:
    """Model dir, train file with exactly steps*batch_size usable pairs, those rows, #params."""
    from transformers import AutoTokenizer

    from orchestrator import synthetic
    from orchestrator.data import load_preferences
    from orchestrator.tiny_model import build_model

    out = Path(args.out)
    model_dir = build_model(out / "model", "small")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    need = args.steps * args.batch_size
    # a little spare, in case a row is longer than --max-length (rayalign would refuse it, TRL
    # would truncate it): such rows are dropped for both systems
    paths = synthetic.write_dataset(out / "data", n_train=need + need // 4 + 16, n_eval=0, seed=0,
                                    min_words=MIN_WORDS, max_words=MAX_WORDS)
    kept, report = load_preferences(paths["train"], tokenizer, args.max_length, on_bad_row="skip")
    if len(kept) < need:
        raise SystemExit(f"only {len(kept)} of the generated pairs fit --max-length "
                         f"{args.max_length} ({report.summary()}); {need} are needed: raise "
                         f"--max-length or lower --steps/--batch-size")
    keep_rows = {ex.row for ex in kept[:need]}
    rows = []
    with open(paths["train"]) as fh:
        for i, line in enumerate(fh, 1):
            if i in keep_rows and line.strip():
                row = json.loads(line)
                rows.append({k: row[k] for k in ("prompt", "chosen", "rejected")})
    train_path = out / "data" / "bench_train.jsonl"
    train_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lengths = [len(ex.prompt_ids) + len(ex.chosen_ids) + len(ex.prompt_ids) + len(ex.rejected_ids)
               for ex in kept[:need]]
    longest = max(len(ex.prompt_ids) + max(len(ex.chosen_ids), len(ex.rejected_ids))
                  for ex in kept[:need])
    log.info("data: %d pairs (%s), %.1f tokens per pair on average (prompt counted twice), "
             "longest sequence %d tokens", len(rows), report.summary(),
             sum(lengths) / len(lengths), longest)

    from transformers import AutoConfig, AutoModelForCausalLM
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(model_dir)).parameters())
    return model_dir, train_path, rows, n_params


# ---- rayalign --------------------------------------------------------------------------------
class _PrecomputeCapture(logging.Handler):
    """Picks the reference precompute time out of dpo_loop's log line."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds: float | None = None
        self.pairs: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("reference log-probs for") and record.args:
            self.pairs, self.seconds = int(record.args[0]), float(record.args[1])


def run_rayalign(args, model_dir: Path, train_path: Path) -> dict:
    from orchestrator import RunConfig, train

    n = args.rayalign_actors
    run_dir = Path(args.out) / "rayalign"
    shutil.rmtree(run_dir, ignore_errors=True)   # a fresh run: no resume, no old metrics lines
    policy_cpus = CORES / n
    cfg = RunConfig.from_dict({
        "algorithm": "dpo",
        "run_dir": str(run_dir),
        "model": {"path": str(model_dir), "dtype": "float32", "attn_implementation": "sdpa"},
        "data": {"train": str(train_path), "eval": None, "max_length": args.max_length},
        "policy": {"actors": n, "cpus": policy_cpus, "zero_stage": args.zero_stage,
                   "gradient_checkpointing": False},
        # the reference only runs before step 1 (the policy waits meanwhile), so it may use
        # both cores too; it is stopped once its log-probs are in
        "reference": {"actors": 1, "cpus": CORES, "precompute": True},
        "dpo": {"loss": "sigmoid", "beta": BETA},
        "optim": {"lr": LR, "warmup_steps": 0, "schedule": "constant"},
        "train": {"batch_size": args.batch_size, "micro_batch_size": args.batch_size,
                  "max_steps": args.steps, "seed": 0, "pack": True},
        "eval": {"reward_fn": None},
        "checkpoint": {"every": 0, "resume": "never"},
        "cluster": {"num_cpus": policy_cpus * n + CORES},   # logical CPUs: both roles fit
        "log": {"progress_bar": False, "tensorboard": False},
    })
    capture = _PrecomputeCapture()
    loop_log = logging.getLogger("orchestrator.dpo_loop")
    loop_log.addHandler(capture)
    log.info("rayalign: %d policy actor(s) x %g CPUs, ZeRO-%d, packed, reference precomputed",
             n, policy_cpus, args.zero_stage)
    t0 = time.perf_counter()
    try:
        result = train(cfg)
    finally:
        loop_log.removeHandler(capture)
    wall = time.perf_counter() - t0

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    steps = sorted((r for r in rows if "timing/step" in r), key=lambda r: r["step"])
    if len(steps) != args.steps:
        raise RuntimeError(f"rayalign: expected {args.steps} step rows in metrics.jsonl, "
                           f"found {len(steps)}")
    timed = [r for r in steps if r["step"] > args.warmup_steps]
    timed_s = sum(r["timing/step"] for r in timed)
    all_s = sum(r["timing/step"] for r in steps)
    pairs_all = sum(r["pairs"] for r in steps)
    out = {
        "pairs_per_s": sum(r["pairs"] for r in timed) / timed_s,
        "timed_steps": len(timed), "timed_s": timed_s, "all_steps_s": all_s,
        "precompute_s": capture.seconds, "precompute_pairs": capture.pairs,
        "train_call_s": wall, "final_loss": steps[-1].get("loss"),
        "tokens_per_pair": sum(r["tokens"] for r in steps) / pairs_all,
        "phase_s": {k[len("timing/"):]: sum(r.get(k, 0.0) for r in timed) / len(timed)
                    for k in sorted(timed[0]) if k.startswith("timing/") and k != "timing/step"},
        "median_step_s": statistics.median(r["timing/step"] for r in timed),
        "min_step_s": min(r["timing/step"] for r in timed),
        "step_s": [round(r["timing/step"], 4) for r in steps],
        "load_avg": os.getloadavg(),
    }
    if capture.seconds is not None:
        out["end_to_end_pairs_per_s"] = pairs_all / (all_s + capture.seconds)
    else:
        log.warning("rayalign: the reference precompute log line was not seen; "
                    "no end-to-end figure")
    log.info("rayalign: %.2f pairs/s over steps %d-%d (%.2fs), reference precompute %s, "
             "train() %.1fs in all, %d steps done", out["pairs_per_s"], args.warmup_steps + 1,
             args.steps, timed_s, f"{capture.seconds:.2f}s" if capture.seconds else "?", wall,
             result.steps)
    return out


# ---- TRL -------------------------------------------------------------------------------------
def run_trl(args, model_dir: Path, rows: list[dict]) -> dict:
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    torch.set_num_threads(CORES)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin: dict[int, float] = {}
            self.end: dict[int, float] = {}
            self.start: float | None = None

        def on_train_begin(self, a, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_begin(self, a, state, control, **kw):
            self.begin[state.global_step + 1] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.end[state.global_step] = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    dataset = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    run_dir = Path(args.out) / "trl"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = DPOConfig(
        output_dir=str(run_dir),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_length=args.max_length,
        learning_rate=LR,
        beta=BETA,
        loss_type=["sigmoid"],
        max_steps=args.steps,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        logging_steps=10**6,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        # TRL's own defaults are bf16=True (autocast) and gradient_checkpointing=True; rayalign
        # trains in float32 without checkpointing, so match that here
        bf16=False,
        gradient_checkpointing=False,
    )
    timer = StepTimer()
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[timer])
    # would TRL truncate anything? (its collator cuts prompt+response at max_length)
    ds = trainer.train_dataset
    seq = [len(p) + max(len(c), len(r))
           for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    truncated = sum(s > args.max_length for s in seq)
    defaults = {k: getattr(config, k) for k in (
        "precompute_ref_log_probs", "padding_free", "pad_to_multiple_of", "truncation_mode",
        "optim", "lr_scheduler_type", "max_grad_norm", "disable_dropout")}
    log.info("TRL %s: %d rows after its preprocessing, %d would be truncated at max_length %d "
             "(longest %d tokens); ref_model %s; %s", trl.__version__, len(ds), truncated,
             args.max_length, max(seq), "separate copy" if trainer.ref_model is not None else "none",
             ", ".join(f"{k}={v}" for k, v in defaults.items()))
    t0 = time.perf_counter()
    train_out = trainer.train()
    wall = time.perf_counter() - t0

    done = sorted(timer.end)
    if len(done) != args.steps:
        raise RuntimeError(f"TRL: expected {args.steps} steps, saw {len(done)}")
    timed = [s for s in done if s > args.warmup_steps]
    timed_s = sum(timer.end[s] - timer.begin[s] for s in timed)
    # end-to-end per step, data loader included: previous step end (or train begin) to this end
    prev = {s: timer.end.get(s - 1, timer.start) for s in done}
    interval_s = sum(timer.end[s] - prev[s] for s in timed)
    all_interval_s = sum(timer.end[s] - prev[s] for s in done)
    out = {
        "pairs_per_s": args.batch_size * len(timed) / timed_s,
        "pairs_per_s_with_data": args.batch_size * len(timed) / interval_s,
        "end_to_end_pairs_per_s": args.batch_size * len(done) / all_interval_s,
        "timed_steps": len(timed), "timed_s": timed_s, "train_call_s": wall,
        "truncated_rows": truncated, "rows": len(ds),
        "median_step_s": statistics.median(timer.end[s] - timer.begin[s] for s in timed),
        "min_step_s": min(timer.end[s] - timer.begin[s] for s in timed),
        "step_s": [round(timer.end[s] - timer.begin[s], 4) for s in done],
        "load_avg": os.getloadavg(),
        "final_loss": getattr(train_out, "training_loss", None),
        "defaults": {k: str(v) for k, v in defaults.items()},
    }
    log.info("TRL: %.2f pairs/s over steps %d-%d (%.2fs), %.2f with data loading; "
             "train() %.1fs", out["pairs_per_s"], args.warmup_steps + 1, args.steps, timed_s,
             out["pairs_per_s_with_data"], wall)
    return out


# ---- report ----------------------------------------------------------------------------------
def report(args, n_params: int, ray_res: dict, trl_res: dict) -> str:
    import torch
    import transformers
    import trl

    ratio = ray_res["pairs_per_s"] / trl_res["pairs_per_s"]
    e2e = ray_res.get("end_to_end_pairs_per_s")
    pre = ray_res["precompute_s"]
    lines = [
        "",
        f"## DPO training throughput, steps {args.warmup_steps + 1}-{args.steps} "
        f"(first {args.warmup_steps} not timed)",
        "",
        "| system | pairs/s |",
        "|---|---:|",
        f"| rayalign ({args.rayalign_actors} actor(s), ZeRO-{args.zero_stage}, packed, "
        f"reference precomputed) | {ray_res['pairs_per_s']:.2f} |",
        f"| TRL DPOTrainer {trl.__version__} (padded, reference per batch) "
        f"| {trl_res['pairs_per_s']:.2f} |",
        "",
        f"**ratio rayalign / TRL: {ratio:.2f}x**",
        "",
        "Also measured:",
        "",
        "| figure | pairs/s |",
        "|---|---:|",
        f"| rayalign end-to-end: all {args.steps} steps + reference precompute "
        f"({pre:.2f} s) | {e2e:.2f} |" if e2e is not None and pre is not None else
        "| rayalign end-to-end | n/a (precompute time not captured) |",
        f"| TRL, all {args.steps} steps incl. data loading | "
        f"{trl_res['end_to_end_pairs_per_s']:.2f} |",
        f"| TRL, timed steps incl. data loading (step end to step end) | "
        f"{trl_res['pairs_per_s_with_data']:.2f} |",
        f"| rayalign, batch size / median timed step ({ray_res['median_step_s']:.3f} s) | "
        f"{args.batch_size / ray_res['median_step_s']:.2f} |",
        f"| TRL, batch size / median timed step ({trl_res['median_step_s']:.3f} s) | "
        f"{args.batch_size / trl_res['median_step_s']:.2f} |",
        f"| rayalign, batch size / fastest timed step ({ray_res['min_step_s']:.3f} s) | "
        f"{args.batch_size / ray_res['min_step_s']:.2f} |",
        f"| TRL, batch size / fastest timed step ({trl_res['min_step_s']:.3f} s) | "
        f"{args.batch_size / trl_res['min_step_s']:.2f} |",
    ]
    if e2e is not None:
        lines += ["", f"ratio end-to-end (rayalign incl. precompute / TRL all steps): "
                      f"{e2e / trl_res['end_to_end_pairs_per_s']:.2f}x"]
    phases = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in ray_res["phase_s"].items())
    lines += [
        "",
        "Settings: "
        f"model small Llama, {n_params / 1e6:.2f}M parameters, float32, sdpa; "
        f"batch size {args.batch_size} pairs (1 micro-batch, no accumulation); "
        f"max length {args.max_length} tokens; {args.steps} steps, {args.warmup_steps} warm-up; "
        f"responses {MIN_WORDS}-{MAX_WORDS} words ({ray_res['tokens_per_pair']:.0f} tokens per "
        f"pair on average, rayalign count); each pair used once; sigmoid loss, beta {BETA}, "
        f"lr {LR:g}; torch threads {CORES} (rayalign: policy cpus "
        f"{CORES / args.rayalign_actors:g} per actor; TRL: torch.set_num_threads({CORES})); "
        f"torch {torch.__version__}, transformers {transformers.__version__}.",
        "",
        f"rayalign per timed step: {phases}. TRL rows truncated at max length: "
        f"{trl_res['truncated_rows']} of {trl_res['rows']}. TRL left at its defaults: "
        + ", ".join(f"{k}={v}" for k, v in trl_res["defaults"].items())
        + "; set to match rayalign: bf16=False, gradient_checkpointing=False (TRL defaults: True).",
        "",
        "1-minute load average after each side (2 cores; above 2 means other work shared the "
        f"CPU and the figures are noisy): rayalign {ray_res['load_avg'][0]:.2f}, "
        f"TRL {trl_res['load_avg'][0]:.2f}.",
        "",
        f"Loss: rayalign last step {_fmt(ray_res['final_loss'])}; TRL mean over the run "
        f"{_fmt(trl_res['final_loss'])}.",
    ]
    return "\n".join(lines)


def _fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "n/a"


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    Path(args.out).mkdir(parents=True, exist_ok=True)

    model_dir, train_path, rows, n_params = prepare(args)
    ray_res = run_rayalign(args, model_dir, train_path)
    trl_res = run_trl(args, model_dir, rows)

    table = report(args, n_params, ray_res, trl_res)
    print(table, flush=True)
    results = {"args": vars(args), "model_params": n_params, "rayalign": ray_res, "trl": trl_res,
               "ratio": ray_res["pairs_per_s"] / trl_res["pairs_per_s"]}
    res_path = Path(args.out) / "results.json"
    res_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    log.info("results written to %s", res_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
