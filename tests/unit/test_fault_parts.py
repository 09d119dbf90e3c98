"""The parts that make failures loud, checked without a cluster: the cause read off Ray's
death message, the NCCL path's config and environment rules, the sender's plan check before
the first byte, and an engine that refuses to serve after a failed weight update."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from actors.group import RoleFailure, death_cause
from actors.rollout import RolloutEngine, RolloutSettings
from actors.rollout_hf import HFRolloutEngine
from actors.weight_sync import WeightSyncError, describe
from actors.weight_sync_nccl import check_plan, send
from orchestrator.config import RunConfig, RoleConfig
from orchestrator.roles import _env
from orchestrator.schema import ConfigError
from orchestrator.tiny_model import build_model

pytestmark = pytest.mark.unit
GRPO = Path(__file__).resolve().parents[2] / "configs" / "grpo-tiny.yaml"

KILLED = ("The actor died unexpectedly before finishing this task.\n\tclass_name: RewardScorer\n"
          "\tpid: 4242\nThe actor is dead because its worker process has died. Worker exit type: "
          "SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error "
          "code 2. End of file. There are some potential root causes. (1) The process is killed "
          "by SIGKILL by OOM killer due to high memory usage.")


def test_death_cause_reads_the_exit_detail_not_ray_s_list_of_guesses():
    assert death_cause(RuntimeError(KILLED)) == (
        "process died (Worker unexpectedly exits with a connection error code 2. End of file)")
    assert death_cause(RuntimeError("Task was killed due to the node running low on memory.")) \
        == "killed for lack of memory (OOM)"
    assert death_cause(RuntimeError("gone")) == "process died"
    f = RoleFailure("reward", 0, "10.0.0.2", 4242, "process died", "score")
    assert str(f) == "role reward rank 0 (node 10.0.0.2, pid 4242): process died, during score"


def test_engines_on_gpu_take_whole_gpus():
    base = ["rollout.gpus=0.5", "policy.gpus=1"]
    with pytest.raises(ConfigError, match="rollout.gpus: 0.5; .*NCCL group.*whole GPUs"):
        RunConfig.from_yaml(GRPO, base)
    RunConfig.from_yaml(GRPO, ["rollout.gpus=1", "policy.gpus=1"])


def test_nccl_settings_reach_gpu_actors_only(monkeypatch):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth1")
    monkeypatch.setenv("NCCL_IB_HCA", "mlx5_0")
    assert _env(RoleConfig(gpus=1)) == {"NCCL_SOCKET_IFNAME": "eth1", "NCCL_IB_HCA": "mlx5_0"}
    assert _env(RoleConfig(gpus=0)) == {"DS_ACCELERATOR": "cpu"}


def model():
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def test_the_plan_is_checked_before_the_first_byte():
    net = model()
    own = describe(net).payload()
    check_plan(own, describe(net, exclude=("1.",)).payload())  # a partial sync is fine
    bad_shape = dict(own, shapes=[[9, 9]] + own["shapes"][1:])
    unknown = dict(own, names=["2.weight"] + own["names"][1:])
    reordered = dict(own, names=own["names"][::-1], dtype_names=own["dtype_names"][::-1],
                     shapes=own["shapes"][::-1])
    short = dict(own, shapes=own["shapes"][:-1])
    for plan, message in ((bad_shape, r"0.weight is float32 \[3, 4\] in the trainer, the update "
                                      r"says float32 \[9, 9\]"),
                          (unknown, "'2.weight', is not a parameter"),
                          (reordered, "repeated or out of the trainer's parameter order"),
                          (short, "4 names, 4 dtypes and 3 shapes")):
        sent = []
        group = SimpleNamespace(broadcast=lambda *a, **k: sent.append(a))
        with pytest.raises(WeightSyncError, match=message):
            send(iter(net.named_parameters()), plan, group, 1 << 20, own)
        assert not sent  # nothing went out


class StandInLLM:
    """vLLM's LLM as far as update_weights uses it, with an update that breaks off."""

    def __init__(self):
        self.calls = []

    def collective_rpc(self, method, args=()):
        self.calls.append(method)
        if method == "update_weights":
            raise RuntimeError("connection reset by peer")
        return [{}]

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")


def test_a_failed_update_is_not_finished_and_the_engine_refuses_to_serve():
    engine = RolloutEngine.__new__(RolloutEngine)  # the engine's own methods, no vLLM start
    engine.rank, engine.settings = 3, RolloutSettings("m", weight_backend="rayalign_gloo")
    engine.llm = StandInLLM()
    with pytest.raises(WeightSyncError, match="rollout engine 3: weight update failed part way.*"
                                              "connection reset by peer"):
        engine.update_weights({"names": []})
    assert engine.llm.calls == ["start_weight_update", "update_weights"]  # no finish
    with pytest.raises(WeightSyncError, match="serves no more calls"):
        engine.generate([[1, 2]], {"max_new_tokens": 2})
    with pytest.raises(WeightSyncError, match="serves no more calls"):
        engine.update_weights({"names": []})


