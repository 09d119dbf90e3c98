"""SFT training throughput: rayalign vs. TRL's SFTTrainer, same model, data and batch, one run.

Builds a ``--size`` Llama ("small" ~2.9M parameters, or "medium" ~30M) and synthetic
prompt/response rows
(``orchestrator.synthetic.make_sft``, no conversations) in ``--out``, then trains SFT twice,
one after the other in this process:

* rayalign: ``orchestrator.train`` with ``algorithm: sft`` and an embedded local Ray, the
  policy under DeepSpeed (ZeRO ``--zero-stage``) using the machine's 2 cores, sequences packed.
* TRL: ``trl.SFTTrainer`` on CPU with 2 torch threads, a conversational prompt-completion
  dataset with ``completion_only_loss=True``, sequences right-padded to the longest of the
  batch (TRL's default; no packing). With ``--trl-padding-free`` the batch is laid out as one
  row instead (TRL's ``padding_free=True``; position ids restart at each sequence, which
  transformers turns into a block-diagonal mask under sdpa too). TRL then takes no
  ``max_length``, which changes nothing here: every row already fits.

Both see the same rows (``steps * batch_size``, none repeated), tokenized to the same ids (the
tokenizer's chat template; checked row by row), the loss on response tokens only (averaged
over the batch's response tokens), lr 5e-4, float32, no gradient checkpointing, no evaluation,
no checkpoints during training. The first ``--warmup-steps`` steps are left out of the timing.

Throughput (tokens/s): every token through the model, prompt and response, padding not
counted, summed over the timed steps and divided by their time. Tokens are counted from the
data on both sides, not by either framework's counter:

* rayalign: step s trained the file rows ``batch/rows`` of its ``metrics.jsonl`` row; its
  tokens are those rows' lengths; its time ``timing/step`` (driver wall time: batch assembly,
  Ray call, forward/backward and optimizer step in the policy actor).
* TRL: the collator is wrapped to add up the lengths of the rows of each batch it builds
  (batch k feeds step k); the time is ``on_step_begin`` to ``on_step_end`` of a
  ``TrainerCallback``; step end to step end (data loading included) is printed as well.

Run from the repository root::

    .venv/bin/python benchmarks/sft_throughput.py               # 40 steps, 5 warm-up
    .venv/bin/python benchmarks/sft_throughput.py --steps 8 --warmup-steps 2
    .venv/bin/python benchmarks/sft_throughput.py --trl-padding-free
"""
from __future__ import annotations

import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench_env import REPO, setup_logging  # noqa: E402,F401  (sets the environment first)
from vs_trl import (CORES, LR, alternate, bench_model, fmt, keep_rows, laid_out, load_line,
                    packing, parse_args, rate, rayalign_config, rayalign_figures, rayalign_steps,
                    rounds_tail, spread_rows, step_figures, StepClock, TokenTally, torch_threads,
                    trl_args, versions, write_results)

log = logging.getLogger("sft_throughput")


# ---- data ------------------------------------------------------------------------------------
def sft_data(args, model_dir: Path) -> tuple[Path, list[dict], list]:
    """Train file with exactly steps*batch_size prompt/response rows that fit --max-length,
    those rows, and rayalign's tokenized examples of that file (row i is examples[i-1])."""
    from transformers import AutoTokenizer

    from orchestrator import synthetic
    from orchestrator.data import load_sft

    data = Path(args.out) / "data"
    data.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    need = args.steps * args.batch_size
    # a little spare, in case a row is longer than --max-length (rayalign would refuse it, TRL
    # would truncate it): such rows are dropped for both systems
    src = data / "sft.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in synthetic.make_sft(
        need + need // 4 + 16, seed=20_000, min_words=args.min_words, max_words=args.max_words,
        conversations=0.0)))
    kept, report = load_sft(src, tokenizer, args.max_length, on_bad_row="skip")
    if len(kept) < need:
        raise SystemExit(f"only {len(kept)} of the generated rows fit --max-length "
                         f"{args.max_length} ({report.summary()}); {need} are needed: raise "
                         f"--max-length or lower --steps/--batch-size")
    train_path = data / "bench_sft.jsonl"
    rows = keep_rows(src, train_path, {ex.row for ex in kept[:need]}, ("prompt", "response"))
    examples, _ = load_sft(train_path, tokenizer, args.max_length)
    lengths = [len(ex) for ex in examples]
    log.info("data: %d rows (%s), %.1f tokens per row on average (%.1f of them response), "
             "longest %d tokens", len(rows), report.summary(), statistics.mean(lengths),
             statistics.mean(ex.target_tokens for ex in examples), max(lengths))
    return train_path, rows, examples


