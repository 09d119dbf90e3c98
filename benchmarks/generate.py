"""Generation throughput: one rollout engine (vLLM on CPU, or ``--backend hf``) vs. Hugging Face
``model.generate``.

Both sides sample from the same "small" Llama (~2.9M parameters, float32, built with
``orchestrator.tiny_model.build_model``) on the same prompts: ``--prompts`` synthetic-task
prompts (``orchestrator.synthetic.prompt_text``) rendered with the tokenizer's chat template
(user turn + generation prompt). Sampling: n=1, temperature 1.0, top-p 1, no top-k,
``--max-new-tokens`` new tokens at most.

* rollout engine: the rollout role as the trainer loop uses it, ``ActorGroup`` of
  ``actors.rollout.RolloutEngine`` with 1 engine and 2 CPUs on a local Ray (vLLM tp 1, inside the
  actor), settings from ``orchestrator.roles.rollout_settings``; timed is the driver's wall
  time of ``group.run("generate", prompts, sampling)`` (all prompts in one call; Ray calls and
  returning the samples, with their per-token log-probs, included).
* Hugging Face: ``model.generate`` in this process, ``torch.set_num_threads(2)``, all prompts in
  one batch with left padding, ``do_sample=True, temperature=1.0, top_k=0, top_p=1.0``, sdpa
  attention, KV cache.

EOS: by default both sides ignore it, so every response has exactly ``--max-new-tokens``
tokens: ``Sampling(ignore_eos=True)`` on the engine (vLLM keeps sampling past EOS), and on the
Hugging Face side no ``eos_token_id`` in the model's generation config (EOS may be sampled,
generation goes on; passing ``eos_token_id=None`` to ``generate`` alone is not enough, it merges
the model's config back in). If ``actors.rollout.Sampling`` has no ``ignore_eos`` field (older
checkouts), or with ``--respect-eos``, both sides stop a response at EOS instead. Generated
tokens are counted on each side either way: the response ids the engine returns (EOS
included), and for Hugging Face the tokens after the prompt (up to and including the first EOS
when EOS is respected; what follows in its padded batch output is padding). Throughput =
generated tokens / seconds. One warm-up round on each side is not timed; then ``--rounds``
timed rounds.

Run from the repository root (about 1-2 minutes on 2 cores)::

    .venv/bin/python benchmarks/generate.py
    .venv/bin/python benchmarks/generate.py --prompts 128 --max-new-tokens 128 --rounds 5
    .venv/bin/python benchmarks/generate.py --backend hf   # the transformers rollout backend

The rollout side runs first and its Ray instance is shut down before the Hugging Face side
starts, so the two never share the CPU. The 1-minute load average is printed.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import random
import statistics
import time
from pathlib import Path

from bench_env import REPO, setup_logging  # noqa: E402,F401  (sets the environment first)

log = logging.getLogger("generate_bench")

CORES = 2
ENGINE_ENV = {"VLLM_LOGGING_LEVEL": "WARNING"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="small", help="tiny_model size (tiny, small, base)")
    p.add_argument("--prompts", type=int, default=64, help="prompts per round (one batch)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="new tokens per response, at most")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per side (after 1 warm-up)")
    p.add_argument("--max-model-len", type=int, default=256, help="engine max_model_len")
    p.add_argument("--kv-cache-gib", type=float, default=0.5, help="engine KV cache")
    p.add_argument("--seed", type=int, default=0, help="prompt choice and sampling seed")
    p.add_argument("--respect-eos", action="store_true",
                   help="stop responses at EOS on both sides (default: ignore EOS if supported)")
    p.add_argument("--backend", default="vllm", choices=("vllm", "hf"),
                   help="rollout.backend of the engine: vLLM, or a transformers model decoded in the actor")
    p.add_argument("--out", default="runs/bench/generate", help="work dir (model)")
    args = p.parse_args(argv)
    if min(args.prompts, args.max_new_tokens, args.rounds) < 1:
        p.error("--prompts, --max-new-tokens and --rounds must be at least 1")
    from dataclasses import fields

    from actors.rollout import Sampling
    args.sampling_has_ignore_eos = "ignore_eos" in {f.name for f in fields(Sampling)}
    args.ignore_eos = args.sampling_has_ignore_eos and not args.respect_eos
    return args


def make_prompts(tokenizer, n: int, seed: int) -> list[list[int]]:
    """``n`` synthetic-task prompts as chat-template token ids (with the generation prompt)."""
    from orchestrator import synthetic
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": synthetic.prompt_text(rng)}],
            add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def _timed_rounds(fn, rounds: int) -> dict:
    """One untimed warm-up call of ``fn`` (returns generated tokens), then ``rounds`` timed."""
    t0 = time.perf_counter()
    warm_tokens = fn()
    warm_s = time.perf_counter() - t0
    secs, toks = [], []
    for i in range(rounds):
        t0 = time.perf_counter()
        toks.append(fn())
        secs.append(time.perf_counter() - t0)
        log.info("  round %d: %d tokens in %.3fs (%.0f tokens/s)", i + 1, toks[-1], secs[-1],
                 toks[-1] / secs[-1])
    return {"warmup_s": warm_s, "warmup_tokens": warm_tokens, "seconds": secs, "tokens": toks,
            "tokens_per_s": sum(toks) / sum(secs),
            "median_round_tokens_per_s": statistics.median(t / s for t, s in zip(toks, secs)),
            "load_avg": os.getloadavg()}


def _check_lengths(args, side: str, res: dict) -> None:
    """With EOS ignored, every round must produce exactly prompts x max_new_tokens tokens."""
    want = args.prompts * args.max_new_tokens
    if args.ignore_eos and any(t != want for t in [res["warmup_tokens"], *res["tokens"]]):
        log.warning("%s: EOS was to be ignored, but rounds produced %s tokens, not %d each",
                    side, res["tokens"], want)


# ---- rollout engine --------------------------------------------------------------------------
def run_rollout(args, model_dir: Path, prompts: list[list[int]]) -> dict:
    import ray
    import torch

    from actors.group import ActorGroup
    from orchestrator.config import ModelConfig, RolloutConfig
    from orchestrator.placement import RoleRequest, place
    from orchestrator.roles import engine_class, rollout_settings

    cfg = RolloutConfig(actors=1, cpus=CORES, max_model_len=args.max_model_len,
                        kv_cache_gib=args.kv_cache_gib, seed=args.seed, backend=args.backend)
    settings = rollout_settings(ModelConfig(path=str(model_dir), dtype="float32"), cfg)
    sampling = {"n": 1, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                "max_new_tokens": args.max_new_tokens}
    if args.ignore_eos:
        sampling["ignore_eos"] = True
    ray.init(address="local", num_cpus=CORES, include_dashboard=False, logging_level=logging.WARNING)
    try:
        t0 = time.perf_counter()
        group = ActorGroup("rollout", engine_class(cfg),
                           place(RoleRequest("rollout", cfg.actors, cfg.cpus, 0), 60),
                           cfg.actors, cfg.cpus, 0, init_args=(settings,), env=ENGINE_ENV)
        threads = ray.get(group.actors[0].__ray_call__.remote(lambda self: torch.get_num_threads()))
        log.info("rollout engine up in %.1fs (torch threads in the engine: %d)",
                 time.perf_counter() - t0, threads)
        last: dict = {}

        def once() -> int:
            samples = group.run("generate", prompts, sampling)
            assert len(samples) == len(prompts), (len(samples), len(prompts))
            last["finish"] = [s.finish_reason for s in samples]
            return sum(len(s.response_ids) for s in samples)

        log.info("rollout engine: warm-up + %d timed rounds", args.rounds)
        res = _timed_rounds(once, args.rounds)
        _check_lengths(args, "rollout engine", res)
        res["threads"] = threads
        res["stopped_at_eos"] = sum(f == "stop" for f in last["finish"])
        ray.get([a.shutdown.remote() for a in group.actors])
    finally:
        ray.shutdown()
    return res


# ---- Hugging Face ----------------------------------------------------------------------------
def run_hf(args, model_dir: Path, prompts: list[list[int]]) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(CORES)
    torch.manual_seed(args.seed)
    transformers.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    eos = tokenizer.eos_token_id
    width = batch["input_ids"].shape[1]
    if args.ignore_eos:
        # generate() merges the model's own generation config back into the one passed, so
        # an eos_token_id=None there alone would still stop at EOS; clear it at the source
        model.generation_config.eos_token_id = None
    gen = copy.deepcopy(model.generation_config)
    gen.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
               max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
               eos_token_id=None if args.ignore_eos else eos)
    last: dict = {}

    @torch.inference_mode()
    def once() -> int:
        out = model.generate(**batch, generation_config=gen)
        new = out[:, width:]
        total, stopped = 0, 0
        for row in new.tolist():
            if args.ignore_eos:
                n = len(row)
            else:
                n = row.index(eos) + 1 if eos in row else len(row)
                stopped += eos in row
            total += n
        last["stopped"] = stopped
        return total

    log.info("Hugging Face generate: warm-up + %d timed rounds (batch %d, left padding to %d)",
             args.rounds, len(prompts), width)
    res = _timed_rounds(once, args.rounds)
    _check_lengths(args, "Hugging Face", res)
    res["threads"] = torch.get_num_threads()
    res["stopped_at_eos"] = last["stopped"]
    res["padded_width"] = width
    return res


# ---- report ------------------------------------------------------------------------------------
def report(args, n_params: int, prompts, ro: dict, hf: dict) -> str:
    import ray
    import torch
    import transformers
    import vllm

    lens = [len(p) for p in prompts]
    if args.ignore_eos:
        eos_note = ("EOS ignored on both sides (engine: Sampling ignore_eos=True; HF: no "
                    "eos_token_id), every response max_new_tokens long")
    else:
        eos_note = ("EOS respected on both sides ("
                    + ("--respect-eos" if args.sampling_has_ignore_eos
                       else "our Sampling has no ignore_eos") +
                    "), tokens counted up to and including EOS")
    ratio = ro["tokens_per_s"] / hf["tokens_per_s"]
    lines = [
        "",
        (f"## Generation throughput, {args.size} Llama ({n_params / 1e6:.2f}M parameters), "
         f"{args.prompts} prompts x n=1, up to {args.max_new_tokens} new tokens"),
        "",
        ("| system | generated tokens/s | tokens per round | seconds per round | warm-up s | "
         "responses ended at EOS (last round) |"),
        "|---|---:|---:|---|---:|---:|",
    ]
    kind = (f"vLLM {vllm.__version__}" if args.backend == "vllm"
            else f"backend hf: transformers {transformers.__version__} model, "
                 f"rayalign's decoding loop")
    engine_name = f"rollout engine (ActorGroup, 1 engine, {CORES} CPUs, {kind})"
    hf_name = (f"HF generate (transformers {transformers.__version__}, {hf['threads']} threads, "
               f"batch {args.prompts})")
    for name, r in ((engine_name, ro), (hf_name, hf)):
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | "
                     f"{', '.join(str(t) for t in r['tokens'])} | "
                     f"{', '.join(f'{s:.3f}' for s in r['seconds'])} | {r['warmup_s']:.2f} | "
                     f"{r['stopped_at_eos']} / {args.prompts} |")
    lines += [
        "",
        (f"**ratio rollout engine / HF generate: {ratio:.2f}x** (tokens/s over {args.rounds} timed "
         f"rounds; median-round ratio "
         f"{ro['median_round_tokens_per_s'] / hf['median_round_tokens_per_s']:.2f}x)"),
        "",
        (f"Settings: prompts {min(lens)}-{max(lens)} tokens (mean {sum(lens) / len(lens):.1f}; HF "
         f"left-pads them to {hf['padded_width']}); sampling n=1, temperature 1.0, top-p 1, no "
         f"top-k; {eos_note}; float32; engine: max_model_len {args.max_model_len}, KV cache "
         f"{args.kv_cache_gib:g} GiB, torch threads {ro['threads']}, enforce_eager, log-probs of "
         f"sampled tokens returned; engine time is the driver's wall time of group.run "
         f"(Ray round trip included). Ray {ray.__version__}, torch {torch.__version__}, "
         f"{os.cpu_count()} CPUs."),
        (f"1-minute load average after each side: rollout {ro['load_avg'][0]:.2f}, HF "
         f"{hf['load_avg'][0]:.2f} (2 cores; above ~2 means other work shared the CPU)."),
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from orchestrator.tiny_model import build_model

    log.info("load average %s", os.getloadavg())
    model_dir = build_model(Path(args.out) / "model", args.size, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = make_prompts(tokenizer, args.prompts, args.seed)
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(model_dir)).parameters())
    longest = max(len(p) for p in prompts) + args.max_new_tokens
    if longest > args.max_model_len:
        raise SystemExit(f"prompt + response can reach {longest} tokens; raise --max-model-len")
    ro = run_rollout(args, model_dir, prompts)
    hf = run_hf(args, model_dir, prompts)
    print(report(args, n_params, prompts, ro, hf), flush=True)


if __name__ == "__main__":
    main()
