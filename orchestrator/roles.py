"""Start Ray (or join a cluster) and bring up the roles a run needs, in their placement groups."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import ray

from actors.group import ActorGroup
from actors.policy_trainer import PolicyTrainer
from actors.reference import Reference
from orchestrator.placement import RoleRequest, check_capacity, place

log = logging.getLogger(__name__)


def connect(cfg) -> bool:
    """Join ``cluster.address`` or start an embedded local Ray; True if we started it."""
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, **kwargs)
    else:
        ray.init(num_cpus=cfg.cluster.num_cpus, **kwargs)
    return True


def _request(name: str, role_cfg) -> RoleRequest:
    return RoleRequest(name, role_cfg.actors, role_cfg.cpus, role_cfg.gpus)


def _env(role_cfg) -> dict:
    # DeepSpeed picks its accelerator from the machine; say CPU explicitly where no GPU is given
    return {"DS_ACCELERATOR": "cpu"} if role_cfg.gpus == 0 else {}


def start_group(name: str, cls: type, role_cfg, cfg) -> ActorGroup:
    req = _request(name, role_cfg)
    pg = place(req, cfg.cluster.placement_timeout_s)
    group = ActorGroup(name, cls, pg, role_cfg.actors, role_cfg.cpus, role_cfg.gpus,
                       init_args=(cfg,), env=_env(role_cfg))
    group.placement_group = pg
    return group


@dataclass
class DPORoles:
    policy: ActorGroup
    reference: ActorGroup | None

    def stop_reference(self) -> None:
        """Free the reference's resources once its log-probs are all precomputed."""
        if self.reference is not None:
            self.reference.kill()
            ray.util.remove_placement_group(self.reference.placement_group)
            self.reference = None

    def shutdown(self) -> None:
        self.stop_reference()
        self.policy.kill()
        ray.util.remove_placement_group(self.policy.placement_group)


def start_dpo_roles(cfg) -> DPORoles:
    check_capacity([_request("policy", cfg.policy), _request("reference", cfg.reference)])
    reference = start_group("reference", Reference, cfg.reference, cfg)
    policy = start_group("policy", PolicyTrainer, cfg.policy, cfg)
    master_addr, master_port = ray.get(policy.actors[0].address.remote())
    setup = policy.submit("setup", master_addr, master_port)
    ray.get([a.ready.remote() for a in reference.actors])
    n_params = policy.gather("setup", setup)[0]
    log.info("roles up: policy %d x ZeRO-%d (%.2fM parameters), reference %d",
             len(policy), cfg.policy.zero_stage, n_params / 1e6, len(reference))
    return DPORoles(policy, reference)
