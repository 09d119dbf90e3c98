"""Turn role resources from config into Ray placement groups.

When the cluster cannot hold the roles, fail at once naming them; where an autoscaler may add
nodes (``cluster.autoscaler``), ask it for the roles' bundles and wait for the nodes, up to
``cluster.capacity_timeout_s``, saying every few seconds what the wait is for.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from orchestrator.config import ClusterConfig

log = logging.getLogger(__name__)

POLL_S = 1.0             # how often a capacity wait looks at the cluster again
REPORT_EVERY_S = 10.0    # how often a wait logs what it waits for
FIRST_REPORT_S = 10.0    # how long detection waits for a fresh cluster's first autoscaler report


class PlacementError(RuntimeError):
    """The cluster cannot hold a role; the message names the role and the missing resources."""


@dataclass
class RoleRequest:
    role: str            # config section, e.g. "policy"
    actors: int
    cpus: float
    gpus: float

    def bundle(self) -> dict:
        b = {"CPU": self.cpus}
        if self.gpus:
            b["GPU"] = self.gpus
        return b

    def total(self) -> dict:
        return {k: v * self.actors for k, v in self.bundle().items()}

    def describe(self) -> str:
        return f"{self.role} ({self.actors} x {_fmt(self.bundle())})"


def _fmt(res: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"


# ---- what is missing (pure) ------------------------------------------------------------------
@dataclass
class Shortfall:
    """What the roles ask for beyond what the cluster's alive nodes have (totals, not what is
    free: roles of other jobs are not counted against us)."""
    requests: list[RoleRequest]
    need: dict[str, float]       # summed over all roles' replicas
    have: dict[str, float]       # summed over the alive nodes
    missing: dict[str, float]    # need - have, where positive
    too_big: list[tuple[RoleRequest, str, float]]  # (role, resource, per replica) no node holds
    nodes: int

    def roles(self) -> str:
        return ", ".join(r.describe() for r in self.requests)

    def error(self) -> str:
        """The message for a cluster that cannot grow: the first role no node holds, else the
        resources all roles together lack."""
        if self.too_big:
            req, k, v = self.too_big[0]
            return (f"role '{req.role}': one replica needs {_fmt(req.bundle())} but no node has "
                    f"{k} >= {v:g}; lower {req.role}.{'gpus' if k == 'GPU' else 'cpus'} or add a "
                    f"larger node")
        return (f"the cluster lacks {_fmt(self.missing)} for roles {self.roles()}; it has "
                f"{_fmt({k: self.have.get(k, 0) for k in self.need})}. Lower the roles' "
                f"actors/cpus/gpus, or give the local Ray more logical CPUs with cluster.num_cpus, "
                f"or add nodes")

    def summary(self) -> str:
        """One line for a wait: the roles, what they need, what the cluster has, what is missing."""
        gaps = ([f"missing {_fmt(self.missing)}"] if self.missing else []) + [
            f"no node holds one '{req.role}' replica ({k} >= {v:g})" for req, k, v in self.too_big]
        return (f"roles {self.roles()} need {_fmt(self.need)}; the cluster has "
                f"{_fmt({k: self.have.get(k, 0) for k in self.need})} on {self.nodes} node(s): "
                + "; ".join(gaps))


def shortfall(requests: list[RoleRequest], nodes: list[dict]) -> Shortfall | None:
    """Compare the roles' requests with the resources of ``nodes`` (one dict per alive node);
    None when the nodes hold them all."""
    have: dict[str, float] = {}
    for node in nodes:
        for k, v in node.items():
            have[k] = have.get(k, 0.0) + v
    need: dict[str, float] = {}
    too_big = []
    for req in requests:
        for k, v in req.total().items():
            need[k] = need.get(k, 0.0) + v
        too_big += [(req, k, v) for k, v in req.bundle().items()
                    if not any(node.get(k, 0) >= v for node in nodes)]
    missing = {k: v - have.get(k, 0.0) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    if not missing and not too_big:
        return None
    return Shortfall(list(requests), need, have, missing, too_big, len(nodes))


def wait_for_capacity(requests: list[RoleRequest], timeout_s: float,
                      nodes: Callable[[], list[dict]], *, clock=time.monotonic, sleep=time.sleep,
                      poll_s: float = POLL_S, report_every_s: float = REPORT_EVERY_S) -> float:
    """Poll ``nodes()`` until they hold the roles, logging what is missing every
    ``report_every_s``; return the seconds waited, or raise PlacementError after ``timeout_s``."""
    start = clock()
    next_report = start
    while True:
        short = shortfall(requests, nodes())
        now = clock()
        waited = now - start
        if short is None:
            return waited
        if waited >= timeout_s:
            raise PlacementError(
                f"waited {timeout_s:g}s (cluster.capacity_timeout_s) for the autoscaler to add "
                f"nodes, but {short.summary()}. Lower the roles' actors/cpus/gpus, let the "
                f"autoscaler add larger or more nodes, or raise cluster.capacity_timeout_s")
        if now >= next_report:
            log.info("waiting for the autoscaler to add nodes (%.0fs of %gs, "
                     "cluster.capacity_timeout_s): %s", waited, timeout_s, short.summary())
            next_report = now + report_every_s
        sleep(max(0.0, min(poll_s, timeout_s - waited)))


# ---- is there an autoscaler? -----------------------------------------------------------------
def scalable(node_types: dict[str, str]) -> bool:
    """Whether the autoscaler's node types (node id -> type) come from a node provider that can
    launch nodes. Without a provider (a local Ray, nodes started by hand) the monitor runs a
    read-only one that names each node's type after its id: ``node_<id>``."""
    return any(t != f"node_{n}" for n, t in node_types.items())


