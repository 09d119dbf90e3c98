"""Recovery of a trainer rank in place (kill -9 through ``fault.inject``): the role's world is
rebuilt from the newest checkpoint and the steps after it are trained again, so the run
completes without a restart, its ledger holds every step once, and it ends with the weights of
an uninterrupted run. DPO with two ZeRO-2 ranks loses one; a PPO run loses a replica of every
one of its five roles, policy and critic included."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from orchestrator import RunConfig, train

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("shared_ray")]


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steps(run_dir) -> dict[int, dict]:
    rows = [r for r in lines(run_dir / "metrics.jsonl") if "timing/step" in r]
    assert len(rows) == len({r["step"] for r in rows}), "a step logged twice"
    return {r["step"]: r for r in rows}


def same_weights(a_dir, b_dir, tol: float) -> float:
    a = load_file(str(a_dir / "model.safetensors"))
    b = load_file(str(b_dir / "model.safetensors"))
    gap = max((a[k] - b[k]).abs().max().item() for k in a)
    assert gap < tol, gap
    return gap


def recoveries(run_dir) -> list[dict]:
    return [dict(x, logged_at=s) for s, r in sorted(steps(run_dir).items())
            for x in r.get("recovery", [])]


def test_dpo_loses_a_rank_and_ends_as_an_uninterrupted_run(make_config, tmp_path):
    args = ("train.max_steps=8", "checkpoint.every=3", "eval.reward_fn=null", "eval.max_pairs=32")
    plain = train(make_config(*args, run_dir=tmp_path / "plain"))
    hit = train(make_config(*args, "fault.inject=policy:1@6", run_dir=tmp_path / "hit"))
    assert sorted(steps(hit.run_dir)) == list(range(1, 9))
    [made] = recoveries(hit.run_dir)
    assert (made["role"], made["rank"], made["step"], made["rewound_to"]) == ("policy", 1, 6, 3)
    assert made["cause"].startswith("process died") and made["logged_at"] == 4
    ledger = lines(hit.run_dir / "ledger.jsonl")
    assert [e["step"] for e in ledger] == list(range(1, 9))
    assert [e["rows"] for e in ledger] == [e["rows"] for e in lines(plain.run_dir / "ledger.jsonl")]
    same_weights(plain.model_dir, hit.model_dir, 1e-6)


def ppo(grpo_config, run_dir, **fault) -> RunConfig:
    """PPO over all five roles (policy 2 x ZeRO-2) on 4 logical CPUs, seeded sampling, a
    checkpoint every 2 steps."""
    return RunConfig.from_dict(grpo_config(
        run_dir, algorithm="ppo", policy={"actors": 2, "cpus": 0.5, "zero_stage": 2},
        critic={"actors": 1, "cpus": 0.5, "zero_stage": 0, "lr": 1e-3},
        rl={"group_size": 2}, train={"batch_size": 16, "micro_batch_size": 8},
        checkpoint={"every": 2}, fault=fault, cluster={"num_cpus": 4}))


def test_ppo_survives_losing_every_role_once(grpo_config, tmp_path):
    plain = train(ppo(grpo_config, tmp_path / "plain"))
    hit = train(ppo(grpo_config, tmp_path / "hit", max_restarts=1,
                    inject="rollout@2,policy:1@4,reward@5,critic@6,reference@7"))
    assert sorted(steps(hit.run_dir)) == list(range(1, 9))
    made = [(m["role"], m["step"], m.get("rewound_to")) for m in recoveries(hit.run_dir)]
    # a trainer lost at step s goes back to the checkpoint of step s-2 (one every 2 steps)
    assert made == [("rollout", 2, None), ("policy", 4, 2), ("reward", 5, None),
                    ("critic", 6, 4), ("reference", 7, None)]
    ledger = lines(hit.run_dir / "ledger.jsonl")
    assert [e["step"] for e in ledger] == list(range(1, 9))
    assert [e["rows"] for e in ledger] == [e["rows"] for e in lines(plain.run_dir / "ledger.jsonl")]
    same_weights(plain.model_dir, hit.model_dir, 1e-5)
    same_weights(plain.checkpoint / "critic" / "model", hit.checkpoint / "critic" / "model", 1e-5)
