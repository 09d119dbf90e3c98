"""Group calls on real Ray actors: when one rank of a collective dies, its peers' calls fail
too (a connection reset by the dead peer), often before Ray reports the death. The failure
the driver raises is the death, naming the dead rank, not the survivor's error."""
from __future__ import annotations

import logging
import os
import time

import pytest
import ray

from actors import group as group_module
from actors.group import ActorGroup, Measured, RoleFailure
from orchestrator.placement import RoleRequest, place

pytestmark = pytest.mark.e2e

HERE = os.path.dirname(os.path.abspath(__file__))  # on the actors' PYTHONPATH, for Peer


class Peer(Measured):
    def __init__(self, rank: int, world_size: int):
        self.rank = rank

    def ready(self) -> bool:
        return True

    def collective(self, error_after_s: float, dead_after_s: float | None) -> None:
        """Rank 0 fails as a survivor of a broken collective does; rank 1 dies a little later
        (or, with None, stays busy: a failure of rank 0's own)."""
        if self.rank == 0:
            time.sleep(error_after_s)
            raise RuntimeError("gloo: Connection reset by peer")
        if dead_after_s is None:
            time.sleep(30)
            return
        time.sleep(dead_after_s)
        os._exit(1)


@pytest.fixture
def peers():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    pg = place(RoleRequest("policy", 2, 1, 0), timeout_s=30)
    group = ActorGroup("policy", Peer, pg, 2, 1, 0, env={"PYTHONPATH": HERE})
    ray.get([a.ready.remote() for a in group.actors])
    yield group
    group.kill()
    ray.util.remove_placement_group(pg)
    ray.shutdown()


def test_a_peer_that_dies_after_a_survivor_fails_is_the_failure_named(peers):
    with pytest.raises(RoleFailure) as failure:
        peers.run("collective", 0.1, 1.0)
    assert failure.value.role == "policy" and failure.value.rank == 1, failure.value
    assert "died" in str(failure.value)


def test_without_a_death_the_method_error_propagates_after_the_grace(peers, monkeypatch):
    monkeypatch.setattr(group_module, "PEER_GRACE_S", 1.0)
    t0 = time.monotonic()
    with pytest.raises(ray.exceptions.RayTaskError, match="Connection reset by peer"):
        peers.run("collective", 0.1, None)
    assert time.monotonic() - t0 < 10  # the grace, not the busy peer's 30 s
