"""The evaluation every arm of ``rayalign compare`` gets, the same for all: samples of its final
policy on the held-out prompts with one set of sampling settings and one seed per run seed,
scored by the gold reward (evaluation only), the proxy (the trained reward model, when the
comparison has one), and the KL of the policy to the model the arm started from.

KL(policy || reference) is estimated from the samples: for responses y drawn from the policy
at temperature 1, the mean over samples of sum_t log pi(y_t | ...) - log ref(y_t | ...) (per
sequence, in nats). At another temperature the samples do not come from pi and the figure
is that estimator on them, not the KL; the report states the temperature.

The models run in this process with transformers (the ``hf`` rollout engine's sampling and
log-probs, the reward role's model scorer), so that evaluating an arm holds no actors.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from statistics import mean

log = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    prompts: str                 # held-out prompt file
    num_prompts: int = 64        # its first rows used
    samples_per_prompt: int = 1
    temperature: float = 1.0
    max_new_tokens: int = 32
    max_model_len: int = 512
    prompt_key: str = "prompt"
    gold: str | None = None      # module:function scoring (prompt, response) strings
    cpus: float = 1.0            # torch threads
    trust_remote_code: bool = False  # run the modelling code the checkpoints ship


def evaluate_policy(model_dir: str, reference_dir: str, reward_model_dir: str | None,
                    settings: EvalSettings, seed: int) -> dict:
    """Gold and proxy reward, KL to the reference and the gold reward per prompt (for win
    rates) of ``model_dir``'s samples; see the module docstring."""
    from actors.reward import ModelReward, RewardSample
    from actors.rollout import RolloutSettings
    from actors.rollout_hf import HFRolloutEngine
    from actors.runtime import load_tokenizer
    from orchestrator.data import load_prompts
    from orchestrator.evaluate import load_reward_fn

    s = settings
    tokenizer = load_tokenizer(reference_dir, s.trust_remote_code)
    prompts = load_prompts(s.prompts, tokenizer, s.max_model_len - s.max_new_tokens, "skip",
                           s.prompt_key)[0][:s.num_prompts]

    def engine(path: str) -> HFRolloutEngine:
        return HFRolloutEngine(0, 1, RolloutSettings(model_path=path, backend="hf", cpus=s.cpus,
                                                     max_model_len=s.max_model_len,
                                                     weight_sync=False,
                                                     trust_remote_code=s.trust_remote_code))

    samples = engine(model_dir).generate(
        [p.prompt_ids for p in prompts],
        dict(n=s.samples_per_prompt, temperature=s.temperature, max_new_tokens=s.max_new_tokens,
             seed=seed))
    ref = engine(reference_dir).logprobs([(x.prompt_ids, x.response_ids) for x in samples])
    kl = [sum(x.logprobs) - sum(r) for x, r in zip(samples, ref)]
    texts = tokenizer.batch_decode([x.response_ids for x in samples], skip_special_tokens=True)
    owner = [prompts[i // s.samples_per_prompt] for i in range(len(samples))]
    out = {"kl": mean(kl), "response_tokens": mean(len(x.response_ids) for x in samples),
           "samples": len(samples), "sample": texts[0]}
    gold_fn = load_reward_fn(s.gold)
    if gold_fn is not None:
        gold = [float(gold_fn(p.prompt_text, t)) for p, t in zip(owner, texts)]
        k = s.samples_per_prompt
        out.update(gold_reward=mean(gold),
                   gold_per_prompt=[mean(gold[i:i + k]) for i in range(0, len(gold), k)])
    if reward_model_dir:
        scorer = ModelReward(reward_model_dir, micro_batch=32, dtype="float32", device="cpu",
                             trust_remote_code=s.trust_remote_code)
        out["proxy_reward"] = mean(scorer.score(
            [RewardSample(p.prompt_text, t, p.extra) for p, t in zip(owner, texts)]))
    return out


def win_rate(arm: list[float], baseline: list[float]) -> float:
    """Share of prompts where the arm's gold reward beats the baseline's (a tie: half)."""
    if len(arm) != len(baseline) or not arm:
        raise ValueError(f"win rate over {len(arm)} against {len(baseline)} prompts")
    return mean(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(arm, baseline))

