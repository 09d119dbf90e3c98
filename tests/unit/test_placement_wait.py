"""orchestrator.placement: what the roles lack, and waiting for an autoscaler (no Ray started)."""
from __future__ import annotations

import logging

import pytest

from orchestrator import placement
from orchestrator.config import ClusterConfig
from orchestrator.placement import (
    PlacementError,
    RoleRequest,
    check_capacity,
    scalable,
    shortfall,
    wait_for_capacity,
)
from orchestrator.schema import ConfigError, build

pytestmark = pytest.mark.unit

POLICY = RoleRequest("policy", 2, 1.0, 0.0)
REFERENCE = RoleRequest("reference", 1, 1.0, 0.0)
HEAD = {"CPU": 2.0, "memory": 1e9}
WORKER = {"CPU": 2.0}


def test_shortfall_none_when_the_nodes_hold_the_roles():
    assert shortfall([POLICY, REFERENCE], [HEAD, WORKER]) is None
    assert shortfall([POLICY], [HEAD]) is None


def test_shortfall_sums_roles_and_nodes():
    short = shortfall([POLICY, REFERENCE], [HEAD])
    assert short.need == {"CPU": 3.0}
    assert short.have == {"CPU": 2.0, "memory": 1e9}
    assert short.missing == {"CPU": 1.0}
    assert short.too_big == []
    assert short.nodes == 1


def test_shortfall_replica_larger_than_any_node():
    big = RoleRequest("policy", 1, 3.0, 1.0)
    short = shortfall([big], [HEAD, WORKER])  # 4 CPUs in all, but 2 on each node, and no GPU
    assert short.missing == {"GPU": 1.0}
    assert [(r.role, k, v) for r, k, v in short.too_big] == [("policy", "CPU", 3.0),
                                                             ("policy", "GPU", 1.0)]


def test_messages_for_a_cluster_that_cannot_grow_are_unchanged():
    # the same words tests/e2e/test_failures.py expects from a local Ray
    short = shortfall([RoleRequest("policy", 2, 64.0, 0.0)], [{"CPU": 3.0}])
    assert "role 'policy': one replica needs {CPU: 64} but no node has CPU >= 64" in short.error()
    short = shortfall([RoleRequest("policy", 2, 1.5, 0.0), REFERENCE], [{"CPU": 3.0}])
    assert short.error().startswith(
        "the cluster lacks {CPU: 1} for roles policy (2 x {CPU: 1.5}), reference (1 x {CPU: 1}); "
        "it has {CPU: 3}. Lower the roles'")


def test_summary_names_roles_need_have_and_gaps():
    short = shortfall([POLICY, RoleRequest("reward", 1, 4.0, 0.0)], [HEAD])
    assert short.summary() == (
        "roles policy (2 x {CPU: 1}), reward (1 x {CPU: 4}) need {CPU: 6}; the cluster has "
        "{CPU: 2} on 1 node(s): missing {CPU: 4}; no node holds one 'reward' replica (CPU >= 4)")


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        assert s >= 0
        self.now += s


def test_wait_returns_once_nodes_come(caplog):
    clock = FakeClock()
    polls = []

    def nodes():
        polls.append(clock.now)
        return [HEAD, WORKER] if clock.now >= 125 else [HEAD]

    with caplog.at_level(logging.INFO, logger="orchestrator.placement"):
        waited = wait_for_capacity([POLICY, REFERENCE], 600, nodes, clock=clock, sleep=clock.sleep)
    assert waited == 25
    assert len(polls) == 26  # once a second
    reports = [r.getMessage() for r in caplog.records]
    assert len(reports) == 3  # at 0, 10 and 20 s
    assert reports[0].startswith("waiting for the autoscaler to add nodes (0s of 600s, "
                                 "cluster.capacity_timeout_s): roles policy (2 x {CPU: 1}), "
                                 "reference (1 x {CPU: 1}) need {CPU: 3}")
    assert "missing {CPU: 1}" in reports[2] and "(20s of 600s" in reports[2]