# ---- rayalign --------------------------------------------------------------------------------
def run_rayalign(args, model_dir: Path, train_path: Path, examples: list) -> dict:
    from orchestrator import RunConfig, train

    run_dir = Path(args.out) / "rayalign"
    shutil.rmtree(run_dir, ignore_errors=True)   # a fresh run: no resume, no old metrics lines
    cfg = RunConfig.from_dict(rayalign_config(args, "sft", model_dir, train_path))
    log.info("rayalign: %d policy actor(s) x %g CPUs, ZeRO-%d, %s", args.rayalign_actors,
             CORES / args.rayalign_actors, args.zero_stage, packing(args))
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0

    steps = rayalign_steps(run_dir, args.steps)
    lengths = {s["step"]: [len(examples[r - 1]) for r in s["batch/rows"]] for s in steps}
    tokens = {s: sum(v) for s, v in lengths.items()}
    own = {r["step"]: r["tokens"] for r in steps}
    if own != tokens:
        log.warning("rayalign: its own token counts differ from the data's in %d steps",
                    sum(own[s] != tokens[s] for s in tokens))
    seconds = {r["step"]: r["timing/step"] for r in steps}
    out = rayalign_figures(steps, args.warmup_steps)
    out.update({
        "tokens_per_s": rate(tokens, seconds, args.warmup_steps),
        "sequences_per_s": rate({s: len(v) for s, v in lengths.items()}, seconds,
                                args.warmup_steps),
        "tokens": sum(tokens.values()), "train_call_s": wall,
        "slots": sum(laid_out(v, args.rayalign_attn)[0] for v in lengths.values()),
    })
    log.info("rayalign: %.0f tokens/s over steps %d-%d (%.2fs), train() %.1fs in all, "
             "%d steps done", out["tokens_per_s"], args.warmup_steps + 1, args.steps,
             out["timed_s"], wall, result.steps)
    return out


# ---- TRL -------------------------------------------------------------------------------------
def same_tokens(ds, examples: list) -> int:
    """Rows whose TRL ids or trained positions differ from rayalign's (same order)."""
    bad = 0
    for ids, labels, ex in zip(ds["input_ids"], ds["labels"], examples):
        ours = [t for seg in ex.segments for t in seg]
        trained = [i for i, t in enumerate(labels) if t != -100]
        bad += ids != ours or trained != list(range(len(ex.prompt_ids), len(ours)))
    return bad + abs(len(ds) - len(examples))


def run_trl(args, model_dir: Path, rows: list[dict], examples: list) -> dict:
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    torch_threads()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    dataset = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "completion": [{"role": "assistant", "content": r["response"]}]} for r in rows])
    config = SFTConfig(
        **trl_args(args),
        # padding-free without packing refuses a max_length; the rows already fit it
        max_length=None if args.trl_padding_free else args.max_length,
        padding_free=args.trl_padding_free,
        completion_only_loss=True,
    )
    clock = StepClock()
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[clock.callback()])
    tally = TokenTally(trainer.data_collator, lambda row: [len(row["input_ids"])])
    trainer.data_collator = tally       # read when train() builds its data loader
    ds = trainer.train_dataset
    differ = same_tokens(ds, examples)
    if differ:
        log.warning("TRL: %d rows tokenize differently from rayalign's (ids or trained "
                    "positions); the two do not train on the same tokens", differ)
    defaults = {k: getattr(config, k) for k in (
        "packing", "pad_to_multiple_of", "loss_type", "optim",
        "lr_scheduler_type", "max_grad_norm", "shuffle_dataset")}
    log.info("TRL %s: padding_free=%s, %d rows after its preprocessing, %d differ from "
             "rayalign's tokens; %s", trl.__version__, config.padding_free, len(ds), differ,
             ", ".join(f"{k}={v}" for k, v in defaults.items()))
    t0 = time.perf_counter()
    train_out = trainer.train()
    wall = time.perf_counter() - t0

    seconds, interval = clock.step_seconds(args.steps), clock.interval_seconds()
    lengths = dict(zip(sorted(seconds), tally.lengths))     # batch k fed step k
    tokens = {s: sum(v) for s, v in lengths.items()}
    if len(tally.lengths) < args.steps or sum(tokens.values()) != sum(map(len, examples)):
        raise RuntimeError(f"TRL: {len(tally.lengths)} batches holding {sum(tokens.values())} "
                           f"tokens; expected {args.steps} holding every row once "
                           f"({sum(map(len, examples))} tokens)")
    out = {
        "tokens_per_s": rate(tokens, seconds, args.warmup_steps),
        "tokens_per_s_with_data": rate(tokens, interval, args.warmup_steps),
        "end_to_end_tokens_per_s": rate(tokens, interval, 0),
        "sequences_per_s": rate({s: len(v) for s, v in lengths.items()}, seconds,
                                args.warmup_steps),
        **step_figures(seconds, args.warmup_steps), "train_call_s": wall,
        "tokens": sum(tokens.values()),
        "slots": sum(sum(v) if args.trl_padding_free else laid_out(v, args.rayalign_attn)[1]
                     for v in lengths.values()),
        "rows": len(ds), "rows_tokenized_differently": differ,
        "final_loss": getattr(train_out, "training_loss", None),
        "defaults": {k: str(v) for k, v in defaults.items()},
    }
    log.info("TRL: %.0f tokens/s over steps %d-%d (%.2fs), %.0f with data loading; "
             "train() %.1fs", out["tokens_per_s"], args.warmup_steps + 1, args.steps,
             out["timed_s"], out["tokens_per_s_with_data"], wall)
    return out


