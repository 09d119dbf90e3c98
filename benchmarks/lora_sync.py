"""LoRA weight sync: merged weights into a plain vLLM engine vs. adapters into vLLM's own LoRA.

With ``policy.lora`` an engine can get the policy's weights two ways after each update:

* merged (what rayalign does): every adapted layer's base weight plus its adapters' update,
  under the plain layer's name, loaded by vLLM's layerwise reload into a plain engine, which
  then samples at a plain model's speed;
* adapters: the adapter tensors alone (peft's dir), loaded by an engine started with
  ``enable_lora``; less to move, but the engine adds the adapters' product to every adapted
  layer for every token it samples.

Both run here on the same ``--size`` Llama (``rayalign tiny-model``) with the same adapters
(rank ``--rank`` on every linear layer, random updates: peft starts them at zero), each in a
process of its own, one vLLM CPU engine inside it (tensor_parallel_size 1), one after the
other. Per sync the adapters are moved a little (as a training step would), then:

* merged: the trainer's side walk (``actors.weight_sync.full_parameters``, adapters merged)
  handed in memory to the engine's ``rayalign_local`` weight-transfer engine (what the hybrid
  engine does; a separate engine adds the transport, benchmarks/weight_sync.py), timed to the
  end of ``RolloutEngine.update_weights``;
* adapters: peft's ``save_pretrained`` of the adapters to /dev/shm (the smallest hand-over
  vLLM takes: a dir) plus vLLM's load of it, which happens inside the first generate call
  with a new ``LoRARequest``: the load is that call's time minus the next call's with the
  same adapter.

Then one generate call: ``--prompts`` prompts x ``--n`` samples of ``--new-tokens`` tokens
(EOS ignored, so both sample the same number of tokens). The figure that matters is sync +
generate per step; the report prints both ways' medians over ``--syncs`` syncs and the ratio.

Run from the repository root::

    .venv/bin/python benchmarks/lora_sync.py --size medium
    .venv/bin/python benchmarks/lora_sync.py --size small --syncs 3
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import statistics
import time
from pathlib import Path

from bench_env import setup_logging  # (sets the environment first)

log = logging.getLogger("lora_sync")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="medium", choices=("small", "medium", "base"))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--syncs", type=int, default=5)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--kv-cache-gib", type=float, default=0.5)
    p.add_argument("--out", default="runs/bench-lora-sync")
    return p.parse_args(argv)


def adapted_model(model_dir: Path, rank: int):
    """The model with rank-``rank`` adapters on every linear layer, given random updates."""
    import torch
    from transformers import AutoModelForCausalLM

    from actors.lora import apply_lora
    from orchestrator.config import LoraConfig
    model = apply_lora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                       LoraConfig(rank=rank, alpha=2.0 * rank))
    step(model, seed=0)
    return model


def step(model, seed: int) -> None:
    """Move every adapter a little, as an optimizer step would."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


def prompts(args) -> list[list[int]]:
    return [[5 + i, 17, 29, 41 + i, 53] for i in range(args.prompts)]


