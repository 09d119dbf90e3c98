"""The reward role as a group of Ray actors: scattered samples come back scored, in order."""
from __future__ import annotations

import logging
import os
import random

import pytest
import ray

from actors.group import ActorGroup
from actors.reward import RewardError, RewardSample, RewardScorer, RewardSettings
from orchestrator.placement import RoleRequest, place
from orchestrator.synthetic import BRIGHT, DULL, NEUTRAL, reward

pytestmark = pytest.mark.e2e

HERE = os.path.dirname(os.path.abspath(__file__))  # on the actors' PYTHONPATH, for synthetic_or_boom
FUNCTION = "test_reward_actor:synthetic_or_boom"


def synthetic_or_boom(prompt, response):
    """The synthetic task's reward, except that the response "boom" makes it raise."""
    if response == "boom":
        raise ValueError("no reward for boom")
    return reward(prompt, response)


@pytest.fixture(scope="module")
def group():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    settings = RewardSettings("function", function=FUNCTION, cpus=1)
    pg = place(RoleRequest("reward", 2, settings.cpus, settings.gpus), timeout_s=30)
    group = ActorGroup("reward", RewardScorer, pg, 2, settings.cpus, settings.gpus,
                       init_args=(settings,), env={"PYTHONPATH": HERE})
    ray.get([a.ready.remote() for a in group.actors])
    yield group
    group.kill()
    ray.util.remove_placement_group(pg)
    ray.shutdown()


def rows(n: int) -> list[RewardSample]:
    rng = random.Random(0)
    return [RewardSample(f"prompt {i}", " ".join(rng.choice(BRIGHT + DULL + NEUTRAL) for _ in range(5)),
                         {"row": i}, index=i) for i in range(n)]


def test_scatter_scores_in_order(group):
    samples = rows(10)
    got = group.run("score", samples)
    assert got == [reward(s.prompt, s.response) for s in samples]
    assert len(set(got)) > 3  # the rewards differ, so their order is really checked


def test_function_error_surfaces_from_the_actor(group):
    samples = rows(10)
    samples[7].response = "boom"  # in the second replica's shard (samples 5-9)
    with pytest.raises(ray.exceptions.RayTaskError) as err:
        group.run("score", samples)
    assert isinstance(err.value, RewardError)
    assert f"reward function {FUNCTION}: sample 7 (prompt 'prompt 7')" in str(err.value)
    assert "ValueError: no reward for boom" in str(err.value)
