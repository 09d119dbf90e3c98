"""The trainer role: the model being trained under DeepSpeed (ZeRO 0-3), one replica per rank.

One class serves every algorithm: the offline objectives (DPO, SFT, reward model; see
actors/objectives.py) through one ``train_step``, and the online RL update through
``rl_step``. The model is a causal LM, or for ``algorithm: rm`` a one-output sequence
classifier. The replicas form one torch.distributed world (gloo on CPU, NCCL on GPU) whose
rendezvous the driver hands out; no DeepSpeed launcher is involved.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from actors import lora
from actors.group import ALL, SCATTER, SHARDS, dispatch
from actors.deepspeed_actor import DeepSpeedActor
from actors.logprobs import (build_inputs, pair_inputs, pair_logprobs, response_logprobs,
                             sequence_scores, token_logprobs_and_hits)
from actors.objectives import OBJECTIVES
from actors.runtime import load_causal_lm, load_reward_model, load_tokenizer
from actors.weight_sync import WeightSender

log = logging.getLogger(__name__)


class PolicyTrainer(DeepSpeedActor, WeightSender):
    role = "policy"

    def weights_module(self):
        """The HF model whose parameters go to the rollout engines (inside a LoRA wrapper:
        the weight sync merges its adapters, see actors/lora.py)."""
        return lora.plain_model(self.engine.module)

    def weights_zero3(self) -> bool:
        return self.cfg.policy.zero_stage == 3

    @dispatch(ALL)
    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the trainers' process group, load the model, build DeepSpeed. Returns #params."""
        cfg = self.cfg
        self.join_world(master_addr, master_port)
        torch.manual_seed(cfg.train.seed)
        self.tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id or 0
        model = (load_reward_model(cfg.model, self.pad_id) if cfg.algorithm == "rm"
                 else load_causal_lm(cfg.model, trainable=True))
        if cfg.policy.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model = self.adapt(model, "classifier" if cfg.algorithm == "rm" else "causal")
        self.build_engine(model, cfg.optim.lr)
        return sum(p.numel() for p in model.parameters())

    # ---- training -------------------------------------------------------------------------
    @dispatch(SHARDS)
    def train_step(self, batch) -> dict:
        """One optimizer step of the run's offline objective over this replica's rows (a
        PreferenceBatch or an SFTBatch); returns sums the driver adds up."""
        cfg, engine = self.cfg, self.engine
        self._engine_stale = True  # (online DPO's update comes here too)
        objective = OBJECTIVES[cfg.algorithm]
        t0 = time.perf_counter()
        engine.train()
        sums: dict[str, float] = {}
        for mb in batch.micro_batches(min(cfg.train.micro_batch_size, len(batch))):
            loss, stats = objective(self, mb, batch)
            engine.backward(loss)
            self.step()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
        sums["grad_norm"] = self.grad_norm()
        sums["lr"] = engine.get_lr()[0]
        sums["train_seconds"] = time.perf_counter() - t0
        return sums

    @dispatch(SHARDS)
    def rl_step(self, batch) -> dict:
        """One online-RL policy update over this replica's rows (see actors/rl_update.py)."""
        from actors.rl_update import rl_update
        self._engine_stale = True
        return rl_update(self, batch, self.cfg, self.pad_id)

    @dispatch(SCATTER)
    def generate(self, prompts: list[list[int]], sampling: dict | None = None) -> list:
        """The hybrid engine (``rollout.colocate_with: policy``): sample as a transformers
        rollout engine would (actors/rollout_hf.py), with this trainer's own module, so no
        weights are ever copied. Under ZeRO-3 with several ranks each forward gathers the
        layers' shards, a collective: the ranks decode in lockstep (``synced_gpus``), and every
        rank must get a call."""
        if self.cfg.rollout.backend == "vllm":
            return self._generate_vllm(prompts, sampling)
        from actors.rollout_hf import HFRolloutEngine
        from orchestrator.roles import rollout_settings
        if getattr(self, "_sampler", None) is None:
            self._sampler = HFRolloutEngine.around(
                self.engine.module, self.tokenizer, self.rank, self.world_size,
                rollout_settings(self.cfg.model, self.cfg.rollout),
                synced=self.cfg.policy.zero_stage == 3 and self.world_size > 1)
        module = self.engine.module
        training = module.training
        module.eval()
        try:
            return self._sampler.generate(prompts, sampling)
        finally:
            module.train(training)

    def _generate_vllm(self, prompts: list[list[int]], sampling: dict | None) -> list:
        """The hybrid engine with vLLM: an engine in this process (made at the first call),
        given this trainer's weights by an in-memory copy whenever they changed since it last
        sampled, and on GPU asleep (KV cache freed) except while it generates."""
        engine = self._local_engine()
        engine.wake()
        try:
            if self._engine_stale:
                self._copy_weights(engine)
            return engine.generate(prompts, sampling)
        finally:
            engine.sleep()

    def _local_engine(self):
        if getattr(self, "_vllm", None) is None:
            import dataclasses

            from actors.rollout import RolloutEngine
            from actors.vllm_weight_engine import LOCAL
            from orchestrator.roles import rollout_settings
            settings = dataclasses.replace(
                rollout_settings(self.cfg.model, self.cfg.rollout), weight_backend=LOCAL,
                sleep=torch.cuda.is_available() and self.cfg.policy.gpus > 0)
            self._vllm = RolloutEngine(self.rank, self.world_size, settings)
            self._engine_stale = True  # model.path's weights, or not this trainer's (resume)
        return self._vllm

    def _copy_weights(self, engine) -> None:
        from actors import vllm_weight_engine
        from actors.weight_sync import describe, full_parameters
        module = self.weights_module()
        info = describe(module).payload()
        with torch.no_grad():
            vllm_weight_engine.feed_local(full_parameters(module, self.weights_zero3()))
            engine.update_weights(info)
        self._engine_stale = False

    @dispatch(SCATTER)
    def token_logprobs(self, sequences) -> list[list[float]]:
        """Per-token log-probs of each (prompt, response)'s response tokens."""
        self.engine.eval()
        return response_logprobs(self.engine, sequences, self.cfg.train.micro_batch_size,
                                 self.cfg.packing, self.pad_id)

    # ---- the reference as the base weights (reference.from: policy_base) -------------------
    @dispatch(SCATTER)
    def base_logprobs(self, pairs) -> list[tuple[float, float]]:
        """:meth:`logprobs` with the LoRA adapters switched off: the starting policy's."""
        with lora.base_weights(self.engine.module):
            return self.logprobs(pairs)

    @dispatch(SCATTER)
    def base_token_logprobs(self, sequences) -> list[list[float]]:
        """:meth:`token_logprobs` with the LoRA adapters switched off."""
        with lora.base_weights(self.engine.module):
            return self.token_logprobs(sequences)

    # ---- evaluation -----------------------------------------------------------------------
    @dispatch(SCATTER)
    def logprobs(self, pairs) -> list[tuple[float, float]]:
        self.engine.eval()
        return pair_logprobs(self.engine, pairs, self.cfg.train.micro_batch_size,
                             self.cfg.packing, self.pad_id)

    @dispatch(SCATTER)
    @torch.no_grad()
    def sft_scores(self, examples) -> list[tuple[float, int, int]]:
        """(negative log-likelihood summed over the trained tokens, their number, how many
        of them are the model's top choice) for each SFT example."""
        self.engine.eval()
        out, micro = [], self.cfg.train.micro_batch_size
        for start in range(0, len(examples), micro):
            chunk = examples[start:start + micro]
            inputs = build_inputs([e.segments for e in chunk], self.cfg.packing, self.pad_id)
            logp, hits = token_logprobs_and_hits(self.engine, inputs)
            owner = inputs.owner.to(logp.device)
            nll = torch.zeros(len(chunk), dtype=logp.dtype).index_add(0, owner, -logp)
            right = torch.zeros(len(chunk), dtype=torch.long).index_add(0, owner, hits.long())
            out += zip(nll.tolist(), [e.target_tokens for e in chunk], right.tolist())
        return out

    @dispatch(SCATTER)
    @torch.no_grad()
    def rewards(self, pairs) -> list[tuple[float, float]]:
        """(chosen, rejected) scores of each pair under the reward model being trained."""
        self.engine.eval()
        out, micro = [], self.cfg.train.micro_batch_size
        for start in range(0, len(pairs), micro):
            chunk = pairs[start:start + micro]
            scores = sequence_scores(self.engine,
                                     pair_inputs(chunk, self.cfg.packing, self.pad_id))
            out += zip(scores[:len(chunk)].tolist(), scores[len(chunk):].tolist())
        return out

    @dispatch(SCATTER)
    def sample_responses(self, prompts: list[list[int]], max_new_tokens: int,
                         temperature: float, seed: int) -> list[list[int]]:
        """Sample one response per prompt (ids, up to the first of the generation config's EOS
        ids, excluded); training RNG is left untouched."""
        model = self.engine.module
        model.eval()
        eos = model.generation_config.eos_token_id
        eos = set([eos] if isinstance(eos, int) else eos or [self.tokenizer.eos_token_id])
        out = []
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
                                 max_new_tokens=max_new_tokens, eos_token_id=sorted(eos),
                                 pad_token_id=self.pad_id, synced_gpus=synced)
        for row in gen[:, width:].tolist():
            out.append(row[:next((j for j, t in enumerate(row) if t in eos), len(row))])
        return out

    # ---- checkpoints ----------------------------------------------------------------------
    @dispatch(ALL)
    def save(self, ckpt_dir: str, remote=None) -> None:
        """DeepSpeed state (model, optimizer, scheduler) + this rank's RNG + a Hugging Face
        model dir (``model``; for rm a sequence classifier that ``reward.kind: model`` and
        ``critic.model_path`` load) and with LoRA the adapter dir (``adapter``)."""
        self.save_state(Path(ckpt_dir))
        self.save_model_dir(Path(ckpt_dir) / "model", self.tokenizer)
        self.publish(ckpt_dir, remote)

    @dispatch(ALL)
    def load(self, ckpt_dir: str, remote=None) -> None:
        self.fetch(ckpt_dir, remote)
        self.load_state(Path(ckpt_dir))
        self._engine_stale = True