def merged_way(args, model_dir: Path, out: Path) -> None:
    """Child process: the plain engine fed merged weights in memory."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    setup_logging()
    import torch

    from actors import vllm_weight_engine
    from actors.lora import plain_model
    from actors.rollout import RolloutEngine, RolloutSettings
    from actors.weight_sync import describe, full_parameters
    model = adapted_model(model_dir, args.rank)
    inner = plain_model(model)
    engine = RolloutEngine(0, 1, RolloutSettings(
        model_path=str(model_dir), max_model_len=256, kv_cache_gib=args.kv_cache_gib,
        weight_backend=vllm_weight_engine.LOCAL))
    sampling = {"n": args.n, "max_new_tokens": args.new_tokens, "ignore_eos": True}
    info = describe(inner).payload()
    sent = sum(t.numel() * t.element_size() for _, t in full_parameters(inner, zero3=False))
    rows = []
    for k in range(args.syncs + 1):      # the first is a warm-up
        step(model, seed=k + 1)
        t0 = time.perf_counter()
        with torch.no_grad():
            vllm_weight_engine.feed_local(full_parameters(inner, zero3=False))
            engine.update_weights(info)
        sync = time.perf_counter() - t0
        t0 = time.perf_counter()
        samples = engine.generate(prompts(args), sampling)
        generate = time.perf_counter() - t0
        assert sum(len(s.response_ids) for s in samples) == args.prompts * args.n * args.new_tokens
        rows.append({"sync": sync, "generate": generate})
    out.write_text(json.dumps({"rows": rows[1:], "bytes": sent}))


def adapter_way(args, model_dir: Path, out: Path) -> None:
    """Child process: an engine with vLLM's LoRA support, fed peft adapter dirs."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
    setup_logging()
    import vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from actors.lora import trained_state
    model = adapted_model(model_dir, args.rank)
    llm = vllm.LLM(model=str(model_dir), enable_lora=True, max_lora_rank=args.rank,
                   max_loras=1, dtype="float32", max_model_len=256, enforce_eager=True,
                   kv_cache_memory_bytes=int(args.kv_cache_gib * (1 << 30)),
                   distributed_executor_backend="uni", seed=0)
    sampling = SamplingParams(n=args.n, max_tokens=args.new_tokens, ignore_eos=True,
                              temperature=1.0, detokenize=False)
    batch = [TokensPrompt(prompt_token_ids=p) for p in prompts(args)]
    root = Path("/dev/shm") / f"rayalign-lora-bench-{os.getpid()}"
    rows, sent = [], 0
    try:
        for k in range(args.syncs + 1):  # the first is a warm-up
            step(model, seed=k + 1)
            path = root / f"step-{k}"
            t0 = time.perf_counter()
            model.save_pretrained(str(path), save_embedding_layers=False,
                                  state_dict=trained_state(model, zero3=False, rank=0))
            save = time.perf_counter() - t0
            sent = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            request = LoRARequest(f"step-{k}", k + 1, str(path))
            t0 = time.perf_counter()
            llm.generate(batch, sampling, lora_request=request, use_tqdm=False)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            outs = llm.generate(batch, sampling, lora_request=request, use_tqdm=False)
            generate = time.perf_counter() - t0
            assert sum(len(c.token_ids) for o in outs for c in o.outputs) == \
                args.prompts * args.n * args.new_tokens
            rows.append({"sync": save + max(first - generate, 0.0), "save": save,
                         "load": max(first - generate, 0.0), "generate": generate})
            shutil.rmtree(path)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out.write_text(json.dumps({"rows": rows[1:], "bytes": sent}))


def run_child(target, args, model_dir: Path, out: Path) -> dict:
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=target, args=(args, model_dir, out))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"{target.__name__} failed (exit {child.exitcode}); its log is above")
    return json.loads(out.read_text())


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def med_step(rows: list[dict]) -> float:
    """Median of sync + generate, the cost of one step's weights and samples."""
    return statistics.median(r["sync"] + r["generate"] for r in rows)


def report(args, ways: dict) -> str:
    lines = [f"LoRA weight sync, {args.size} model, rank {args.rank} on every linear layer; "
             f"generate = {args.prompts} prompts x {args.n} samples x {args.new_tokens} "
             f"tokens; medians of {args.syncs} syncs", "",
             "| way | sent MB | sync s | generate s | sync + generate s |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, res in ways.items():
        rows = res["rows"]
        lines.append(f"| {name} | {res['bytes'] / 1e6:.2f} | {med(rows, 'sync'):.3f} | "
                     f"{med(rows, 'generate'):.3f} | {med_step(rows):.3f} |")
    a, m = ways["adapters (vLLM LoRA)"]["rows"], ways["merged (plain engine)"]["rows"]
    lines += ["", f"adapters: save {med(a, 'save'):.3f} s, load {med(a, 'load'):.3f} s",
              f"sync + generate, adapters / merged: {med_step(a) / med_step(m):.2f}",
              f"generate alone, adapters / merged: {med(a, 'generate') / med(m, 'generate'):.2f}",
              f"1-minute load average at the end: {os.getloadavg()[0]:.2f} (2 cores)"]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging()
    from orchestrator.tiny_model import build_model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(out / "model", args.size, seed=0)
    ways = {}
    for name, target in (("merged (plain engine)", merged_way),
                         ("adapters (vLLM LoRA)", adapter_way)):
        log.info("%s ...", name)
        ways[name] = run_child(target, args, model_dir, out / f"{target.__name__}.json")
    text = report(args, ways)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "ways": ways}, indent=1))
    log.info("results\n%s", text)


if __name__ == "__main__":
    main()
