"""The policy-trainer role: a causal LM under DeepSpeed (ZeRO 0-3), one replica per rank.

The replicas form one torch.distributed world (gloo on CPU, NCCL on GPU) whose rendezvous
the driver hands out; no DeepSpeed launcher is involved.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch

from actors.group import ALL, SCATTER, SHARDS, dispatch
from actors.logprobs import (build_inputs, pair_logprobs, pair_sequences, response_logprobs,
                             sequence_logprobs)
from actors.weight_sync import WeightSender
from actors.runtime import (load_causal_lm, load_tokenizer, node_address, set_dist_env, set_threads,
                            skip_shm_comm_op)
from orchestrator.batches import PreferenceBatch
from orchestrator.dpo_losses import preference_loss

log = logging.getLogger(__name__)


def lr_lambda(warmup: int, total: int, schedule: str):
    """Multiplier of the peak lr at a step: linear warm-up, then constant/linear/cosine decay."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def deepspeed_config(cfg) -> dict:
    per_actor = cfg.per_actor_batch
    micro = min(cfg.train.micro_batch_size, per_actor)
    return {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": per_actor // micro,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.policy.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class PolicyTrainer(WeightSender):
    def __init__(self, rank: int, world_size: int, cfg):
        self.rank, self.world_size, self.cfg = rank, world_size, cfg
        set_threads(cfg.policy.cpus)
        self.engine = None

    def address(self) -> tuple[str, int]:
        return node_address()

    def weights_module(self):
        """The HF model whose parameters go to the rollout engines."""
        return self.engine.module

    def weights_zero3(self) -> bool:
        return self.cfg.policy.zero_stage == 3

    @dispatch(ALL)
    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the trainers' process group, load the model, build DeepSpeed. Returns #params."""
        import deepspeed
        cfg = self.cfg
        set_dist_env(master_addr, master_port, self.rank, self.world_size)
        backend = "nccl" if torch.cuda.is_available() and cfg.policy.gpus > 0 else "gloo"
        if backend == "gloo":
            skip_shm_comm_op()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   rank=self.rank, world_size=self.world_size)
        torch.manual_seed(cfg.train.seed)
        model = load_causal_lm(cfg.model, trainable=True)
        if cfg.policy.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.tokenizer = load_tokenizer(cfg.model.path)
        self.pad_id = self.tokenizer.pad_token_id or 0
        o = cfg.optim
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(o.warmup_steps, cfg.train.max_steps, o.schedule))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg))
        return sum(p.numel() for p in model.parameters())

    # ---- training -------------------------------------------------------------------------
    @dispatch(SHARDS)
    def train_step(self, batch: PreferenceBatch) -> dict:
        """One optimizer step over this replica's pairs; returns sums the driver adds up."""
        cfg, engine = self.cfg, self.engine
        t0 = time.perf_counter()
        engine.train()
        micro = min(cfg.train.micro_batch_size, len(batch))
        sums = {"pairs": 0.0, "tokens": 0.0, "loss": 0.0}
        for mb in batch.micro_batches(micro):
            inputs = build_inputs(pair_sequences(mb.pairs), cfg.train.pack, self.pad_id)
            logps, counts = sequence_logprobs(engine, inputs)
            n = len(mb)
            loss, stats = preference_loss(
                cfg.dpo.loss, logps[:n], logps[n:], mb.ref_chosen, mb.ref_rejected, cfg.dpo.beta,
                cfg.dpo.label_smoothing, cfg.dpo.nll_weight, counts[:n])
            engine.backward(loss)
            if cfg.policy.zero_stage == 0 and engine.is_gradient_accumulation_boundary():
                # DeepSpeed reports no global grad norm without ZeRO; take it before the step
                grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                own_norm = torch.nn.utils.get_total_norm(grads).item()
            engine.step()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            sums["loss"] += loss.item() * n
            sums["pairs"] += n
            sums["tokens"] += sum(len(p) + len(r) for p, r in pair_sequences(mb.pairs))
        grad_norm = engine.get_global_grad_norm() if cfg.policy.zero_stage else own_norm
        sums["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        sums["lr"] = engine.get_lr()[0]
        sums["train_seconds"] = time.perf_counter() - t0
        return sums

    @dispatch(SHARDS)
    def rl_step(self, batch) -> dict:
        """One online-RL policy update over this replica's rows (see actors/rl_update.py)."""
        from actors.rl_update import rl_update
        return rl_update(self.engine, batch, self.cfg, self.pad_id)

    @dispatch(SCATTER)
    def token_logprobs(self, sequences) -> list[list[float]]:
        """Per-token log-probs of each (prompt, response)'s response tokens."""
        self.engine.eval()
        return response_logprobs(self.engine, sequences, self.cfg.train.micro_batch_size,
                                 self.cfg.train.pack, self.pad_id)

    # ---- evaluation -----------------------------------------------------------------------
    @dispatch(SCATTER)
    def logprobs(self, pairs) -> list[tuple[float, float]]:
        self.engine.eval()
        return pair_logprobs(self.engine, pairs, self.cfg.train.micro_batch_size,
                             self.cfg.train.pack, self.pad_id)

    @dispatch(SCATTER)
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 seed: int) -> list[list[int]]:
        """Sample one response per prompt (ids, EOS excluded); training RNG is left untouched."""
        model = self.engine.module
        model.eval()
        eos, out = self.tokenizer.eos_token_id, []
        synced = self.cfg.policy.zero_stage == 3 and self.world_size > 1
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed + self.rank)
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(prompts):  # left padding
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                 temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=self.pad_id, synced_gpus=synced)
        for row in gen[:, width:].tolist():
            out.append(row[:row.index(eos)] if eos in row else row)
        return out

    # ---- checkpoints ----------------------------------------------------------------------
    @dispatch(ALL)
    def save(self, ckpt_dir: str) -> None:
        """DeepSpeed state (model, optimizer, scheduler) + this rank's RNG + an HF model dir."""
        ckpt = Path(ckpt_dir)
        self.engine.save_checkpoint(str(ckpt / "deepspeed"), tag="state", save_latest=False)
        rng_dir = ckpt / "rng"
        rng_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"torch": torch.get_rng_state()}, rng_dir / f"rank{self.rank}.pt")
        self.save_hf(str(ckpt / "model"))

    def save_hf(self, out_dir: str) -> None:
        """Hugging Face model dir (safetensors + tokenizer), gathered under ZeRO-3."""
        import deepspeed
        model = self.engine.module
        if self.cfg.policy.zero_stage == 3:
            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
                state = {k: v.detach().clone() for k, v in model.state_dict().items()} \
                    if self.rank == 0 else None
        else:
            state = model.state_dict() if self.rank == 0 else None
        if self.rank == 0:
            model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(out_dir)
        torch.distributed.barrier()

    @dispatch(ALL)
    def load(self, ckpt_dir: str) -> None:
        ckpt = Path(ckpt_dir)
        path, _ = self.engine.load_checkpoint(str(ckpt / "deepspeed"), tag="state",
                                              load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"policy rank {self.rank}: no DeepSpeed state in {ckpt}/deepspeed")
        rng_file = ckpt / "rng" / f"rank{self.rank}.pt"
        if rng_file.is_file():
            torch.set_rng_state(torch.load(rng_file)["torch"])

    @dispatch(ALL)
    def pid(self) -> int:
        return os.getpid()
