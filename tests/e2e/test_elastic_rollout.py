"""Elastic rollout engines: a GRPO run asked (``orchestrator.scale``, what ``rayalign scale``
writes) for a second engine and later for one again grows and shrinks while it runs, trains on
every drawn row with every sample, and, where the cluster has no room for the second engine,
goes on degraded with the one it has. A killed engine of two is replaced alone."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from orchestrator import RunConfig, scale, train

pytestmark = pytest.mark.e2e


def step_rows(run_dir) -> dict[int, dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text()
            .splitlines() if line.strip()]
    return {r["step"]: r for r in rows if "timing/step" in r}


def ask_at(run_dir: Path, plan: list[tuple[int, int]]) -> threading.Thread:
    """In the background: once step s is logged, ask for n engines, for each (s, n) in turn."""
    def follow():
        for step, n in plan:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if (run_dir / "metrics.jsonl").exists() and max(step_rows(run_dir), default=0) >= step:
                    break
                time.sleep(0.05)
            scale(run_dir, n)
    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    return thread


def test_engines_grow_and_shrink_while_grpo_runs(grpo_config, tmp_path, drawn_rows):
    cfg = grpo_config(tmp_path / "run", train={"max_steps": 8}, cluster={"num_cpus": 4})
    run_dir = Path(cfg["run_dir"])
    run_dir.mkdir(parents=True)
    follower = ask_at(run_dir, [(2, 2), (5, 1)])
    result = train(RunConfig.from_dict(cfg))
    follower.join(timeout=10)
    steps = step_rows(result.run_dir)
    engines = [steps[s]["rollout/engines"] for s in sorted(steps)]
    assert engines[0] == 1 and 2 in engines and engines[-1] == 1, engines
    assert engines.index(2) >= 2  # after step 2 was logged
    # nothing lost: every step trained on its 8 drawn prompts x 4 samples, as drawn uninterrupted
    ledger = [json.loads(line) for line in (result.run_dir / "ledger.jsonl").read_text()
              .splitlines()]
    assert [e["step"] for e in ledger] == list(range(1, 9))
    assert [e["rows"] for e in ledger] == drawn_rows(cfg)
    assert all(e["samples_per_row"] == 4 and "dropped" not in e for e in ledger)


def test_no_room_for_another_engine_goes_on_degraded(grpo_config, tmp_path, caplog):
    cfg = grpo_config(tmp_path / "run", train={"max_steps": 4})  # 3 CPUs: all taken
    run_dir = Path(cfg["run_dir"])
    run_dir.mkdir(parents=True)
    scale(run_dir, 2)  # left by an earlier run in this dir: a fresh run ignores it
    follower = ask_at(run_dir, [(1, 2)])
    with caplog.at_level("WARNING", logger="orchestrator.elastic"):
        result = train(RunConfig.from_dict(cfg))
    follower.join(timeout=10)
    steps = step_rows(result.run_dir)
    assert sorted(steps) == [1, 2, 3, 4]
    assert all(r["rollout/engines"] == 1 for r in steps.values())
    assert steps[1]["rollout/engines_wanted"] == 1 and steps[4]["rollout/engines_wanted"] == 2
    assert "rollout: degraded, 1 of 2 engine(s) running" in caplog.text


@pytest.mark.parametrize("stream_groups", [0, 2])
def test_a_killed_engine_of_two_is_replaced_alone(grpo_config, tmp_path, stream_groups):
    """Engine 1 of 2 killed as step 2 starts: it alone is replaced (same rank and seed), only
    its 4 of the step's 8 prompts are generated again, and the run ends as an uninterrupted
    one (seeded sampling, on-policy). Streamed (``rollout.stream_groups``), the parts engine
    0 hands back are scored as they come, and the replacement's too."""
    def run(name, **fault):
        return train(RunConfig.from_dict(grpo_config(
            tmp_path / name, train={"max_steps": 4}, cluster={"num_cpus": 4},
            rollout={"actors": 2, "cpus": 1, "stream_groups": stream_groups}, fault=fault)))
    plain, hit = run("plain"), run("hit", inject="rollout:1@2")
    steps = step_rows(hit.run_dir)
    [made] = steps[2]["recovery"]
    assert (made["role"], made["rank"]) == ("rollout", 1)
    assert steps[2]["rollout/reissued_prompts"] == 4
    assert all(r["rollout/engines"] == 2 for r in steps.values())
    if stream_groups:  # 2 engines x 4 prompts, in parts of 2
        assert all(r["rollout/stream_parts"] == 4 for r in steps.values())
    a = load_file(str(plain.model_dir / "model.safetensors"))
    b = load_file(str(hit.model_dir / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
