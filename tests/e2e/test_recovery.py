"""Recovery in place: rollout engine, reward and reference killed during a GRPO run (kill -9
through ``fault.inject``) are replaced while the run goes on; the run completes, its metrics
record each replacement, and, on-policy with seeded sampling, it trains on the same rows and
ends with the same weights as an uninterrupted run."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from orchestrator import RunConfig, train

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("shared_ray")]


def grpo(grpo_config, run_dir, **fault) -> RunConfig:
    return RunConfig.from_dict(grpo_config(run_dir, train={"max_steps": 7}, fault=fault))


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_killed_roles_are_replaced_and_the_run_matches_an_uninterrupted_one(grpo_config,
                                                                             tmp_path):
    """Reward, engine and reference replaced in place; the policy, lost at step 6 with no
    checkpoint yet, is rebuilt from the model dir and steps 1-5 are trained again."""
    plain = train(grpo(grpo_config, tmp_path / "plain"))
    hit = train(grpo(grpo_config, tmp_path / "hit",
                     inject="reward@2,rollout@4,reference@5,policy@6"))
    steps = {r["step"]: r for r in rows(hit.run_dir) if "timing/step" in r}
    assert sorted(steps) == list(range(1, 8))  # each step logged once
    made = [x for s in sorted(steps) for x in steps[s].get("recovery", [])]
    assert [(x["role"], x["rank"], x["step"]) for x in made] == \
        [("reward", 0, 2), ("rollout", 0, 4), ("reference", 0, 5), ("policy", 0, 6)]
    assert made[-1]["rewound_to"] == 0 and all(x["seconds"] > 0 for x in made)
    assert all(x["cause"].startswith("process died") for x in made)
    # the rows of steps 2-5 went with the rewind: their records moved on to step 1's
    assert [x["role"] for x in steps[1]["recovery"]] == ["reward", "rollout", "reference",
                                                         "policy"]
    # the same rows, the same samples, the same updates
    trained = [r["batch/rows"] for r in rows(plain.run_dir) if "timing/step" in r]
    assert [steps[s]["batch/rows"] for s in sorted(steps)] == trained
    ledger = [json.loads(line) for line in (hit.run_dir / "ledger.jsonl").read_text().splitlines()]
    assert [(e["step"], e["rows"], e["samples_per_row"]) for e in ledger] == \
        [(i + 1, r, 4) for i, r in enumerate(trained)]
    a = load_file(str(plain.model_dir / "model.safetensors"))
    b = load_file(str(hit.model_dir / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert hit.usage["rollout"]["seconds"] > 0


def test_a_role_that_keeps_failing_stops_the_run_with_a_checkpoint(grpo_config, tmp_path):
    from orchestrator.session import RunFailed
    with pytest.raises(RunFailed) as err:
        train(grpo(grpo_config, tmp_path / "run", inject="reward@2,reward@3", max_restarts=1))
    message = str(err.value)
    assert "role reward rank 0" in message and "1 replacement(s) (fault.max_restarts) are spent" \
        in message
    assert "checkpoint of the last completed step written" in message and "step-0000002" in message


@pytest.mark.parametrize("on_failure", ["drop", "fail"])
def test_reward_endpoint_that_fails_drops_and_counts_or_stops(grpo_config, tmp_path, serve,
                                                              on_failure):
    """An HTTP reward endpoint that answers 500 to every 5th request (one prompt's group per
    request, no retries): with on_failure drop the run completes, each step's failed groups are
    left out, counted, and named in the ledger, and no dropped sample is scored; with fail the
    run stops naming the endpoint."""
    from actors.reward import RewardError
    from orchestrator.synthetic import reward

    def every_fifth_down(n, body):
        if n % 5 == 2:
            return 500, {"error": "overloaded"}
        return 200, {"rewards": [reward(p, r) for p, r in zip(body["prompts"], body["responses"])]}

    with serve(every_fifth_down) as (url, calls):
        cfg = RunConfig.from_dict(grpo_config(
            tmp_path / "run", train={"max_steps": 3},
            reward={"kind": "http", "function": None, "url": url, "retries": 0, "micro_batch": 4,
                    "on_failure": on_failure}))
        if on_failure == "fail":
            with pytest.raises(RewardError, match=f"reward endpoint {url}: no answer after 1 "
                                                  f"attempt"):
                train(cfg)
            return
        result = train(cfg)
    steps = {r["step"]: r for r in rows(result.run_dir) if "timing/step" in r}
    assert sorted(steps) == [1, 2, 3]
    dropped = sum(r.get("reward/dropped", 0) for r in steps.values())
    assert dropped == 4 * sum(len(r.get("batch/dropped_rows", [])) for r in steps.values()) > 0
    ledger = [json.loads(line) for line in (result.run_dir / "ledger.jsonl").read_text()
              .splitlines()]
    for entry, step in zip(ledger, sorted(steps)):
        assert entry["rows"] == steps[step]["batch/rows"]
        assert entry.get("dropped", []) == steps[step].get("batch/dropped_rows", [])
        assert len(entry["rows"]) + len(entry.get("dropped", [])) == 8  # rl.prompts_per_step
    assert all(r["reward/mean"] == r["reward/mean"] for r in steps.values())  # no NaN averaged
