"""PPO's pieces outside the actors: config rules for the critic and colocation, merged
placement requests, the GAE path of the loop's advantage step, replica stat merging, and the
value model's position alignment."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.config import RunConfig
from orchestrator.metrics import combine_replicas
from orchestrator.roles import hosts, merged_requests
from orchestrator.schema import ConfigError

pytestmark = pytest.mark.unit

GRPO = Path(__file__).resolve().parents[2] / "configs" / "grpo-tiny.yaml"


def ppo(*overrides: str) -> RunConfig:
    return RunConfig.from_yaml(GRPO, ["algorithm=ppo", *overrides])


def error_for(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        ppo(*overrides)
    return str(info.value)


# ---- config --------------------------------------------------------------------------------
def test_ppo_has_a_critic_role_and_grpo_not():
    assert ppo().roles() == ["rollout", "policy", "critic", "reference", "reward"]
    assert "critic" not in RunConfig.from_yaml(GRPO).roles()


def test_batch_must_split_over_critic_actors():
    msg = error_for("critic.actors=3")
    assert "critic.actors=3" in msg and "train.batch_size" in msg


def test_critic_micro_batch_must_divide_its_share():
    msg = error_for("critic.actors=2", "train.batch_size=64", "train.micro_batch_size=12",
                    "policy.actors=1")
    assert "train.micro_batch_size" in msg


def test_colocation_needs_equal_replica_counts():
    msg = error_for("reference.colocate_with=policy", "reference.actors=2")
    assert msg.startswith("reference.actors") and "policy.actors=1" in msg


def test_colocation_with_a_role_the_run_lacks():
    with pytest.raises(ConfigError, match="reward.colocate_with.*'critic' is not a role"):
        RunConfig.from_yaml(GRPO, ["reward.colocate_with=critic"])


def test_colocation_choices_are_checked():
    msg = error_for("reference.colocate_with=rollout")
    assert "reference.colocate_with" in msg and "policy" in msg


def test_critic_model_path_must_be_a_model_dir(tmp_path):
    cfg = ppo(f"critic.model_path={tmp_path}", f"model.path={tmp_path}")
    with pytest.raises(ConfigError, match="critic.model_path"):
        cfg.check_paths()


# ---- placement -----------------------------------------------------------------------------
def test_colocated_roles_share_one_bundle_with_summed_resources():
    cfg = ppo("reference.colocate_with=policy", "reward.colocate_with=critic",
              "policy.cpus=2", "policy.gpus=0.5", "reference.cpus=1", "reference.gpus=0.25",
              "critic.cpus=1", "reward.cpus=0.5", "rollout.gpus=1")
    names = cfg.roles()
    assert hosts(cfg, names) == {"rollout": "rollout", "policy": "policy", "critic": "critic",
                                 "reference": "policy", "reward": "critic"}
    req = merged_requests(cfg, names)
    assert sorted(req) == ["critic", "policy", "rollout"]
    assert req["policy"].role == "policy+reference"
    assert req["policy"].bundle() == {"CPU": 3.0, "GPU": 0.75}
    assert req["critic"].bundle() == {"CPU": 1.5}


def test_without_colocation_every_role_has_its_own_request():
    cfg = ppo()
    assert sorted(merged_requests(cfg, cfg.roles())) == sorted(cfg.roles())


# ---- the loop's advantage step ----------------------------------------------------------------
def test_ppo_uses_gae_with_the_critic_values():
    from orchestrator.advantages import gae
    from orchestrator.rl_loop import _advantages
    cfg = ppo("rl.whiten=false", "rl.lam=0.9", "rl.gamma=1.0", "rl.kl_coef=0.0")
    rewards = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, -0.2, 9.0]])
    adv, ret = _advantages(cfg, rewards, mask, None, values)
    # row 0 by hand: deltas (0.2-0.5, 0.1-0.2, 1-0.1) = (-0.3, -0.1, 0.9)
    a2 = 0.9
    a1 = -0.1 + 0.9 * a2
    a0 = -0.3 + 0.9 * a1
    torch.testing.assert_close(adv[0], torch.tensor([a0, a1, a2]))
    torch.testing.assert_close(ret[0], torch.tensor([a0 + 0.5, a1 + 0.2, a2 + 0.1]))
    ref_adv, _ = gae(token_rewards=torch.tensor([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]),
                     values=values, mask=mask, gamma=1.0, lam=0.9)
    torch.testing.assert_close(adv[1, :2], ref_adv[1, :2])


def test_critic_free_algorithms_return_no_value_targets():
    from orchestrator.rl_loop import _advantages
    cfg = RunConfig.from_yaml(GRPO, ["rl.group_size=2", "rl.prompts_per_step=1",
                                     "train.batch_size=2", "train.micro_batch_size=2"])
    adv, ret = _advantages(cfg, torch.tensor([1.0, 0.0]), torch.ones(2, 3, dtype=torch.bool),
                           None, None)
    assert ret is None and adv[0, 0] > 0 > adv[1, 0]


# ---- replica stats ---------------------------------------------------------------------------
def test_combine_replicas_means_sums_and_shared_values():
    parts = [{"samples": 2, "loss": 3.0, "tokens": 10, "lr": 0.1},
             {"samples": 6, "loss": 5.0, "tokens": 30, "lr": 0.1}]
    out = combine_replicas(parts, "samples", same=("lr",), totals=("tokens",))
    assert out == {"loss": 1.0, "lr": 0.1, "tokens": 40, "samples": 8}


# ---- the value model ---------------------------------------------------------------------------
def test_value_model_starts_at_zero_and_reads_the_predicting_positions(tmp_path):
    from actors.critic import load_value_model, token_values
    from actors.logprobs import build_inputs
    from orchestrator.tiny_model import build_model
    path = build_model(tmp_path / "m", "tiny", seed=0)
    model = load_value_model(str(path), "float32", "sdpa")
    assert torch.count_nonzero(model.score.weight) == 0
    torch.nn.init.normal_(model.score.weight)  # give the head something to say
    seqs = [([5, 6, 7], [8, 9]), ([10, 11], [12, 13, 14]), ([4], [3])]
    packed = token_values(model, build_inputs(seqs, pack=True))
    padded = token_values(model, build_inputs(seqs, pack=False))
    torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-5)
    # sequence 1 alone: its values are the outputs at positions 1, 2, 3 (each predicts the
    # next token: 12, 13, 14)
    full = model(input_ids=torch.tensor([[10, 11, 12, 13, 14]])).logits[0, :, 0]
    torch.testing.assert_close(packed[2:5], full[1:4], rtol=1e-4, atol=1e-5)


def test_value_model_from_a_reward_model_keeps_its_score_head(tmp_path):
    from safetensors.torch import load_file

    from actors.critic import load_value_model
    from orchestrator.reward_model import build_reward_model
    path = build_reward_model(tmp_path / "rm", "tiny", seed=3)
    model = load_value_model(str(path), "float32", "sdpa")
    saved = load_file(str(path / "model.safetensors"))
    torch.testing.assert_close(model.score.weight, saved["score.weight"])
    if model.score.bias is not None:  # the classifier has no bias; a new one starts at zero
        assert torch.count_nonzero(model.score.bias) == 0


# ---- old log-probs: when the loop computes them --------------------------------------------
@pytest.mark.parametrize("overrides, needed", [
    ((), False),                                   # one epoch, one optimizer step, KL in the loss
    (("rl.async_rollout=true",), False),           # async: the trainer's policy is still the old
    (("rl.epochs=2",), True),                      # the second epoch needs the first's start
    (("train.batch_size=32", "train.micro_batch_size=16"), True),  # two optimizer steps
    (("rl.kl_mode=reward",), True),                # the penalty enters the rewards first
    (("rl.kl_mode=reward", "rl.kl_coef=0"), False),
])
def test_old_logprobs_forward_only_when_the_update_cannot_give_them(overrides, needed):
    from orchestrator.rl_loop import needs_old_logprobs
    cfg = RunConfig.from_yaml(GRPO, ["algorithm=grpo", *overrides])
    assert needs_old_logprobs(cfg) is needed
