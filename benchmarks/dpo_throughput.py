"""DPO training throughput: rayalign vs. TRL's DPOTrainer, same model, data and batch, one run.

Builds a ``--size`` Llama ("small" ~2.9M parameters, or "medium" ~30M) and a synthetic
preference set in ``--out``, then
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

import logging
import shutil
import sys
import time
from pathlib import Path

from bench_env import REPO, setup_logging  # noqa: E402,F401  (sets the environment first)
from bench_env import memory_line, process_peak_mib, role_peaks
from vs_trl import (CORES, LR, alternate, bench_model, fmt, load_line, packing, parse_args,
                    preference_data, rate, rayalign_config, rayalign_figures, rayalign_steps,
                    rounds_tail, spread_rows, step_figures, StepClock, torch_threads, trl_args,
                    versions, write_results)

log = logging.getLogger("dpo_throughput")

BETA = 0.1


# ---- rayalign --------------------------------------------------------------------------------
class _PrecomputeCapture(logging.Handler):
    """Picks the reference precompute time out of the DPO task's log line."""

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
    cfg = RunConfig.from_dict(rayalign_config(
        args, "dpo", model_dir, train_path,
        # the reference only runs before step 1 (the policy waits meanwhile), so it may use
        # both cores too; it is stopped once its log-probs are in
        reference={"actors": 1, "cpus": CORES, "precompute": True},
        dpo={"loss": "sigmoid", "beta": BETA},
        cluster={"num_cpus": 2 * CORES}))   # logical CPUs: both roles fit
    capture = _PrecomputeCapture()
    loop_log = logging.getLogger("orchestrator.offline_tasks")
    loop_log.addHandler(capture)
    log.info("rayalign: %d policy actor(s) x %g CPUs, ZeRO-%d, %s, reference precomputed",
             n, CORES / n, args.zero_stage, packing(args))
    t0 = time.perf_counter()
    try:
        result = train(cfg)
    finally:
        loop_log.removeHandler(capture)
    wall = time.perf_counter() - t0

    steps = rayalign_steps(run_dir, args.steps)
    pairs_all = sum(r["pairs"] for r in steps)
    out = rayalign_figures(steps, args.warmup_steps)
    out.update({
        "pairs_per_s": rate({r["step"]: r["pairs"] for r in steps},
                            {r["step"]: r["timing/step"] for r in steps}, args.warmup_steps),
        "precompute_s": capture.seconds, "precompute_pairs": capture.pairs,
        "train_call_s": wall, "tokens_per_pair": sum(r["tokens"] for r in steps) / pairs_all,
        "peak_rss_mib": role_peaks(result.usage),
    })
    if capture.seconds is not None:
        out["end_to_end_pairs_per_s"] = pairs_all / (out["all_steps_s"] + capture.seconds)
    else:
        log.warning("rayalign: the reference precompute log line was not seen; "
                    "no end-to-end figure")
    log.info("rayalign: %.2f pairs/s over steps %d-%d (%.2fs), reference precompute %s, "
             "train() %.1fs in all, %d steps done", out["pairs_per_s"], args.warmup_steps + 1,
             args.steps, out["timed_s"], f"{capture.seconds:.2f}s" if capture.seconds else "?",
             wall, result.steps)
    return out


# ---- TRL -------------------------------------------------------------------------------------
def run_trl(args, model_dir: Path, rows: list[dict]) -> dict:
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    torch_threads()

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    dataset = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    config = DPOConfig(
        **trl_args(args),
        max_length=args.max_length,
        beta=BETA,
        loss_type=["sigmoid"],
    )
    clock = StepClock()
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[clock.callback()])
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

    seconds, interval = clock.step_seconds(args.steps), clock.interval_seconds()
    pairs = dict.fromkeys(seconds, args.batch_size)
    out = {
        "pairs_per_s": rate(pairs, seconds, args.warmup_steps),
        "pairs_per_s_with_data": rate(pairs, interval, args.warmup_steps),
        "end_to_end_pairs_per_s": rate(pairs, interval, 0),
        **step_figures(seconds, args.warmup_steps), "train_call_s": wall,
        "truncated_rows": truncated, "rows": len(ds), "peak_rss_mib": process_peak_mib(),
        "final_loss": getattr(train_out, "training_loss", None),
        "defaults": {k: str(v) for k, v in defaults.items()},
    }
    log.info("TRL: %.2f pairs/s over steps %d-%d (%.2fs), %.2f with data loading; "
             "train() %.1fs", out["pairs_per_s"], args.warmup_steps + 1, args.steps, out["timed_s"],
             out["pairs_per_s_with_data"], wall)
    return out


# ---- report ----------------------------------------------------------------------------------
def report(args, n_params: int, ray_res: dict, trl_res: dict) -> str:
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
        f"| rayalign ({args.rayalign_actors} actor(s), ZeRO-{args.zero_stage}, {packing(args)}, "
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
        *spread_rows(ray_res, trl_res, args.batch_size, "batch size"),
    ]
    if e2e is not None:
        lines += ["", f"ratio end-to-end (rayalign incl. precompute / TRL all steps): "
                      f"{e2e / trl_res['end_to_end_pairs_per_s']:.2f}x"]
    phases = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in ray_res["phase_s"].items())
    lines += [
        "",
        "Settings: "
        f"model {args.size} Llama, {n_params / 1e6:.2f}M parameters, float32, TRL sdpa, "
        f"rayalign {args.rayalign_attn}; "
        f"batch size {args.batch_size} pairs (1 micro-batch, no accumulation); "
        f"max length {args.max_length} tokens; {args.steps} steps, {args.warmup_steps} warm-up; "
        f"responses {args.min_words}-{args.max_words} words ({ray_res['tokens_per_pair']:.0f} tokens per "
        f"pair on average, rayalign count); each pair used once; sigmoid loss, beta {BETA}, "
        f"lr {LR:g}; torch threads {CORES} (rayalign: policy cpus "
        f"{CORES / args.rayalign_actors:g} per actor; TRL: torch.set_num_threads({CORES})); "
        f"{versions()}.",
        "",
        f"rayalign per timed step: {phases}. TRL rows truncated at max length: "
        f"{trl_res['truncated_rows']} of {trl_res['rows']}. TRL left at its defaults: "
        + ", ".join(f"{k}={v}" for k, v in trl_res["defaults"].items())
        + "; set to match rayalign: bf16=False, gradient_checkpointing=False (TRL defaults: True).",
        "",
        load_line(ray_res, trl_res),
        "",
        memory_line(ray_res["peak_rss_mib"], trl_res["peak_rss_mib"]),
        "",
        f"Loss: rayalign last step {fmt(ray_res['final_loss'])}; TRL mean over the run "
        f"{fmt(trl_res['final_loss'])}.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(__doc__, "runs/bench/dpo", "preference pairs", argv)
    setup_logging()
    Path(args.out).mkdir(parents=True, exist_ok=True)

    model_dir, n_params = bench_model(args)
    train_path, rows, _ = preference_data(args, model_dir)
    ray_res, trl_res, ratios = alternate(args, lambda: run_rayalign(args, model_dir, train_path),
                                         lambda: run_trl(args, model_dir, rows), "pairs_per_s")

    table = report(args, n_params, ray_res, trl_res) + rounds_tail(ratios)
    print(table, flush=True)
    write_results(args, {"model_params": n_params, "rayalign": ray_res, "trl": trl_res,
                         "ratio": ray_res["pairs_per_s"] / trl_res["pairs_per_s"],
                         "round_ratios": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
