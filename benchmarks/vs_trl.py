"""What the rayalign-vs-TRL training benchmarks share (dpo_throughput.py, rm_throughput.py,
sft_throughput.py): their options, the model and preference data, rayalign's run config and
step rows, a clock for TRL's steps, and the rate over the timed steps.

Both systems run the same number of optimizer steps; the first ``--warmup-steps`` are left out.
Over the timed steps T:

    rate = sum_{s in T} count_s / sum_{s in T} seconds_s

count_s: the pairs or tokens of step s; seconds_s: rayalign's ``timing/step`` (driver wall time
of the step), or for TRL the time from ``on_step_begin`` to ``on_step_end`` of a
``TrainerCallback``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

import bench_env  # noqa: F401  (sets the environment before torch or transformers load)

# Ray starts its workers at nice 15 by default, TRL trains in this process at nice 0: on a
# machine shared with other work that alone would decide the comparison. Same priority for both.
os.environ.setdefault("RAY_worker_niceness", "0")

log = logging.getLogger("vs_trl")

CORES = 2            # the benchmark machine's cores; both systems get all of them
LR = 5e-4
# per --size: response words, --max-length and --steps defaults. With the medium tokenizer a
# word of the synthetic task is about one token: medium's responses average about 256 tokens.
SIZES = {"small": {"words": (8, 60), "max_length": 256, "steps": 40, "warmup": 5},
         "medium": {"words": (232, 280), "max_length": 384, "steps": 12, "warmup": 2}}


def parse_args(doc: str, default_out: str, row: str, argv=None, extra=None) -> argparse.Namespace:
    """The options every such benchmark takes; ``row`` names a batch row (pairs, sequences);
    ``extra(parser)`` adds a script's own."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="small", choices=tuple(SIZES),
                   help="model size (orchestrator.tiny_model): small ~3M parameters, responses "
                        "of 8-60 words; medium ~30M, responses of about 256 tokens")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per system (default: 40 small, 12 medium)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="first steps left out of the timing on both sides (default: 5 small, "
                        "2 medium)")
    p.add_argument("--batch-size", type=int, default=8, help=f"{row} per optimizer step")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest prompt+response in tokens (default: 256 small, 384 medium)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the two systems this many times, alternately (rayalign, TRL, "
                        "rayalign, ...), and report the round with the median ratio; drift in "
                        "the machine's speed then falls on both sides")
    p.add_argument("--out", default=default_out, help="work dir: model, data, run dirs, results")
    p.add_argument("--rayalign-actors", type=int, default=1,
                   help="policy replicas for rayalign (they share the machine's cores)")
    p.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3),
                   help="DeepSpeed ZeRO stage for rayalign's policy")
    p.add_argument("--rayalign-attn", default="varlen", choices=("varlen", "sdpa"),
                   help="rayalign's model.attn_implementation: varlen packs each micro-batch "
                        "into one row without padding; sdpa packs rows as wide as the longest "
                        "sequence under a block-diagonal mask")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    preset = SIZES[args.size]
    args.min_words, args.max_words = preset["words"]
    for key, name in (("max_length", "max_length"), ("steps", "steps"),
                      ("warmup_steps", "warmup")):
        if getattr(args, key) is None:
            setattr(args, key, preset[name])
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be at least 1")
    if not 0 <= args.warmup_steps < args.steps:
        p.error("--warmup-steps must be in [0, --steps)")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.rayalign_actors < 1:
        p.error("--rayalign-actors must be at least 1")
    return args


