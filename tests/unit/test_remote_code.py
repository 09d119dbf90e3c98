"""model.trust_remote_code: a family whose code ships with the checkpoint is refused at config
time without it, and every loader of the run's models takes the flag."""
from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import RunConfig, check_family
from orchestrator.schema import ConfigError

pytestmark = pytest.mark.unit

TINY = Path(__file__).resolve().parents[2] / "configs" / "dpo-tiny.yaml"


def test_shipped_code_is_refused_without_the_flag(shipped_model):
    with pytest.raises(ConfigError, match=r"model.path: .* 'rayalign_shipped' model whose code "
                                          r"ships with the checkpoint .*AutoModelForCausalLM.*"
                                          r"set model.trust_remote_code=true"):
        RunConfig.from_yaml(TINY, [f"model.path={shipped_model}"]).check_paths()
    check_family(shipped_model, trust_remote_code=True)  # (the data files come next)


def test_every_loader_runs_the_shipped_code_with_the_flag(shipped_model):
    from actors.critic import load_value_model
    from actors.rollout import RolloutSettings
    from actors.rollout_hf import HFRolloutEngine
    from actors.runtime import load_causal_lm, load_reward_model, load_tokenizer

    cfg = RunConfig.from_yaml(TINY, [f"model.path={shipped_model}", "model.trust_remote_code=true"])
    assert type(load_causal_lm(cfg.model, trainable=True)).__name__ == "ShippedForCausalLM"
    assert load_tokenizer(cfg.model.path, True).eos_token is not None
    assert type(load_reward_model(cfg.model, pad_id=0)).__name__ == \
        "ShippedForSequenceClassification"
    assert type(load_value_model(cfg.model.path, "float32", "sdpa", True)).__name__ == \
        "ShippedForTokenClassification"
    engine = HFRolloutEngine(0, 1, RolloutSettings(str(shipped_model), backend="hf",
                                                   max_model_len=64, trust_remote_code=True))
    assert engine.generate([[1, 2, 3]], {"max_new_tokens": 2, "seed": 0})[0].response_ids

    without = RunConfig.from_yaml(TINY, [f"model.path={shipped_model}"])
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_causal_lm(without.model, trainable=True)
