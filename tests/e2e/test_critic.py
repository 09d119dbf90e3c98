"""The critic role on its own: two replicas under ZeRO-2 fit the values of a fixed target with
the clipped value loss, values refreshed before each update as in PPO; with full weights, and
with LoRA adapters (``critic.lora``) beside its fully trained value head."""
from __future__ import annotations

import random

import pytest
import ray
import torch

from actors.critic import Critic
from orchestrator.batches import RolloutBatch, pad_tokens
from orchestrator.rl_losses import explained_variance
from orchestrator.roles import connect, setup_trainers, start_group, stop_group

pytestmark = pytest.mark.e2e


def _target(response: list[int]) -> list[float]:
    """Value of each state: +1 when the response's first token is even, else -1."""
    return [1.0 if response[0] % 2 == 0 else -1.0] * len(response)


@pytest.mark.parametrize("lora", [[], ["critic.lora.rank=8", "critic.lora.alpha=16"]],
                         ids=["full", "lora"])
def test_critic_fits_returns(make_config, lora):
    cfg = make_config("algorithm=ppo", "reward.function=orchestrator.synthetic:reward",
                      "critic.actors=2", "critic.cpus=1", "critic.zero_stage=2", "critic.lr=1e-3",
                      "rl.prompts_per_step=8", "rl.group_size=2", "train.batch_size=16",
                      "train.micro_batch_size=8", "rl.value_clip=0.2", *lora)
    rng = random.Random(0)
    seqs = [([rng.randrange(3, 200) for _ in range(rng.randint(3, 9))],
             [rng.randrange(3, 200) for _ in range(rng.randint(2, 7))]) for _ in range(16)]
    mask = pad_tokens([[1.0] * len(r) for _, r in seqs])
    returns = pad_tokens([_target(r) for _, r in seqs], mask.shape[1])
    started = connect(cfg.cluster)
    critic = start_group("critic", Critic, cfg.critic, 30, (cfg,))
    try:
        setup_trainers(critic)
        ev = []
        for _ in range(12):
            values = pad_tokens(critic.run("values", seqs), mask.shape[1])
            ev.append(explained_variance(values, returns, mask))
            batch = RolloutBatch(seqs, mask, torch.zeros_like(mask), None, mask, mask,
                                 values, returns)
            stats = critic.run("critic_step", batch.split(2))
            assert all(s["samples"] == 8 for s in stats)
        # replicas hold one model: the same sequences get the same values on both
        a, b = critic.actors
        va, vb = ray.get([a.values.remote(seqs[:4]), b.values.remote(seqs[:4])])
        assert max(abs(x - y) for ra, rb in zip(va, vb) for x, y in zip(ra, rb)) < 1e-6

        def trained_and_all(actor) -> tuple[int, int]:  # runs in the actor (pickled by value)
            params = list(actor.engine.module.parameters())
            return (sum(p.numel() for p in params if p.requires_grad),
                    sum(p.numel() for p in params))
        trained, total = ray.get(a.__ray_call__.remote(trained_and_all))
    finally:
        stop_group(critic)
        if started:
            ray.shutdown()
    assert ev[0] < 0.05  # a zero-initialised head explains nothing at first
    assert ev[-1] > 0.8, ev
    # with LoRA only the adapters and the value head train
    assert (trained < 0.2 * total) if lora else (trained == total), (trained, total)