def _node_types(first_report_s: float) -> dict[str, str]:
    """Node id -> node type as the cluster's autoscaler reports them; {} without a report."""
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    if is_autoscaler_v2(fetch_from_server=True):
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        types = {n.node_id: n.ray_node_type_name for n in status.active_nodes + status.idle_nodes}
        types.update({f"launch-{i}": p.ray_node_type_name
                      for i, p in enumerate(status.pending_launches + status.pending_nodes)})
        return types
    # autoscaler v1: the monitor writes its report into the GCS key-value store every few
    # seconds; a cluster that has just started may not have one yet
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    deadline = time.monotonic() + first_report_s
    while True:
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = json.loads(raw).get("autoscaler_report") if raw else None
        if report or time.monotonic() >= deadline:
            return dict((report or {}).get("node_type_mapping") or {})
        time.sleep(0.5)


def has_autoscaler(first_report_s: float = FIRST_REPORT_S) -> bool:
    """Whether the connected Ray cluster runs an autoscaler that can add nodes (v1 or v2)."""
    node = ray._private.worker._global_node
    if node is not None and node.head:
        return False  # this process started Ray itself: a local instance, nothing to add nodes
    try:
        return scalable(_node_types(first_report_s))
    except Exception as exc:  # e.g. Ray Client, or a GCS that does not answer
        log.warning("cannot tell whether the cluster has an autoscaler (%s); assuming none "
                    "(set cluster.autoscaler=present to wait for nodes)", exc)
        return False


def may_add_nodes(cluster: ClusterConfig) -> bool:
    if cluster.autoscaler == "auto":
        return has_autoscaler()
    return cluster.autoscaler == "present"


def _alive_nodes() -> list[dict]:
    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def _ask_autoscaler(bundles: list[dict]) -> None:
    """Tell the autoscaler which bundles the cluster must fit (replaces any earlier request)."""
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=bundles)
    except Exception as exc:
        log.warning("could not ask the autoscaler for %s: %s", bundles, exc)