# ---- report ----------------------------------------------------------------------------------
def report(args, n_params: int, ray_res: dict, trl_res: dict) -> str:
    import trl

    ratio = ray_res["tokens_per_s"] / trl_res["tokens_per_s"]
    layout = "padding-free" if args.trl_padding_free else "padded"
    e2e = ray_res["tokens"] / ray_res["all_steps_s"]
    per_step = ray_res["tokens"] / args.steps      # the same on both sides: every row once
    phases = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in ray_res["phase_s"].items())
    lines = [
        "",
        f"## SFT training throughput, steps {args.warmup_steps + 1}-{args.steps} "
        f"(first {args.warmup_steps} not timed)",
        "",
        "| system | tokens/s | sequences/s |",
        "|---|---:|---:|",
        f"| rayalign ({args.rayalign_actors} actor(s), ZeRO-{args.zero_stage}, {packing(args)}) "
        f"| {ray_res['tokens_per_s']:.0f} | {ray_res['sequences_per_s']:.2f} |",
        f"| TRL SFTTrainer {trl.__version__} ({layout}) "
        f"| {trl_res['tokens_per_s']:.0f} | {trl_res['sequences_per_s']:.2f} |",
        "",
        f"**ratio rayalign / TRL: {ratio:.2f}x**",
        "",
        "Also measured:",
        "",
        "| figure | tokens/s |",
        "|---|---:|",
        f"| rayalign, all {args.steps} steps | {e2e:.0f} |",
        f"| TRL, all {args.steps} steps incl. data loading | "
        f"{trl_res['end_to_end_tokens_per_s']:.0f} |",
        f"| TRL, timed steps incl. data loading (step end to step end) | "
        f"{trl_res['tokens_per_s_with_data']:.0f} |",
        *spread_rows(ray_res, trl_res, per_step, f"mean tokens per step ({per_step:.0f})"),
        "",
        f"Settings: model {args.size} Llama, {n_params / 1e6:.2f}M parameters, float32, TRL sdpa, "
        f"rayalign {args.rayalign_attn}; "
        f"batch size {args.batch_size} sequences (1 micro-batch, no accumulation); max length "
        f"{args.max_length} tokens; {args.steps} steps, {args.warmup_steps} warm-up; responses "
        f"{args.min_words}-{args.max_words} words ({ray_res['tokens'] / (args.steps * args.batch_size):.0f} "
        f"tokens per row on average); each row used once; loss on response tokens only; "
        f"lr {LR:g}; torch threads {CORES} (rayalign: policy cpus "
        f"{CORES / args.rayalign_actors:g} per actor; TRL: torch.set_num_threads({CORES})); "
        f"{versions()}.",
        "",
        f"Token slots through the model, padding included, for all {ray_res['tokens']} tokens: "
        f"rayalign {ray_res['slots']} ({packing(args)}), TRL {trl_res['slots']} ({layout}). "
        f"rayalign per timed step: {phases}. TRL rows tokenized differently from rayalign's: "
        f"{trl_res['rows_tokenized_differently']} of {trl_res['rows']}. TRL left at its "
        "defaults: " + ", ".join(f"{k}={v}" for k, v in trl_res["defaults"].items())
        + "; set to match rayalign: bf16=False, gradient_checkpointing=False (TRL defaults: "
        "True), completion_only_loss=True"
        + (", padding_free=True, max_length=None (--trl-padding-free)." if args.trl_padding_free
           else "."),
        "",
        load_line(ray_res, trl_res),
        "",
        f"Loss (per response token): rayalign last step {fmt(ray_res['final_loss'])}; TRL mean "
        f"over the run {fmt(trl_res['final_loss'])}.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(__doc__, "runs/bench/sft", "sequences", argv, lambda p: p.add_argument(
        "--trl-padding-free", action="store_true",
        help="TRL lays each batch out as one row (padding_free=True) instead of padding it"))
    setup_logging()
    Path(args.out).mkdir(parents=True, exist_ok=True)

    model_dir, n_params = bench_model(args)
    train_path, rows, examples = sft_data(args, model_dir)
    ray_res, trl_res, ratios = alternate(args, lambda: run_rayalign(args, model_dir, train_path, examples),
                                         lambda: run_trl(args, model_dir, rows, examples), "tokens_per_s")

    print(report(args, n_params, ray_res, trl_res) + rounds_tail(ratios), flush=True)
    write_results(args, {"model_params": n_params, "rayalign": ray_res, "trl": trl_res,
                         "ratio": ray_res["tokens_per_s"] / trl_res["tokens_per_s"],
                         "round_ratios": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