def test_wait_times_out_naming_roles_and_missing():
    clock = FakeClock()
    with pytest.raises(PlacementError) as err:
        wait_for_capacity([POLICY, REFERENCE], 7.5, lambda: [HEAD], clock=clock, sleep=clock.sleep)
    assert clock.now == 107.5  # the last sleep is cut to the deadline
    msg = str(err.value)
    assert msg.startswith("waited 7.5s (cluster.capacity_timeout_s) for the autoscaler to add "
                          "nodes, but roles policy (2 x {CPU: 1}), reference (1 x {CPU: 1})")
    assert "missing {CPU: 1}" in msg and "raise cluster.capacity_timeout_s" in msg


def test_readonly_autoscaler_is_not_scalable():
    # a local Ray's monitor names each node's type after its id (read-only provider)
    assert not scalable({"ebb511": "node_ebb511", "0a1b": "node_0a1b"})
    assert not scalable({})
    # a node provider's config names the types (fake_multinode, cloud, KubeRay)
    assert scalable({"fffff00000": "ray.head.default"})
    assert scalable({"ebb511": "node_ebb511", "fffff00001": "cpu_worker"})


@pytest.fixture
def fake_cluster(monkeypatch):
    """check_capacity against fake nodes; records what the autoscaler is asked for."""
    state = {"nodes": [HEAD], "asked": [], "detected": 0}
    monkeypatch.setattr(placement, "_alive_nodes", lambda: list(state["nodes"]))
    monkeypatch.setattr(placement, "_ask_autoscaler", state["asked"].append)

    def detect():
        state["detected"] += 1
        return state.get("autoscaler", False)
    monkeypatch.setattr(placement, "has_autoscaler", detect)
    return state


def test_check_capacity_without_autoscaler_fails_at_once(fake_cluster):
    with pytest.raises(PlacementError, match=r"the cluster lacks \{CPU: 1\} for roles policy"):
        check_capacity([POLICY, REFERENCE], ClusterConfig())
    assert fake_cluster["detected"] == 1 and fake_cluster["asked"] == []
    with pytest.raises(PlacementError):  # 'absent' does not even ask
        check_capacity([POLICY, REFERENCE], ClusterConfig(autoscaler="absent"))
    assert fake_cluster["detected"] == 1
    check_capacity([POLICY])  # fits: nothing to detect
    assert fake_cluster["detected"] == 1


def test_check_capacity_asks_the_autoscaler_and_waits(fake_cluster, monkeypatch):
    fake_cluster["autoscaler"] = True
    calls = iter([[HEAD], [HEAD], [HEAD, WORKER]])  # the worker shows up at the third look
    monkeypatch.setattr(placement, "_alive_nodes", lambda: next(calls))
    monkeypatch.setattr(placement, "POLL_S", 0.01)
    check_capacity([POLICY, REFERENCE], ClusterConfig())
    # one bundle per replica, then the request is withdrawn
    assert fake_cluster["asked"] == [[{"CPU": 1.0}] * 3, []]


def test_check_capacity_gives_up_after_capacity_timeout(fake_cluster):
    with pytest.raises(PlacementError, match=r"waited 0.05s \(cluster.capacity_timeout_s\).*"
                                             r"roles policy \(2 x \{CPU: 1\}\), reward"):
        check_capacity([POLICY, RoleRequest("reward", 1, 8.0, 0.0)],
                       ClusterConfig(autoscaler="present", capacity_timeout_s=0.05))
    assert fake_cluster["detected"] == 0  # 'present' needs no detection
    assert fake_cluster["asked"][-1] == []  # the request is withdrawn on failure too


def test_cluster_config_fields():
    cfg = ClusterConfig()
    assert (cfg.autoscaler, cfg.capacity_timeout_s) == ("auto", 600.0)
    with pytest.raises(ConfigError, match="cluster.autoscaler"):
        build(ClusterConfig, {"autoscaler": "maybe"}, "cluster")
    with pytest.raises(ConfigError, match="cluster.capacity_timeout_s"):
        build(ClusterConfig, {"capacity_timeout_s": 0}, "cluster")
