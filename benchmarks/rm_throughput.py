"""Reward-model training throughput: rayalign vs. TRL's RewardTrainer, same model, data and
batch, one run.

Builds a ``--size`` Llama ("small" ~2.9M parameters, or "medium" ~30M) and the synthetic
preference pairs of
dpo_throughput.py in ``--out``, then trains a reward model twice, one after the other in this
process, both starting from that causal LM dir loaded as ``AutoModelForSequenceClassification``
with one label (the transformer's weights, a new score head):

* rayalign: ``orchestrator.train`` with ``algorithm: rm`` and an embedded local Ray, the model
  under DeepSpeed (ZeRO ``--zero-stage``) using the machine's 2 cores; chosen and rejected
  sequences packed into one forward.
* TRL: ``trl.RewardTrainer`` on CPU with 2 torch threads, given the model dir (its own model
  init: ``num_labels=1``, float32, sdpa); chosen and rejected right-padded to the longest of
  the batch in one forward (TRL's default).

Both see the same pairs (``steps * batch_size`` rows, none repeated), tokenized to the same ids
(the tokenizer's chat template; checked pair by pair), the Bradley-Terry loss
-log sigmoid(r_chosen - r_rejected) with no margin and no centring, lr 5e-4, float32, no
gradient checkpointing, no evaluation, no checkpoints during training. The first
``--warmup-steps`` steps are left out of the timing.

Throughput (pairs/s):

* rayalign: pairs of the timed steps / the sum of their ``timing/step`` from
  ``metrics.jsonl`` (driver wall time per step: batch assembly, Ray call, forward/backward and
  optimizer step in the trainer actor).
* TRL: pairs of the timed steps / the time from ``on_step_begin`` to ``on_step_end`` summed
  over those steps (a ``TrainerCallback``); step end to step end (data loading included) is
  printed as well.

Tokens per second (prompt counted in both sequences of a pair, padding not counted) are
printed too, counted from the data on both sides.

Run from the repository root::

    .venv/bin/python benchmarks/rm_throughput.py               # 40 steps, 5 warm-up
    .venv/bin/python benchmarks/rm_throughput.py --steps 8 --warmup-steps 2
"""
from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

from bench_env import REPO, setup_logging  # noqa: E402,F401  (sets the environment first)
from vs_trl import (CORES, LR, alternate, bench_model, fmt, laid_out, load_line, packing,
                    parse_args, preference_data, rate, rayalign_config, rayalign_figures,
                    rayalign_steps, rounds_tail, spread_rows, step_figures, StepClock, TokenTally,
                    torch_threads, trl_args, versions, write_results)

log = logging.getLogger("rm_throughput")


def sequences(pair) -> tuple[list[int], list[int]]:
    """A tokenized pair's two whole sequences: prompt + chosen, prompt + rejected."""
    return pair.prompt_ids + pair.chosen_ids, pair.prompt_ids + pair.rejected_ids


# ---- rayalign --------------------------------------------------------------------------------
def run_rayalign(args, model_dir: Path, train_path: Path, pairs: list) -> dict:
    from orchestrator import RunConfig, train

    run_dir = Path(args.out) / "rayalign"
    shutil.rmtree(run_dir, ignore_errors=True)   # a fresh run: no resume, no old metrics lines
    cfg = RunConfig.from_dict(rayalign_config(args, "rm", model_dir, train_path))
    log.info("rayalign: %d trainer actor(s) x %g CPUs, ZeRO-%d, %s", args.rayalign_actors,
             CORES / args.rayalign_actors, args.zero_stage, packing(args))
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0

    steps = rayalign_steps(run_dir, args.steps)
    # the bench file holds the kept pairs in order: file row r is pairs[r - 1]
    lengths = {s["step"]: [len(q) for r in s["batch/rows"] for q in sequences(pairs[r - 1])]
               for s in steps}
    tokens = {s: sum(v) for s, v in lengths.items()}
    if tokens != {r["step"]: r["tokens"] for r in steps}:
        log.warning("rayalign: its own token counts differ from the data's")
    seconds = {r["step"]: r["timing/step"] for r in steps}
    out = rayalign_figures(steps, args.warmup_steps)
    out.update({
        "pairs_per_s": rate({r["step"]: r["pairs"] for r in steps}, seconds, args.warmup_steps),
        "tokens_per_s": rate(tokens, seconds, args.warmup_steps),
        "pairs": sum(r["pairs"] for r in steps), "tokens": sum(tokens.values()),
        "slots": sum(laid_out(v, args.rayalign_attn)[0] for v in lengths.values()),
        "train_call_s": wall,
        "final_accuracy": steps[-1].get("accuracy"),
    })
    log.info("rayalign: %.2f pairs/s over steps %d-%d (%.2fs), train() %.1fs in all, "
             "%d steps done", out["pairs_per_s"], args.warmup_steps + 1, args.steps,
             out["timed_s"], wall, result.steps)
    return out


