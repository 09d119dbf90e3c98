"""The real policy trainer (DeepSpeed ZeRO-3, 2 ranks) syncs into a vLLM engine after a DPO step.

Before the sync the engine scores responses with the old weights; after it, its log-probs
equal the trainer's (fp32). Under ZeRO-3 every rank gathers each layer's shards while rank 0
sends, so this also checks the gathered path.
"""
from __future__ import annotations

import pytest
import ray

from orchestrator.batches import PreferenceBatch
from orchestrator.config import RolloutConfig
from orchestrator.data import load_preferences
from orchestrator.progress import pad_to_multiple
from orchestrator.roles import connect, start_group, start_rollout, stop_group
from orchestrator.weight_sync import connect as connect_sync, sync_weights
from actors.policy_trainer import PolicyTrainer
from actors.runtime import load_tokenizer

pytestmark = pytest.mark.e2e


def _engine_sums(engine, pairs) -> list[float]:
    seqs = [(p.prompt_ids, p.chosen_ids) for p in pairs]
    return [sum(lps) for lps in engine.run("logprobs", seqs)]


def _trainer_sums(policy, pairs) -> list[float]:
    return [c for c, _ in policy.run("logprobs", pad_to_multiple(pairs, len(policy)))[:len(pairs)]]


def test_zero3_policy_step_then_sync_matches_engine(make_config):
    cfg = make_config("policy.zero_stage=3", "optim.lr=1e-2", "optim.warmup_steps=0",
                      "cluster.num_cpus=3", "train.batch_size=8", "train.micro_batch_size=4")
    pairs, _ = load_preferences(cfg.data.eval, load_tokenizer(cfg.model.path), cfg.data.max_length)
    probe, train_pairs = pairs[:6], pairs[8:16]
    connect(cfg.cluster)
    try:
        policy = start_group("policy", PolicyTrainer, cfg.policy, 30, (cfg,))
        addr, port = ray.get(policy.actors[0].address.remote())
        policy.run("setup", addr, port)
        engine = start_rollout(cfg.model, RolloutConfig(cpus=1, kv_cache_gib=0.25, max_model_len=256), 60)
        connect_sync(policy, engine)

        start = _trainer_sums(policy, probe)
        assert max(abs(a - b) for a, b in zip(start, _engine_sums(engine, probe))) < 1e-3

        ref = policy.run("logprobs", train_pairs)  # policy == reference before the first step
        policy.run("train_step", PreferenceBatch.build(train_pairs, ref).split(len(policy)))
        trained = _trainer_sums(policy, probe)
        stale = _engine_sums(engine, probe)
        assert max(abs(a - b) for a, b in zip(trained, stale)) > 1e-2  # the step moved the policy

        stats = sync_weights(policy, engine, bucket_bytes=1 << 20)
        assert stats["buckets"] >= 1
        synced = _engine_sums(engine, probe)
        assert max(abs(a - b) for a, b in zip(trained, synced)) < 1e-3
        stop_group(engine)
        stop_group(policy)
    finally:
        ray.shutdown()