# ---- model and data ------------------------------------------------------------------------
def bench_model(args) -> tuple[Path, int]:
    """The ``--size`` Llama and its tokenizer (chat template included) in ``--out``; #params."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from orchestrator.tiny_model import build_model

    out = Path(args.out)
    model_dir = build_model(out / ("model" if args.size == "small" else f"model-{args.size}"),
                            args.size)
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(model_dir)).parameters())
    return model_dir, n_params


def keep_rows(src: Path, dst: Path, rows: set[int], keys: tuple[str, ...]) -> list[dict]:
    """Copy the 1-based ``rows`` of JSONL ``src`` to ``dst``, fields ``keys`` only; the rows."""
    out = []
    with open(src) as fh:
        for i, line in enumerate(fh, 1):
            if i in rows and line.strip():
                row = json.loads(line)
                out.append({k: row[k] for k in keys})
    dst.write_text("".join(json.dumps(r) + "\n" for r in out))
    return out


def preference_data(args, model_dir: Path) -> tuple[Path, list[dict], list]:
    """Train file with exactly steps*batch_size synthetic pairs that fit --max-length, those
    rows, and rayalign's tokenized pairs of them (same order)."""
    from transformers import AutoTokenizer

    from orchestrator import synthetic
    from orchestrator.data import load_preferences

    out = Path(args.out)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    need = args.steps * args.batch_size
    # a little spare, in case a row is longer than --max-length (rayalign would refuse it, TRL
    # would truncate it): such rows are dropped for both systems
    paths = synthetic.write_dataset(out / "data", n_train=need + need // 4 + 16, n_eval=0, seed=0,
                                    min_words=args.min_words, max_words=args.max_words)
    kept, report = load_preferences(paths["train"], tokenizer, args.max_length, on_bad_row="skip")
    if len(kept) < need:
        raise SystemExit(f"only {len(kept)} of the generated pairs fit --max-length "
                         f"{args.max_length} ({report.summary()}); {need} are needed: raise "
                         f"--max-length or lower --steps/--batch-size")
    kept = kept[:need]
    train_path = out / "data" / "bench_train.jsonl"
    rows = keep_rows(paths["train"], train_path, {ex.row for ex in kept},
                     ("prompt", "chosen", "rejected"))
    lengths = [len(ex.prompt_ids) + len(ex.chosen_ids) + len(ex.prompt_ids) + len(ex.rejected_ids)
               for ex in kept]
    longest = max(len(ex.prompt_ids) + max(len(ex.chosen_ids), len(ex.rejected_ids))
                  for ex in kept)
    log.info("data: %d pairs (%s), %.1f tokens per pair on average (prompt counted twice), "
             "longest sequence %d tokens", len(rows), report.summary(),
             sum(lengths) / len(lengths), longest)
    return train_path, rows, kept


# ---- rayalign --------------------------------------------------------------------------------
def rayalign_config(args, algorithm: str, model_dir: Path, train_path: Path, **sections) -> dict:
    """rayalign's run config: the policy on all cores (shared by --rayalign-actors replicas),
    float32, --rayalign-attn, one micro-batch a step, packed, constant lr, no eval, no
    checkpoints while training; ``sections`` are added or replace whole sections."""
    n = args.rayalign_actors
    cfg = {
        "algorithm": algorithm,
        "run_dir": str(Path(args.out) / "rayalign"),
        "model": {"path": str(model_dir), "dtype": "float32",
                  "attn_implementation": args.rayalign_attn},
        "data": {"train": str(train_path), "eval": None, "max_length": args.max_length},
        "policy": {"actors": n, "cpus": CORES / n, "zero_stage": args.zero_stage,
                   "gradient_checkpointing": False},
        "optim": {"lr": LR, "warmup_steps": 0, "schedule": "constant"},
        "train": {"batch_size": args.batch_size, "micro_batch_size": args.batch_size,
                  "max_steps": args.steps, "seed": 0, "pack": True},
        "eval": {"reward_fn": None},
        "checkpoint": {"every": 0, "resume": "never"},
        "cluster": {"num_cpus": CORES},
        "log": {"progress_bar": False, "trackers": []},
    }
    cfg.update(sections)
    return cfg


