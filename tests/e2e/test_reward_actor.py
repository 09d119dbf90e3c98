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
    # 2 CPUs for this group, 1 for the HTTP scorer of the endpoint tests
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level=logging.WARNING)
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


# --- an HTTP endpoint behind the actors ------------------------------------------------------------
@pytest.mark.parametrize("fail_first", [2, 100])
def test_http_endpoint_that_flaps_loses_nothing_and_one_that_stays_down_is_named(group, serve,
                                                                                  fail_first):
    """The first ``fail_first`` requests answer 503, then the word count of each response."""
    def flaky(n, body):
        return ((503, {"error": "warming up"}) if n < fail_first
                else (200, {"rewards": [len(r.split()) for r in body["responses"]]}))

    with serve(flaky) as (url, calls):
        settings = RewardSettings("http", url=url, retries=3, backoff_s=0.01, micro_batch=32,
                                  cpus=1)
        pg = place(RoleRequest("reward", 1, 1, 0), timeout_s=30)
        scorers = ActorGroup("reward", RewardScorer, pg, 1, 1, 0, init_args=(settings,))
        try:
            samples = rows(6)
            if fail_first <= settings.retries:  # back within the retry budget
                assert scorers.run("score", samples) == [5.0] * 6
                assert len(calls) == fail_first + 1
            else:
                with pytest.raises(RewardError) as err:
                    scorers.run("score", samples)
                assert f"reward endpoint {url}: no answer after 4 attempt(s)" in str(err.value)
                assert len(calls) == 4
        finally:
            scorers.kill()
            ray.util.remove_placement_group(pg)
