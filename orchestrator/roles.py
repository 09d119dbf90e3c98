"""Start Ray (or join a cluster) and bring up the roles a run needs, in their placement groups."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import ray

from actors.group import ActorGroup
from actors.policy_trainer import PolicyTrainer
from actors.reference import Reference
from actors.rollout import RolloutEngine, RolloutSettings
from orchestrator.placement import RoleRequest, check_capacity, place

log = logging.getLogger(__name__)


def connect(cluster) -> bool:
    """Join ``cluster.address`` or start an embedded local Ray; True if we started it."""
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    if cluster.address:
        ray.init(address=cluster.address, **kwargs)
    else:
        ray.init(num_cpus=cluster.num_cpus, **kwargs)
    return True


def _request(name: str, role_cfg) -> RoleRequest:
    return RoleRequest(name, role_cfg.actors, role_cfg.cpus, role_cfg.gpus)


def _env(role_cfg) -> dict:
    # DeepSpeed picks its accelerator from the machine; say CPU explicitly where no GPU is given
    return {"DS_ACCELERATOR": "cpu"} if role_cfg.gpus == 0 else {}


def start_group(name: str, cls: type, role_cfg, timeout_s: float, init_args: tuple) -> ActorGroup:
    """Place role ``name`` and start its replicas, each constructed with ``init_args``."""
    req = _request(name, role_cfg)
    pg = place(req, timeout_s)
    group = ActorGroup(name, cls, pg, role_cfg.actors, role_cfg.cpus, role_cfg.gpus,
                       init_args=init_args, env=_env(role_cfg))
    group.placement_group = pg
    return group


def stop_group(group: ActorGroup) -> None:
    group.kill()
    ray.util.remove_placement_group(group.placement_group)


@dataclass
class DPORoles:
    policy: ActorGroup
    reference: ActorGroup | None

    def stop_reference(self) -> None:
        """Free the reference's resources once its log-probs are all precomputed."""
        if self.reference is not None:
            stop_group(self.reference)
            self.reference = None

    def shutdown(self) -> None:
        self.stop_reference()
        stop_group(self.policy)


def start_dpo_roles(cfg) -> DPORoles:
    check_capacity([_request("policy", cfg.policy), _request("reference", cfg.reference)])
    timeout = cfg.cluster.placement_timeout_s
    reference = start_group("reference", Reference, cfg.reference, timeout, (cfg,))
    policy = start_group("policy", PolicyTrainer, cfg.policy, timeout, (cfg,))
    master_addr, master_port = ray.get(policy.actors[0].address.remote())
    setup = policy.submit("setup", master_addr, master_port)
    ray.get([a.ready.remote() for a in reference.actors])
    n_params = policy.gather("setup", setup)[0]
    log.info("roles up: policy %d x ZeRO-%d (%.2fM parameters), reference %d",
             len(policy), cfg.policy.zero_stage, n_params / 1e6, len(reference))
    return DPORoles(policy, reference)


def start_rollout(model_cfg, rollout, timeout_s: float) -> ActorGroup:
    """The rollout group: ``rollout.actors`` vLLM engines serving ``model_cfg.path``."""
    check_capacity([_request("rollout", rollout)])
    group = start_group("rollout", RolloutEngine, rollout, timeout_s,
                        (rollout_settings(model_cfg, rollout),))
    ray.get([a.workers.remote() for a in group.actors])  # surfaces a failed engine start here
    return group


def rollout_settings(model_cfg, rollout):
    """The settings of one engine, from the validated ``model`` and ``rollout`` sections."""
    return RolloutSettings(
        model_path=model_cfg.path, tensor_parallel_size=rollout.tensor_parallel_size,
        max_model_len=rollout.max_model_len, dtype=model_cfg.dtype, seed=rollout.seed,
        enforce_eager=rollout.enforce_eager, gpu_memory_utilization=rollout.gpu_memory_utilization,
        kv_cache_gib=rollout.kv_cache_gib, cpu_threads_bind=rollout.cpu_threads_bind,
        in_actor=rollout.in_actor, long_prompt=rollout.long_prompt)
