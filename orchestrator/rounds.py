"""Iterative DPO by rounds (``algorithm: online_dpo`` with ``rl.rounds: N``), as pipeline stages.

Where online DPO takes a preference step on every step's own samples, iterative DPO works in
rounds: sample a whole preference set with the current policy, label it with the reward role,
train offline DPO on it, repeat from the model that round trained. A config with
``rl.rounds: N`` becomes 2N pipeline stages of two kinds that exist already or are one call:

    <name>_r1_pairs   the rollout and reward roles: ``rl.group_size`` samples for each of the
                      round's prompts, the best and worst by reward as a pair (ties dropped,
                      counted) -> <run_dir>/<name>_r1_pairs/pairs.jsonl (text rows)
    <name>_r1         ``algorithm: dpo`` on that file from the round's starting model (its
                      reference too), ``train.max_steps / N`` steps
    <name>_r2_pairs   as r1, sampling with <name>_r1's model ... and so on

A round's prompts are the next ``train.batch_size x max_steps / N`` rows of ``data.train`` in a
seeded order (one pair per prompt at most, so about one epoch of pairs per round). Re-running
skips finished rounds like any pipeline stage. The last round's model is the output that a
later stage's ``from: <name>`` reads. ``rayalign train`` (and a ``rayalign compare`` arm) runs
such a config as these stages under its run dir, named ``dpo_r1_pairs``, ``dpo_r1``, ...
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from pathlib import Path

log = logging.getLogger(__name__)

PAIRS = "pairs.jsonl"
DONE = "pairs.done.json"


def round_configs(cfg, root: Path, name: str) -> list[tuple[str, str, object]]:
    """(stage name, kind "pairs" or "train", config) for every round, in order."""
    rounds, out, model = cfg.rl.rounds, [], cfg.model.path
    steps = cfg.train.max_steps // rounds
    for i in range(1, rounds + 1):
        pairs_dir = root / f"{name}_r{i}_pairs"
        sample = dataclasses.replace(
            cfg, run_dir=str(pairs_dir), model=dataclasses.replace(cfg.model, path=model),
            train=dataclasses.replace(cfg.train, max_steps=steps))
        train_dir = root / f"{name}_r{i}"
        dpo = dataclasses.replace(
            cfg, algorithm="dpo", run_dir=str(train_dir),
            model=dataclasses.replace(cfg.model, path=model),
            data=dataclasses.replace(cfg.data, train=str(pairs_dir / PAIRS), prompt_key="prompt",
                                     chosen_key="chosen", rejected_key="rejected"),
            train=dataclasses.replace(cfg.train, max_steps=steps),
            rl=dataclasses.replace(cfg.rl, rounds=0))
        dpo.check()
        out += [(f"{name}_r{i}_pairs", "pairs", sample), (f"{name}_r{i}", "train", dpo)]
        model = str(train_dir / "checkpoints" / f"step-{steps:07d}" / "model")
    return out


def round_index(cfg) -> int:
    """Which round a pairs stage's run dir is for (``..._r<i>_pairs``), from 1."""
    return int(Path(cfg.run_dir).name.rsplit("_r", 1)[1].split("_")[0])


def make_pairs(cfg) -> dict:
    """Sample, label and pair one round's prompts (see the module docstring); writes
    ``pairs.jsonl`` and a record of counts in the stage's run dir, returns the record (and
    the roles' usage, ActorGroup.usage)."""
    from actors.reward import RewardSample, RewardScorer
    from actors.runtime import load_tokenizer
    from orchestrator.data import load_prompts, read_rows
    from orchestrator.online_pairs import best_worst
    from orchestrator.roles import reward_settings, start_group, start_rollout, stop_group

    out = Path(cfg.run_dir)
    rl, i = cfg.rl, round_index(cfg)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    prompts = load_prompts(cfg.data.train, tokenizer, cfg.rollout.max_model_len - rl.max_new_tokens,
                           cfg.data.on_bad_row, cfg.data.prompt_key)[0]
    order = list(range(len(prompts)))
    random.Random(cfg.train.seed).shuffle(order)
    per_round = cfg.train.batch_size * cfg.train.max_steps
    todo = [prompts[order[(j + (i - 1) * per_round) % len(order)]] for j in range(per_round)]
    raw = {n: row.get(cfg.data.prompt_key) for n, row in read_rows(cfg.data.train)
           if isinstance(row, dict)}
    timeout = cfg.cluster.placement_timeout_s
    rollout = start_rollout(cfg.model, cfg.rollout, timeout, cfg.cluster)
    reward = None
    try:
        reward = start_group("reward", RewardScorer, cfg.reward, timeout, (reward_settings(cfg),),
                             cfg.cluster)
        samples = rollout.run("generate", [p.prompt_ids for p in todo],
                              dict(n=rl.group_size, temperature=rl.temperature, top_p=rl.top_p,
                                   top_k=rl.top_k, max_new_tokens=rl.max_new_tokens,
                                   seed=cfg.train.seed + 7919 * i))
        texts = tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        k = rl.group_size
        scores = reward.run("score", [RewardSample(todo[j // k].prompt_text, t, todo[j // k].extra,
                                                   index=j) for j, t in enumerate(texts)])
    finally:
        stop_group(rollout)
        if reward is not None:
            stop_group(reward)
    # a response empty as text (EOS at once) cannot be a row of a preference file: left out,
    # as is one the reward endpoint failed to score (NaN, reward.on_failure: drop)
    usable = [s.finish_reason != "skipped" and t.strip() != "" and not math.isnan(x)
              for s, t, x in zip(samples, texts, scores)]
    scored = [x for x in scores if not math.isnan(x)]
    rows = []
    for g, pick in enumerate(best_worst(scores, k, usable)):
        if pick is not None:
            c, r = g * k + pick[0], g * k + pick[1]
            rows.append({"prompt": raw.get(todo[g].row, todo[g].prompt_text), "chosen": texts[c],
                         "rejected": texts[r], "reward_chosen": scores[c],
                         "reward_rejected": scores[r], "source_row": todo[g].row})
    if not rows:
        raise RuntimeError(f"{out}: round {i}: every prompt's {k} samples scored alike; no "
                           f"pairs to train on (raise rl.group_size or rl.temperature)")
    out.mkdir(parents=True, exist_ok=True)
    (out / PAIRS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = {"round": i, "prompts": len(todo), "pairs": len(rows), "ties": len(todo) - len(rows),
              "empty_responses": usable.count(False) - (len(scores) - len(scored)),
              "reward_dropped": len(scores) - len(scored),
              "reward_chosen": sum(r["reward_chosen"] for r in rows) / len(rows),
              "reward_rejected": sum(r["reward_rejected"] for r in rows) / len(rows),
              "reward_mean": sum(scored) / max(1, len(scored))}
    (out / DONE).write_text(json.dumps(record, indent=1))
    record["usage"] = {g.role: g.usage() for g in (rollout, reward)}
    log.info("round %d: %d pairs from %d prompts (%d ties), reward of samples %.3f", i,
             len(rows), len(todo), record["ties"], record["reward_mean"])
    return record