def rayalign_steps(run_dir: Path, steps: int) -> list[dict]:
    """The step rows of ``run_dir/metrics.jsonl`` in step order; all ``steps`` of them."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    out = sorted((r for r in rows if "timing/step" in r), key=lambda r: r["step"])
    if len(out) != steps:
        raise RuntimeError(f"rayalign: expected {steps} step rows in metrics.jsonl, "
                           f"found {len(out)}")
    return out


def rayalign_figures(rows: list[dict], warmup: int) -> dict:
    """Step times of rayalign's step rows (see :func:`step_figures`), their sum, the last
    step's loss, and the mean seconds per timed step of each ``timing/*`` phase."""
    seconds = {r["step"]: r["timing/step"] for r in rows}
    timed = [r for r in rows if r["step"] > warmup]
    phases = [k for k in sorted(timed[0]) if k.startswith("timing/") and k != "timing/step"]
    return {**step_figures(seconds, warmup), "all_steps_s": sum(seconds.values()),
            "final_loss": rows[-1].get("loss"),
            "phase_s": {k[len("timing/"):]: sum(r.get(k, 0.0) for r in timed) / len(timed)
                        for k in phases}}


# ---- TRL -------------------------------------------------------------------------------------
class StepClock:
    """When each TRL optimizer step began and ended (``time.perf_counter``), by step number
    from 1, and when training began; ``callback()`` is the TrainerCallback that fills it."""

    def __init__(self):
        self.begin: dict[int, float] = {}
        self.end: dict[int, float] = {}
        self.start: float | None = None

    def callback(self):
        from transformers import TrainerCallback
        clock = self

        class Marks(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                clock.start = time.perf_counter()

            def on_step_begin(self, args, state, control, **kw):
                clock.begin[state.global_step + 1] = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                clock.end[state.global_step] = time.perf_counter()

        return Marks()

    def step_seconds(self, steps: int) -> dict[int, float]:
        """Step begin to step end, for each of the ``steps`` steps (all must have ended)."""
        if len(self.end) != steps:
            raise RuntimeError(f"TRL: expected {steps} steps, saw {len(self.end)}")
        return {s: self.end[s] - self.begin[s] for s in sorted(self.end)}

    def interval_seconds(self) -> dict[int, float]:
        """Previous step end (or training start) to step end: data loading included."""
        return {s: self.end[s] - self.end.get(s - 1, self.start) for s in sorted(self.end)}


class TokenTally:
    """Wraps a TRL collator: the sequence lengths (no padding) of each batch it builds, in
    order; with one batch per optimizer step, batch k feeds step k. ``sizes(row)``: the
    lengths of one dataset row's sequences."""

    def __init__(self, collate, sizes):
        self.collate, self.sizes, self.lengths = collate, sizes, []

    def __call__(self, rows: list[dict]):
        self.lengths.append([n for r in rows for n in self.sizes(r)])
        return self.collate(rows)


def trl_args(args) -> dict:
    """The TrainingArguments every TRL config here shares: a fresh output dir, one batch of
    --batch-size rows per optimizer step, --steps steps at the benchmark's lr, CPU, no eval,
    saves, logging or progress bars."""
    import shutil
    run_dir = Path(args.out) / "trl"
    shutil.rmtree(run_dir, ignore_errors=True)
    return dict(
        output_dir=str(run_dir), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=LR, max_steps=args.steps,
        eval_strategy="no", save_strategy="no", report_to="none", use_cpu=True,
        logging_steps=10**6, dataloader_num_workers=0, disable_tqdm=True, seed=0,
        # TRL's own defaults are bf16=True (autocast) and gradient_checkpointing=True; rayalign
        # trains in float32 without checkpointing, so match that here
        bf16=False, gradient_checkpointing=False)


def torch_threads() -> None:
    """TRL runs in this process: give torch all the cores, as rayalign's policy has."""
    import torch
    torch.set_num_threads(CORES)


# ---- figures ---------------------------------------------------------------------------------
def rate(counts: dict[int, float], seconds: dict[int, float], warmup: int) -> float:
    """Sum of ``counts`` over the timed steps (after ``warmup``) / sum of their ``seconds``."""
    timed = [s for s in seconds if s > warmup]
    return sum(counts[s] for s in timed) / sum(seconds[s] for s in timed)


def step_figures(seconds: dict[int, float], warmup: int) -> dict:
    """Timed steps, their total, median and fastest step, and every step's time."""
    timed = [seconds[s] for s in sorted(seconds) if s > warmup]
    return {"timed_steps": len(timed), "timed_s": sum(timed),
            "median_step_s": statistics.median(timed), "min_step_s": min(timed),
            "step_s": [round(seconds[s], 4) for s in sorted(seconds)], "load_avg": os.getloadavg()}


def spread_rows(ray_res: dict, trl_res: dict, per_step: float, what: str) -> list[str]:
    """Table rows: ``per_step`` (a step's count, named ``what``) over the median and the
    fastest timed step of each side."""
    return [f"| {name}, {what} / {stat} timed step ({res[key]:.3f} s) | "
            f"{per_step / res[key]:.2f} |"
            for stat, key in (("median", "median_step_s"), ("fastest", "min_step_s"))
            for name, res in (("rayalign", ray_res), ("TRL", trl_res))]


def laid_out(lengths: list[int], attn: str) -> tuple[int, int]:
    """Token slots one forward over sequences of ``lengths`` fills: (rayalign packed, TRL
    padded). Packed: with the varlen attention one row holding just the tokens, with sdpa rows
    as wide as the longest sequence, filled first-fit-decreasing; padded: one row per
    sequence, as wide as the longest."""
    from actors.logprobs import pack_rows
    width, rows = pack_rows(lengths)
    packed = sum(lengths) if attn == "varlen" else width * len(rows)
    return packed, max(lengths) * len(lengths)


def packing(args) -> str:
    """How rayalign lays a micro-batch out, for the log and the tables."""
    return (f"packed, {args.rayalign_attn} attention" if args.rayalign_attn == "varlen"
            else "packed rows, sdpa")


def load_line(ray_res: dict, trl_res: dict) -> str:
    return ("1-minute load average after each side (2 cores; above 2 means other work shared the "
            f"CPU and the figures are noisy): rayalign {ray_res['load_avg'][0]:.2f}, "
            f"TRL {trl_res['load_avg'][0]:.2f}.")


def versions() -> str:
    import torch
    import transformers
    return f"torch {torch.__version__}, transformers {transformers.__version__}"


def fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "n/a"


def alternate(args, run_ours, run_trl, key: str) -> tuple[dict, dict, list[float]]:
    """``--rounds`` rounds of (rayalign, TRL): the results of the round whose ratio of ``key``
    is the median (the lower middle one for an even count), and every round's ratio."""
    rounds = []
    for r in range(args.rounds):
        if args.rounds > 1:
            log.info("round %d of %d", r + 1, args.rounds)
        ours, theirs = run_ours(), run_trl()
        rounds.append((ours[key] / theirs[key], ours, theirs))
    ratios = [ratio for ratio, _, _ in rounds]
    _, ours, theirs = sorted(rounds, key=lambda t: t[0])[(len(rounds) - 1) // 2]
    return ours, theirs, ratios


def rounds_tail(ratios: list[float]) -> str:
    """The report's last paragraph when there was more than one round: what the headline
    ratio is."""
    if len(ratios) == 1:
        return ""
    return (f"\n\nRatio per round, in run order: {', '.join(f'{r:.2f}x' for r in ratios)}; the "
            f"tables show the median round ({statistics.median_low(ratios):.2f}x).")


def write_results(args, results: dict) -> None:
    path = Path(args.out) / "results.json"
    path.write_text(json.dumps({"args": vars(args), **results}, indent=2, default=str) + "\n")
    log.info("results written to %s", path)