# ---- the checks callers use --------------------------------------------------------------------
def check_capacity(requests: list[RoleRequest], cluster: ClusterConfig | None = None) -> None:
    """Compare what all roles ask for with what the cluster has. Where it falls short, raise
    naming the roles, or, where an autoscaler may add nodes, ask it for the roles' bundles and
    wait for them up to ``cluster.capacity_timeout_s``. ``cluster`` defaults to ClusterConfig()."""
    cluster = cluster or ClusterConfig()
    short = shortfall(requests, _alive_nodes())
    if short is None:
        return
    if not may_add_nodes(cluster):
        raise PlacementError(short.error())
    log.info("the cluster cannot hold the roles yet; asking its autoscaler for nodes: %s",
             short.summary())
    _ask_autoscaler([r.bundle() for r in requests for _ in range(r.actors)])
    try:
        waited = wait_for_capacity(requests, cluster.capacity_timeout_s, _alive_nodes,
                                   poll_s=POLL_S, report_every_s=REPORT_EVERY_S)
    finally:
        _ask_autoscaler([])  # placement groups hold the nodes from here on
    log.info("the cluster holds the roles after %.0fs: %s", waited,
             ", ".join(r.describe() for r in requests))


def _ready_within(ready, timeout_s: float) -> bool:
    try:
        ray.get(ready, timeout=timeout_s)
        return True
    except ray.exceptions.GetTimeoutError:
        return False


def place(req: RoleRequest, timeout_s: float, cluster: ClusterConfig | None = None):
    """Reserve one bundle per replica (packed onto few nodes) and wait until it is held: up to
    ``timeout_s``, or, where an autoscaler may add nodes, up to ``cluster.capacity_timeout_s``
    when that is longer (a pending placement group asks the autoscaler for nodes itself)."""
    # named for `ray status` and the dashboard; unique, since runs can share a cluster (the
    # arms of `rayalign compare`) and a placement group's name is unique within a job
    pg = placement_group([req.bundle()] * req.actors, strategy="PACK",
                         name=f"rayalign-{req.role}-{uuid.uuid4().hex[:8]}")
    ready = pg.ready()
    if _ready_within(ready, timeout_s):
        return pg
    limit, knob = timeout_s, "cluster.placement_timeout_s"
    cluster = cluster or ClusterConfig()
    if cluster.capacity_timeout_s > timeout_s and may_add_nodes(cluster):
        limit, knob = cluster.capacity_timeout_s, "cluster.capacity_timeout_s"
        waited = timeout_s
        while waited < limit:
            log.info("role '%s': placement of %d x %s pending for %.0fs of %gs (%s); waiting "
                     "for the autoscaler", req.role, req.actors, _fmt(req.bundle()), waited,
                     limit, knob)
            step = min(REPORT_EVERY_S, limit - waited)
            if _ready_within(ready, step):
                return pg
            waited += step
    remove_placement_group(pg)
    raise PlacementError(
        f"role '{req.role}': placement of {req.actors} x {_fmt(req.bundle())} not ready after "
        f"{limit:g}s ({knob}); free resources or lower the request")


def draining(node_ids: Callable[[], set[str]]) -> dict[str, float | None]:
    """Which of the nodes ``node_ids()`` names (hex; asked only when some node drains, so a
    step end costs one query) Ray is draining: the autoscaler before it preempts or
    retires a node, or a cloud's preemption hook calling ``ray drain-node``. Node id -> seconds
    left before its deadline (None: no deadline given). Empty where the query fails (an older
    head): a stop request must never be what breaks a run."""
    from ray._private.state import state
    try:
        nodes = state.get_draining_nodes()
    except Exception as exc:  # noqa: BLE001  (the query is advisory)
        log.debug("draining nodes not known: %s", exc)
        return {}
    if not nodes:
        return {}
    ours, now_ms = node_ids(), time.time() * 1000
    return {node: (max(0.0, (deadline - now_ms) / 1000) if deadline else None)
            for node, deadline in nodes.items() if node in ours}


def nodes_of(groups) -> set[str]:
    """The nodes (hex ids) that hold the driver and the bundles of ``groups``' placement
    groups."""
    nodes = {ray.get_runtime_context().get_node_id()}
    for group in groups:
        pg = getattr(group, "placement_group", None)
        if pg is not None:
            nodes |= {n for n in ray.util.placement_group_table(pg)["bundles_to_node_id"].values()
                      if n}
    return nodes

