"""Turn role resources from config into Ray placement groups, failing fast when they cannot fit."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group

log = logging.getLogger(__name__)


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


def check_capacity(requests: list[RoleRequest]) -> None:
    """Compare what all roles ask for with what the cluster has; raise naming the roles."""
    have = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    need: dict[str, float] = {}
    for req in requests:
        for k, v in req.total().items():
            need[k] = need.get(k, 0.0) + v
        for k, v in req.bundle().items():
            if not any(node.get(k, 0) >= v for node in nodes):
                raise PlacementError(
                    f"role '{req.role}': one replica needs {_fmt(req.bundle())} but no node has "
                    f"{k} >= {v:g}; lower {req.role}.{'gpus' if k == 'GPU' else 'cpus'} or add a "
                    f"larger node")
    missing = {k: v - have.get(k, 0.0) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    if missing:
        roles = ", ".join(r.describe() for r in requests)
        raise PlacementError(
            f"the cluster lacks {_fmt(missing)} for roles {roles}; it has {_fmt({k: have.get(k, 0) for k in need})}. "
            f"Lower the roles' actors/cpus/gpus, or give the local Ray more logical CPUs "
            f"with cluster.num_cpus, or add nodes")


def place(req: RoleRequest, timeout_s: float):
    """Reserve one bundle per replica (packed onto few nodes) and wait until it is held."""
    pg = placement_group([req.bundle()] * req.actors, strategy="PACK", name=f"rayalign-{req.role}")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise PlacementError(
            f"role '{req.role}': placement of {req.actors} x {_fmt(req.bundle())} not ready after "
            f"{timeout_s:g}s (cluster.placement_timeout_s); free resources or lower the request"
        ) from None
    return pg
