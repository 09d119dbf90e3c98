"""Trainer => vLLM weight sync, proven by log-probs: after a sync the engines score a sequence
exactly as the trainer does; before it (the trainer having taken optimizer steps) they do not.

One local Ray instance holds a trainer stand-in (plain transformers + AdamW, with a default
gloo process group of its own, as DeepSpeed's trainers have) and three rollout engines (vLLM on
CPU, in placement groups, through ActorGroup): two with tensor_parallel_size 1 and vLLM inside
the actor's process, one with tensor_parallel_size 2 and vLLM's spawned worker processes.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import sys

import pytest
import ray
import torch

from actors.group import ActorGroup
from actors.rollout import RolloutEngine, RolloutSettings
from actors.weight_sync import WeightSender, WeightSyncError
from orchestrator.weight_sync import connect, sync_weights
from orchestrator.placement import RoleRequest, place
from orchestrator.tiny_model import build_model

pytestmark = pytest.mark.e2e
log = logging.getLogger(__name__)

MAX_LEN = 256
ENV = {"VLLM_LOGGING_LEVEL": "WARNING"}


class TinyTrainer(WeightSender):
    """Trainer stand-in: a transformers model, AdamW, NLL steps, log-probs of response tokens."""

    def __init__(self, rank: int, world_size: int, model_path: str):
        from transformers import AutoModelForCausalLM

        from actors.runtime import node_address, set_dist_env, set_threads
        set_threads(1)
        self.rank = rank
        set_dist_env(*node_address(), rank, world_size)  # a default group, like DeepSpeed's
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)

    def weights_module(self):
        return self.model

    def _token_logprobs(self, sequences):
        from actors.logprobs import build_inputs, token_logprobs
        flat = token_logprobs(self.model, build_inputs(sequences, pack=False))
        return flat.split([len(r) for _, r in sequences])

    def train(self, sequences, steps: int) -> list[float]:
        """``steps`` AdamW steps on the mean NLL of the response tokens; the losses."""
        self.model.train()
        losses = []
        for _ in range(steps):
            loss = -torch.cat(self._token_logprobs(sequences)).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
        return losses

    @torch.no_grad()
    def logprobs(self, sequences) -> list[list[float]]:
        self.model.eval()
        return [lp.tolist() for lp in self._token_logprobs(sequences)]


def _sequences(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [([rng.randrange(5, 500) for _ in range(rng.randrange(4, 12))],
             [rng.randrange(5, 500) for _ in range(rng.randrange(6, 16))]) for _ in range(n)]


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb, strict=True))


@pytest.fixture(scope="module")
def roles(tmp_path_factory):
    model = str(build_model(tmp_path_factory.mktemp("sync") / "model", "tiny", seed=0))
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    # the trainer stand-in lives here, and Ray workers cannot import test modules by name
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    settings = RolloutSettings(model, max_model_len=MAX_LEN, kv_cache_gib=0.25, seed=0)
    # two tp=1 engines with vLLM in the actor's process, one tp=2 engine with spawned workers
    engines = ActorGroup("rollout", RolloutEngine, place(RoleRequest("rollout", 2, 1, 0), 60), 2,
                         1, 0, init_args=(settings,), env=ENV)
    tp2 = dataclasses.replace(settings, tensor_parallel_size=2, cpu_threads_bind="0|1")
    wide = ActorGroup("rollout-tp2", RolloutEngine, place(RoleRequest("rollout-tp2", 1, 1, 0), 60),
                      1, 1, 0, init_args=(tp2,), env=ENV)
    trainer = ActorGroup("policy", TinyTrainer, place(RoleRequest("policy", 1, 1, 0), 60), 1,
                         1, 0, init_args=(model,))
    # an engine that cannot start (its KV cache does not fit), started alongside the others
    broken = ray.remote(num_cpus=0)(RolloutEngine).options(runtime_env={"env_vars": ENV}).remote(
        5, 6, RolloutSettings(model, max_model_len=MAX_LEN, kv_cache_gib=4096))
    everyone = engines.actors + wide.actors
    connect(trainer, everyone, timeout_s=120)  # waits for the engines to be up
    yield {"engines": engines, "all": everyone, "trainer": trainer, "broken": broken}
    ray.get([e.shutdown.remote() for e in everyone])
    ray.shutdown()


def _engine_logprobs(engines, sequences) -> list[list[list[float]]]:
    """Each engine's log-probs of all sequences (not scattered: every engine scores all)."""
    return ray.get([e.logprobs.remote(sequences) for e in engines])