def test_hf_engine_refuses_to_serve_after_a_broken_transfer(tmp_path):
    path = build_model(tmp_path / "model", "tiny", seed=0)
    engine = HFRolloutEngine(0, 1, RolloutSettings(str(path), max_model_len=64, backend="hf"))
    assert engine.generate([[5, 6]], {"max_new_tokens": 2})  # serves
    info = describe(torch.nn.Linear(2, 2)).payload()  # no group joined: the receive fails
    with pytest.raises(WeightSyncError, match="weight update failed part way"):
        engine.update_weights(info)
    with pytest.raises(WeightSyncError, match="serves no more calls"):
        engine.generate([[5, 6]], {"max_new_tokens": 2})


def test_an_nccl_engine_refuses_an_update_that_leaves_part_of_its_checkpoint_out(tmp_path):
    from transformers import AutoModelForCausalLM
    path = build_model(tmp_path / "model", "tiny", seed=0)
    net = AutoModelForCausalLM.from_pretrained(path)
    engine = RolloutEngine.__new__(RolloutEngine)
    engine.rank, engine.settings = 1, RolloutSettings(str(path), weight_backend="nccl")
    engine.check_update(describe(net).payload())  # the whole model: fine
    with pytest.raises(WeightSyncError, match=r"rollout engine 1: the update would leave 2 "
                                              r"parameter\(s\) of its checkpoint out: "
                                              r"model.layers.1.mlp.down_proj.weight"):
        engine.check_update(describe(net, exclude=("model.layers.1.mlp.down",
                                                   "model.layers.1.mlp.up")).payload())
    engine.settings = RolloutSettings(str(path), weight_backend="rayalign_gloo")
    engine.check_update(describe(net, exclude=("model.layers.1.",)).payload())  # counted later


def test_fault_inject_names_roles_and_steps():
    cfg = RunConfig.from_yaml(GRPO, ["fault.inject=reward@3, rollout@5,policy:0@6"])
    assert cfg.fault.injections() == [("reward", 0, 3), ("rollout", 0, 5), ("policy", 0, 6)]
    with pytest.raises(ConfigError, match="fault.inject: 'critic' is not a role of algorithm"):
        RunConfig.from_yaml(GRPO, ["fault.inject=critic@2"])
    with pytest.raises(ConfigError, match="fault.inject: 'reward@x' must look like role@step"):
        RunConfig.from_yaml(GRPO, ["fault.inject=reward@x"])
    with pytest.raises(ConfigError, match="must look like role@step or role:rank@step"):
        RunConfig.from_yaml(GRPO, ["fault.inject=policy:one@2"])
    with pytest.raises(ConfigError, match=r"fault.inject: policy has no rank 1 \(policy.actors=1\)"):
        RunConfig.from_yaml(GRPO, ["fault.inject=policy:1@2"])
    with pytest.raises(ConfigError, match="reward.on_failure: 'drop' is for reward.kind 'http'"):
        RunConfig.from_yaml(GRPO, ["reward.on_failure=drop"])


def test_recovery_replaces_up_to_the_budget():
    from orchestrator.recovery import Recovery
    replaced = []
    roles = SimpleNamespace(replace=lambda role, failure: replaced.append(role),
                            trainables=[SimpleNamespace(role="policy")])
    cfg = RunConfig.from_yaml(GRPO, ["fault.max_restarts=1"])
    recovery = Recovery(cfg, roles)
    dead = RoleFailure("reward", 0, "n", 7, "process died", "score")
    recovery.recover(dead, step=4)
    assert replaced == ["reward"]
    made = recovery.pop(4)
    assert made["recovery"][0] | {"seconds": 0} == {"role": "reward", "rank": 0, "step": 4,
                                                    "cause": "process died", "seconds": 0}
    assert recovery.pop(5) == {}
    with pytest.raises(RoleFailure, match=r"1 replacement\(s\) \(fault.max_restarts\) are spent"):
        recovery.recover(dead, step=5)


class FakeSession:
    """What a trainer recovery asks of the run session: where to go back to, and going there."""

    def __init__(self, ckpt):
        self.ckpt, self.calls = ckpt, []

    def rewind_point(self):
        return self.ckpt

    def rewind(self, ckpt, trainables, sampler):
        self.calls.append((ckpt, [g.role for g in trainables], sampler))
        return 4 if ckpt else 0


