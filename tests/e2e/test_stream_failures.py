"""Streamed generation's waits (orchestrator/streams.py) on real Ray actors: an engine that
dies mid-stream is named with its rank; the parts it handed back before are kept and only the
prompts it had not answered go to its heir; an engine that stops answering is named by its
deadline. The engines are stand-ins that hand back each prompt as a part (the real engines'
streams are tested in test_weight_sync.py and tests/unit/test_rollout_hf.py)."""
from __future__ import annotations

import logging
import os
import time

import pytest
import ray

from actors.group import ActorGroup, Measured, RoleFailure
from orchestrator.placement import RoleRequest, place
from orchestrator.streams import StreamedGeneration

pytestmark = pytest.mark.e2e

HERE = os.path.dirname(os.path.abspath(__file__))  # on the actors' PYTHONPATH, for Streamer


class Streamer(Measured):
    """Hands back each prompt's n "samples" (the prompt itself) as a part; rank ``fails``
    does ``how`` ("die" or "hang") after its first part, once (file ``once`` marks it done:
    a replacement of that rank works)."""

    def __init__(self, rank: int, world_size: int, fails: int, how: str, once: str):
        self.rank, self.fails, self.how, self.once = rank, fails, how, once

    def ready(self) -> bool:
        return True

    def generate_stream(self, prompts, sampling, groups, positions):
        for j, (p, prompt) in enumerate(zip(positions, prompts)):
            if j == 1 and self.rank == self.fails and not os.path.exists(self.once):
                open(self.once, "w").close()
                time.sleep(0.5)  # the part before has reached the driver
                if self.how == "die":
                    os._exit(1)
                time.sleep(60)
            time.sleep(0.05)
            yield [p], [prompt] * sampling["n"]


@pytest.fixture
def cluster(tmp_path):
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level=logging.WARNING)
    pg = place(RoleRequest("rollout", 3, 1, 0), timeout_s=30)
    made = []

    def engines(fails: int, how: str, deadline_s: float = 60) -> ActorGroup:
        group = ActorGroup("rollout", Streamer, pg, 2, 1, 0, init_args=(fails, how, str(tmp_path / "failed")),
                           env={"PYTHONPATH": HERE}, deadline_s=deadline_s,
                           deadline_per_row_s=0)
        ray.get([a.ready.remote() for a in group.actors])
        made.append(group)
        return group
    yield engines, pg
    for group in made:
        group.kill()
    ray.util.remove_placement_group(pg)
    ray.shutdown()


PROMPTS = [[10 + i] for i in range(6)]  # engine 0 gets positions 0-2, engine 1 positions 3-5


def test_a_dead_engine_is_named_and_only_its_unanswered_prompts_go_to_its_heir(cluster):
    engines, pg = cluster
    group = engines(fails=1, how="die")
    stream = StreamedGeneration(group, PROMPTS, {"n": 2}, groups=1)
    got = {}
    with pytest.raises(RoleFailure) as failure:
        for positions, samples in stream.parts():
            got.update({p: samples for p in positions})
    assert (failure.value.role, failure.value.rank) == ("rollout", 1)
    assert "process died" in str(failure.value) and "generate_stream" in str(failure.value)
    assert 3 in got  # engine 1's first part, handed back before it died
    dead = group.actors[1]
    group.drop(dead)
    heir = group.add(1, 2, pg, 2)
    ray.get(heir.ready.remote())
    assert stream.reissue(lambda engine: heir if engine is dead else None) == 2
    late = []
    for positions, samples in stream.parts():
        late += positions
        got.update({p: samples for p in positions})
    assert {4, 5} <= set(late) and 3 not in late  # what came back before is not sampled again
    assert sorted(got) == list(range(6)) and all(got[p] == [PROMPTS[p]] * 2 for p in got)


def test_an_engine_that_stops_answering_is_named_by_its_deadline(cluster):
    engines, _ = cluster
    group = engines(fails=0, how="hang", deadline_s=3)
    stream = StreamedGeneration(group, PROMPTS, {"n": 1}, groups=1)
    t0 = time.monotonic()
    got = []
    with pytest.raises(RoleFailure) as failure:
        for positions, _ in stream.parts():
            got += positions
    assert time.monotonic() - t0 < 15
    assert failure.value.rank == 0 and "no answer within 3s" in str(failure.value)
    assert 0 in got and set(got) >= {3, 4, 5}  # engine 1 finished; engine 0 sent its first