# ---- TRL -------------------------------------------------------------------------------------
def same_tokens(ds, pairs: list) -> int:
    """Pairs whose TRL sequences differ from rayalign's (same order)."""
    return abs(len(ds) - len(pairs)) + sum(
        (c, r) != sequences(p) for c, r, p in zip(ds["chosen_ids"], ds["rejected_ids"], pairs))


def run_trl(args, model_dir: Path, rows: list[dict], pairs: list) -> dict:
    import datasets
    import trl
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    datasets.disable_progress_bars()
    torch_threads()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    config = RewardConfig(
        **trl_args(args),
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
        max_length=args.max_length,
    )
    clock = StepClock()
    trainer = RewardTrainer(model=str(model_dir), args=config, train_dataset=dataset,
                            processing_class=tokenizer, callbacks=[clock.callback()])
    tally = TokenTally(trainer.data_collator,
                       lambda row: [len(row["chosen_ids"]), len(row["rejected_ids"])])
    trainer.data_collator = tally       # read when train() builds its data loader
    ds = trainer.train_dataset
    differ = same_tokens(ds, pairs)
    if differ:
        log.warning("TRL: %d pairs tokenize differently from rayalign's; the two do not train "
                    "on the same tokens", differ)
    defaults = {k: getattr(config, k) for k in (
        "center_rewards_coefficient", "pad_to_multiple_of", "disable_dropout", "optim",
        "lr_scheduler_type", "max_grad_norm")}
    log.info("TRL %s: %s, %d pairs after its preprocessing, %d differ from rayalign's tokens; "
             "%s", trl.__version__, type(trainer.model).__name__, len(ds), differ,
             ", ".join(f"{k}={v}" for k, v in defaults.items()))
    t0 = time.perf_counter()
    train_out = trainer.train()
    wall = time.perf_counter() - t0

    seconds, interval = clock.step_seconds(args.steps), clock.interval_seconds()
    lengths = dict(zip(sorted(seconds), tally.lengths))     # batch k fed step k
    tokens = {s: sum(v) for s, v in lengths.items()}
    expected = sum(len(q) for p in pairs for q in sequences(p))
    if len(tally.lengths) < args.steps or sum(tokens.values()) != expected:
        raise RuntimeError(f"TRL: {len(tally.lengths)} batches holding {sum(tokens.values())} "
                           f"tokens; expected {args.steps} holding every pair once "
                           f"({expected} tokens)")
    n_pairs = {s: len(v) // 2 for s, v in lengths.items()}
    out = {
        "pairs_per_s": rate(n_pairs, seconds, args.warmup_steps),
        "pairs_per_s_with_data": rate(n_pairs, interval, args.warmup_steps),
        "end_to_end_pairs_per_s": rate(n_pairs, interval, 0),
        "tokens_per_s": rate(tokens, seconds, args.warmup_steps),
        **step_figures(seconds, args.warmup_steps), "train_call_s": wall,
        "pairs": sum(n_pairs.values()), "tokens": sum(tokens.values()),
        "slots": sum(laid_out(v, args.rayalign_attn)[1] for v in lengths.values()),
        "rows": len(ds), "rows_tokenized_differently": differ,
        "model_class": type(trainer.model).__name__,
        "final_loss": getattr(train_out, "training_loss", None),
        "defaults": {k: str(v) for k, v in defaults.items()},
    }
    log.info("TRL: %.2f pairs/s over steps %d-%d (%.2fs), %.2f with data loading; "
             "train() %.1fs", out["pairs_per_s"], args.warmup_steps + 1, args.steps,
             out["timed_s"], out["pairs_per_s_with_data"], wall)
    return out


# ---- report ----------------------------------------------------------------------------------
def report(args, n_params: int, ray_res: dict, trl_res: dict) -> str:
    import trl

    ratio = ray_res["pairs_per_s"] / trl_res["pairs_per_s"]
    e2e = ray_res["pairs"] / ray_res["all_steps_s"]
    phases = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in ray_res["phase_s"].items())
    lines = [
        "",
        f"## Reward-model training throughput, steps {args.warmup_steps + 1}-{args.steps} "
        f"(first {args.warmup_steps} not timed)",
        "",
        "| system | pairs/s | tokens/s |",
        "|---|---:|---:|",
        f"| rayalign ({args.rayalign_actors} actor(s), ZeRO-{args.zero_stage}, {packing(args)}) "
        f"| {ray_res['pairs_per_s']:.2f} | {ray_res['tokens_per_s']:.0f} |",
        f"| TRL RewardTrainer {trl.__version__} (padded) "
        f"| {trl_res['pairs_per_s']:.2f} | {trl_res['tokens_per_s']:.0f} |",
        "",
        f"**ratio rayalign / TRL: {ratio:.2f}x**",
        "",
        "Also measured:",
        "",
        "| figure | pairs/s |",
        "|---|---:|",
        f"| rayalign, all {args.steps} steps | {e2e:.2f} |",
        f"| TRL, all {args.steps} steps incl. data loading | "
        f"{trl_res['end_to_end_pairs_per_s']:.2f} |",
        f"| TRL, timed steps incl. data loading (step end to step end) | "
        f"{trl_res['pairs_per_s_with_data']:.2f} |",
        *spread_rows(ray_res, trl_res, args.batch_size, "batch size"),
        "",
        f"Settings: model {args.size} Llama as a 1-label sequence classifier (causal LM "
        f"{n_params / 1e6:.2f}M parameters; TRL's model class {trl_res['model_class']}), "
        f"float32, TRL sdpa, rayalign {args.rayalign_attn}; batch size {args.batch_size} pairs "
        f"(1 micro-batch, no accumulation); "
        f"max length {args.max_length} tokens; {args.steps} steps, {args.warmup_steps} warm-up; "
        f"responses {args.min_words}-{args.max_words} words ({ray_res['tokens'] / ray_res['pairs']:.0f} "
        f"tokens per pair on average, prompt counted twice); each pair used once; "
        f"Bradley-Terry loss; lr {LR:g}; torch threads {CORES} (rayalign: trainer cpus "
        f"{CORES / args.rayalign_actors:g} per actor; TRL: torch.set_num_threads({CORES})); "
        f"{versions()}.",
        "",
        f"Token slots through the model, padding included, for all {ray_res['tokens']} tokens: "
        f"rayalign {ray_res['slots']} ({packing(args)}), TRL {trl_res['slots']} (padded). "
        f"rayalign per timed step: {phases}. TRL pairs tokenized differently from rayalign's: "
        f"{trl_res['rows_tokenized_differently']} of {trl_res['rows']}. TRL left at its "
        "defaults: " + ", ".join(f"{k}={v}" for k, v in trl_res["defaults"].items())
        + "; set to match rayalign: bf16=False, gradient_checkpointing=False (TRL defaults: "
        "True).",
        "",
        load_line(ray_res, trl_res),
        "",
        f"Loss: rayalign last step {fmt(ray_res['final_loss'])} (pair accuracy "
        f"{fmt(ray_res['final_accuracy'])}); TRL mean over the run {fmt(trl_res['final_loss'])}.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(__doc__, "runs/bench/rm", "preference pairs", argv)
    setup_logging()
    Path(args.out).mkdir(parents=True, exist_ok=True)

    model_dir, n_params = bench_model(args)
    train_path, rows, pairs = preference_data(args, model_dir)
    ray_res, trl_res, ratios = alternate(args, lambda: run_rayalign(args, model_dir, train_path, pairs),
                                         lambda: run_trl(args, model_dir, rows, pairs), "pairs_per_s")

    print(report(args, n_params, ray_res, trl_res) + rounds_tail(ratios), flush=True)
    write_results(args, {"model_params": n_params, "rayalign": ray_res, "trl": trl_res,
                         "ratio": ray_res["pairs_per_s"] / trl_res["pairs_per_s"],
                         "round_ratios": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