@pytest.mark.parametrize("ckpt", ["ckpt-4", None])
def test_a_lost_trainer_rank_rebuilds_its_role_and_rewinds(ckpt):
    from orchestrator.recovery import Recovery, Rewound
    rebuilt = []
    trainables = [SimpleNamespace(role="policy"), SimpleNamespace(role="critic")]
    roles = SimpleNamespace(trainables=trainables, replace=lambda role, failure: None,
                            replace_trainers=lambda names, method: rebuilt.append((names, method)))
    session = FakeSession(ckpt)
    recovery = Recovery(RunConfig.from_yaml(GRPO, ["fault.max_restarts=1"]), roles, session,
                        "sampler")
    recovery.recover(RoleFailure("reward", 0, "n", 3, "process died", "score"), step=6)
    assert recovery.pop(6)["recovery"][0]["role"] == "reward"
    rebuilt.clear()
    lost = RoleFailure("critic", 1, "n", 8, "process died", "critic_step")
    with pytest.raises(Rewound) as back:
        with recovery.trainers(step=7):
            raise lost
    # with a checkpoint only the lost role is rebuilt; without one every trainer starts over
    assert rebuilt == [(["critic"] if ckpt else ["policy", "critic"], "critic_step")]
    assert back.value.step == (4 if ckpt else 0)
    assert session.calls == [(ckpt, ["policy", "critic"], "sampler")]
    # step 6's row, which recorded the reward's replacement, is gone with the rewind: the
    # record moves on to the next row
    carried, record = recovery.pop(5)["recovery"]
    assert carried["role"] == "reward" and carried["step"] == 6
    assert (record["role"], record["rank"], record["step"], record["rewound_to"]) == \
        ("critic", 1, 7, back.value.step)
    with pytest.raises(RoleFailure, match="are spent"):
        with recovery.trainers(step=5):
            raise lost
    # other roles' failures pass through the trainers' guard untouched
    other = RoleFailure("reward", 0, "n", 9, "process died", "score")
    with pytest.raises(RoleFailure) as err:
        with recovery.trainers(step=5):
            raise other
    assert err.value is other


def test_drop_failed_leaves_out_whole_groups_of_a_failed_reward():
    from actors.reward import RewardError
    from actors.rollout import RolloutSample
    from orchestrator.rollouts import Rollout, Scores, drop_failed
    prompts = [SimpleNamespace(row=r) for r in (11, 12, 13)]
    samples = [RolloutSample([1, 2], [5] * (i + 1), [-0.5] * (i + 1), "stop") for i in range(6)]
    ro = Rollout(prompts, {}, [], samples)
    per_token = [[0.1] * (i + 1) for i in range(6)]
    nan = float("nan")
    scored = Scores(torch.tensor([1.0, 2.0, 3.0, nan, 5.0, 6.0]), per_token, None, per_token)
    kept, scores, dropped = drop_failed(ro, scored, group=2, step=3)
    assert dropped == [12]  # the group of sample 3: samples 2 and 3
    assert [s.finish_reason for s in kept.samples] == ["stop", "stop", "dropped", "dropped",
                                                       "stop", "stop"]
    assert kept.samples[2].response_ids == [] and kept.samples[3].logprobs == []
    assert scores.rewards.tolist() == [1.0, 2.0, 0.0, 0.0, 5.0, 6.0]
    assert scores.reference[2] == [] and scores.values[3] == [] and scores.old is None
    assert ro.samples[2].response_ids == [5, 5, 5] and per_token[2] == [0.1] * 3  # not mutated
    # the metrics average the kept samples only and name the dropped rows
    from orchestrator.rl_loop import step_metrics
    row = step_metrics(kept, scores.rewards, 2, dropped)
    assert row["batch/rows"] == [11, 13] and row["batch/dropped_rows"] == [12]
    assert row["reward/dropped"] == 2 and row["reward/mean"] == pytest.approx(3.5)
    clean = Scores(torch.tensor([1.0] * 6), per_token, None, None)
    assert drop_failed(ro, clean, 2, 3) == (ro, clean, [])
    everything = Scores(torch.tensor([nan, 1, nan, 1, 1, nan]), per_token, None, None)
    with pytest.raises(RewardError, match="step 3: the reward endpoint failed for a sample of "
                                          "every prompt"):
        drop_failed(ro, everything, 2, 3)


def test_fault_enabled_false_replaces_nothing():
    from orchestrator.recovery import Recovery
    cfg = RunConfig.from_yaml(GRPO, ["fault.enabled=false"])
    recovery = Recovery(cfg, SimpleNamespace(trainables=[], replace=None))
    with pytest.raises(RoleFailure, match="no replacements in place"):
        recovery.recover(RoleFailure("reward", 0, "n", 7, "process died", "score"), step=2)