def test_sync_makes_engines_score_like_the_trainer(roles):
    everyone, trainer = roles["all"], roles["trainer"]
    seqs = _sequences(4)
    losses = trainer.run("train", seqs, 5)[0]
    assert losses[-1] < losses[0] - 0.5, losses  # the weights moved materially

    want = trainer.run("logprobs", seqs)[0]
    before = [_max_diff(got, want) for got in _engine_logprobs(everyone, seqs)]
    assert min(before) > 1e-2, before

    stats = sync_weights(trainer, everyone, bucket_bytes=256 << 10)
    assert stats["buckets"] > 1 and all(r["checked"] for r in stats["engines"]), stats

    got = _engine_logprobs(everyone, seqs)
    after = [_max_diff(g, want) for g in got]
    log.info("max |engine - trainer| log-prob: before %s, after %s; sync %.2fs, %d buckets",
             before, after, stats["seconds"], stats["buckets"])
    assert max(after) < 1e-3, after
    assert _max_diff(got[0], got[1]) < 1e-6  # the two tp=1 engines hold the same weights
    assert _max_diff(got[0], got[2]) < 1e-5  # tp=2 sums its matmuls in another order

    # sampling after the sync: the log-probs returned with the samples are the trainer's too
    prompts = [p for p, _ in seqs]
    samples = roles["engines"].run("generate", prompts, {"n": 2, "max_new_tokens": 8, "seed": 3})
    assert [s.prompt_ids for s in samples] == [p for p in prompts for _ in range(2)]
    assert all(s.finish_reason in ("stop", "length") for s in samples)
    assert all(len(s.logprobs) == len(s.response_ids) > 0 for s in samples)
    # each of a prompt's seeded samples has a seed of its own (vLLM: the request's seed + k)
    assert any(a.response_ids != b.response_ids for a, b in zip(samples[::2], samples[1::2]))
    scored = trainer.run("logprobs", [(s.prompt_ids, s.response_ids) for s in samples])[0]
    assert _max_diff([s.logprobs for s in samples], scored) < 1e-3


def test_streamed_generation_hands_back_each_prompt_when_its_samples_are_done(roles):
    """vLLM's ``generate_stream`` yields a prompt's group the engine step its last sample
    ends (the long prompt: its room in max_model_len ends it after 4 tokens), and the parts
    together are what ``generate`` samples with the same seed."""
    engine = roles["engines"].actors[0]
    prompts = [[5, 17, 33, 8], [7] * (MAX_LEN - 4), [40, 41]]
    sp = {"n": 3, "max_new_tokens": 8, "seed": 5, "ignore_eos": True}
    whole = ray.get(engine.generate.remote(prompts, sp))
    parts = [ray.get(ref) for ref in engine.generate_stream.remote(prompts, sp, 1)]
    assert parts[0][0] == [1] and [len(s.response_ids) for s in parts[0][1]] == [4, 4, 4]
    got = {p: samples for positions, samples in parts for p in positions}
    streamed = [s for p in sorted(got) for s in got[p]]
    assert [(s.response_ids, s.finish_reason) for s in streamed] == \
        [(s.response_ids, s.finish_reason) for s in whole]
    assert _max_diff([s.logprobs for s in streamed], [s.logprobs for s in whole]) < 1e-6


def test_partial_sync_is_caught(roles):
    everyone, trainer = roles["all"], roles["trainer"]
    seqs = _sequences(4, seed=1)
    trainer.run("train", seqs, 2)
    want = trainer.run("logprobs", seqs)[0]

    with pytest.raises(WeightSyncError) as err:
        sync_weights(trainer, everyone, exclude=("model.layers.1.",))
    message = str(err.value)
    assert "parameter(s) missing" in message and "model.layers.1.self_attn.q_proj.weight" in message
    # the skipped layer kept its old weights: the proof fails as it should
    assert min(_max_diff(g, want) for g in _engine_logprobs(everyone, seqs)) > 1e-3

    sync_weights(trainer, everyone)  # a full sync repairs it
    assert max(_max_diff(g, want) for g in _engine_logprobs(everyone, seqs)) < 1e-3


def test_prompt_longer_than_max_model_len_names_engine_and_lengths(roles):
    engine = roles["engines"].actors[0]
    with pytest.raises(ValueError, match=rf"rollout engine 0: prompt 1 has {MAX_LEN} tokens, "
                                         rf"but max_model_len is {MAX_LEN}"):
        ray.get(engine.generate.remote([[5, 6], [7] * MAX_LEN], {"max_new_tokens": 4}))
    with pytest.raises(ValueError, match=r"sampling: unknown key\(s\) max_tokens"):
        ray.get(engine.generate.remote([[5, 6]], {"max_tokens": 4}))


def test_engine_that_cannot_start_names_its_rank_and_cause(roles):
    with pytest.raises(ray.exceptions.RayActorError) as err:
        ray.get(roles["broken"].workers.remote())
    message = str(err.value)
    assert "rollout engine 5: vLLM could not start on" in message, message[-2000:]
    assert "requested memory for kv (4096.0 GiB)" in message, message[-2000:]  # the cause