def test_hybrid_engine_config():
    """rollout.colocate_with: policy starts no rollout role, with either backend (vLLM's
    rules: tests/unit/test_hybrid_vllm_parts.py)."""
    for backend in ("hf", "vllm"):
        cfg = RunConfig.from_yaml(GRPO, ["rollout.colocate_with=policy",
                                         f"rollout.backend={backend}"])
        assert cfg.hybrid and "rollout" not in cfg.roles()
    assert not RunConfig.from_yaml(GRPO, ["rollout.backend=hf"]).hybrid


def test_run_in_chunks_keeps_order_and_quiet_off_a_terminal(capsys):
    from orchestrator.progress import run_in_chunks, shown
    calls = []

    class Group:
        def __len__(self):
            return 2

        def run(self, method, items):
            calls.append(len(items))
            return [f"{method}:{x}" for x in items]

    cfg = RunConfig.from_yaml(GRPO)
    got = run_in_chunks(cfg, Group(), "logprobs", list(range(11)), "reference", "pair",
                        per_replica=3)
    # the last piece is padded to a multiple of the replicas (ZeRO-3), its padding dropped
    assert got == [f"logprobs:{i}" for i in range(11)] and calls == [6, 6]
    assert not shown(cfg)  # pytest's stderr is not a terminal
    assert capsys.readouterr().err == ""


def test_reward_auth_env_must_be_set_where_the_run_starts(monkeypatch):
    http = ["reward.kind=http", "reward.function=null", "reward.url=https://rm.example/score",
            "reward.auth_env=RM_TOKEN"]
    monkeypatch.delenv("RM_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="reward.auth_env: the environment variable RM_TOKEN "
                                          "is not set here"):
        RunConfig.from_yaml(GRPO, http)
    monkeypatch.setenv("RM_TOKEN", "Bearer x")
    cfg = RunConfig.from_yaml(GRPO, http)
    assert "Bearer" not in str(cfg.to_dict())  # the config (and config.yaml) holds the name only



def test_sync_names_are_the_checkpoint_names(tmp_path):
    """GPT-NeoX's head is lm_head in transformers 5's module but embed_out in its checkpoint,
    which is what an engine loads: the sync sends the checkpoint's name."""
    from transformers import AutoModelForCausalLM

    from actors.weight_sync import checkpoint_namer, full_parameters
    from orchestrator.tiny_model import build_model
    model = AutoModelForCausalLM.from_pretrained(build_model(tmp_path / "m", "tiny",
                                                             arch="gpt_neox"))
    info = describe(model)
    assert "embed_out.weight" in info.names and "lm_head.weight" not in info.names
    assert [n for n, _ in full_parameters(model, zero3=False)] == info.names
    assert checkpoint_namer(model)("gpt_neox.layers.0.attention.query_key_value.weight") == \
        "gpt_neox.layers.0.attention.query_key_value.weight"


def test_a_family_that_converts_tensors_is_refused(tmp_path):
    import json
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    from orchestrator.config import check_family
    with pytest.raises(ConfigError, match="a 'mixtral' model, whose tensors transformers converts "
                                          "on load .* does not support this family"):
        check_family(tmp_path)


@pytest.mark.parametrize("extra, allowed, cause", [
    ({"sliding_window": 4096}, True, None),                  # Mistral 7B v0.1: never cuts
    ({"sliding_window": 64, "use_sliding_window": False}, True, None),  # Qwen2's switch off
    ({"sliding_window": 64}, False, "sliding window of 64 tokens"),
    ({"attention_dropout": 0.1}, False, "attention_dropout 0.1"),
    ({"attn_logit_softcapping": 50.0}, False, "attn_logit_softcapping"),
])
def test_varlen_refuses_attention_it_cannot_run_before_any_actor(tmp_path, extra, allowed,
                                                                 cause):
    """A model whose attention would send a row with shared prompts to transformers' mask
    (wrong log-probs) is refused at config time, naming the cause and the fix."""
    import json
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral", **extra}))
    base = {"algorithm": "dpo", "model": {"path": str(tmp_path)},
            "data": {"max_length": 512, "train": str(tmp_path / "train.jsonl")}}
    for overrides in ([], ["model.attn_implementation=sdpa"]):
        cfg = RunConfig.from_dict(base, overrides)
        if allowed or overrides:  # sdpa pads each sequence: every family runs
            cfg._check_varlen(tmp_path)
            continue
        with pytest.raises(ConfigError, match=f"varlen cannot run .*{cause}.*"
                                              f"model.attn_implementation=sdpa"):
            cfg._check_varlen(tmp_path)
