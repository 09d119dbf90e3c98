"""Start Ray (or join a cluster) and bring up the roles a run needs, in their placement groups."""
from __future__ import annotations

import logging
import os

import ray

from actors.critic import Critic
from actors.group import ActorGroup
from actors.policy_trainer import PolicyTrainer
from actors.reference import Reference
from actors.reward import RewardScorer, RewardSettings
from actors.rollout import RolloutEngine, RolloutSettings
from orchestrator.config import FaultConfig
from orchestrator.placement import RoleRequest, check_capacity, place
from orchestrator.weight_sync import backend_for, connect as connect_sync, sync_weights

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """The driver cannot reach, or is not let into, the Ray cluster it is to join."""


def _unreachable(address: str) -> str | None:
    """Why nothing answers at a cluster address (host:port or ray://host:port), or None."""
    import socket
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not port.isdigit():
        return None  # "auto" and the like: ray.init resolves it
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def _token_source() -> str | None:
    """Where this process would take a Ray auth token from, if anywhere."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and os.path.isfile(path):
        return f"RAY_AUTH_TOKEN_PATH ({path})"
    default = os.path.expanduser("~/.ray/auth_token")
    return default if os.path.isfile(default) else None


def connect(cluster) -> bool:
    """Join ``cluster.address``, else the cluster in ``RAY_ADDRESS`` (set for a Ray job's
    entrypoint), else start an embedded local Ray; True if this call connected. A cluster that
    cannot be reached or refuses this client is a :class:`ClusterError` saying which."""
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":  # joining: ray.init refuses num_cpus for a running cluster
        if cluster.num_cpus is not None:
            log.info("joining the Ray cluster at %s; cluster.num_cpus is ignored", address)
        why = _unreachable(address)
        if why:
            raise ClusterError(f"cluster.address {address}: nothing answers there ({why}); is "
                               f"the head up, and is this its GCS address (host:6379 by default)?")
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:
            token = _token_source()
            hint = (f"the head refused this client with the token from {token}: it must be "
                    f"this cluster's (`ray get-auth-token` on the head)" if token else
                    "the head answers but refused this client: with token authentication (on "
                    "by default since Ray 2.60) set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to "
                    "the cluster's token (`ray get-auth-token` on the head)")
            raise ClusterError(f"cluster.address {address}: {hint} ({exc})") from None
    else:  # "local": never join a cluster some `ray start` left in /tmp/ray by accident
        ray.init(address="local", num_cpus=cluster.num_cpus, **kwargs)
    return True


def _request(name: str, role_cfg) -> RoleRequest:
    return RoleRequest(name, role_cfg.actors, role_cfg.cpus, role_cfg.gpus)


def _env(role_cfg) -> dict:
    """Environment of a role's actors. DeepSpeed picks its accelerator from the machine: say CPU
    where no GPU is given; on GPU, the driver's NCCL_* settings (NCCL_SOCKET_IFNAME,
    NCCL_IB_HCA, ...) reach the actors, whose NCCL groups need the same network choices."""
    if role_cfg.gpus == 0:
        return {"DS_ACCELERATOR": "cpu"}
    return {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}


def _group(name: str, cls: type, role_cfg, pg, owns_pg: bool, init_args: tuple,
           fault=None) -> ActorGroup:
    """The role's replicas in ``pg``; waits on them end by the role's deadline (its own
    ``deadline_s``, else ``fault.deadline_s``)."""
    fault = fault or FaultConfig()
    base = role_cfg.deadline_s if role_cfg.deadline_s is not None else fault.deadline_s
    group = ActorGroup(name, cls, pg, role_cfg.actors, role_cfg.cpus, role_cfg.gpus,
                       init_args=init_args, env=_env(role_cfg), deadline_s=base,
                       deadline_per_row_s=fault.deadline_per_row_s)
    group.placement_group, group.owns_placement = pg, owns_pg
    return group


def start_group(name: str, cls: type, role_cfg, timeout_s: float, init_args: tuple,
                cluster=None) -> ActorGroup:
    """Place role ``name`` in a placement group of its own and start its replicas, each
    constructed with ``init_args``; ``cluster`` (ClusterConfig) rules any autoscaler wait."""
    pg = place(_request(name, role_cfg), timeout_s, cluster)
    return _group(name, cls, role_cfg, pg, True, init_args)


def stop_group(group: ActorGroup) -> None:
    """Kill the replicas; free their placement group unless it is shared with a host role."""
    group.kill()
    if getattr(group, "owns_placement", True):
        ray.util.remove_placement_group(group.placement_group)


def hosts(cfg, names: list[str]) -> dict[str, str]:
    """Whose placement group each role uses: its ``colocate_with`` role, or its own."""
    return {n: getattr(getattr(cfg, n), "colocate_with", None) or n for n in names}


def merged_requests(cfg, names: list[str]) -> dict[str, RoleRequest]:
    """One request per placement group, keyed by host role: a colocated role adds its
    per-replica resources to its host's bundle (the config ensures equal replica counts)."""
    host = hosts(cfg, names)
    requests: dict[str, RoleRequest] = {}
    for n in sorted(names, key=lambda n: host[n] != n):  # hosts before their guests
        rc = getattr(cfg, n)
        if host[n] == n:
            requests[n] = _request(n, rc)
        else:
            r = requests[host[n]]
            requests[host[n]] = RoleRequest(f"{r.role}+{n}", r.actors, r.cpus + rc.cpus,
                                            r.gpus + rc.gpus)
    return requests


class Placement:
    """The placement groups of a run: one per role, except that a role with ``colocate_with``
    joins its host's group: replica i of both sits in bundle i, which holds the sum of their
    resources, so they share a node (and, with fractional ``gpus``, a device)."""

    def __init__(self, cfg, names: list[str]):
        self.cfg = cfg
        self.host = hosts(cfg, names)
        requests = merged_requests(cfg, names)
        check_capacity(list(requests.values()), cfg.cluster)
        self.groups: dict[str, object] = {}
        for h, req in requests.items():
            self.groups[h] = place(req, cfg.cluster.placement_timeout_s, cfg.cluster)
            if req.role != h:
                log.info("colocated in one placement group: %s", req.describe())

    def start(self, name: str, cls: type, init_args: tuple) -> ActorGroup:
        h = self.host[name]
        return _group(name, cls, getattr(self.cfg, name), self.groups[h], h == name, init_args,
                      self.cfg.fault)

    def release(self) -> None:
        for pg in self.groups.values():
            ray.util.remove_placement_group(pg)
        self.groups = {}


TRAINER_CLASSES = {"policy": PolicyTrainer, "critic": Critic}


class BaseReference:
    """The reference role played by the policy trainer with its LoRA adapters switched off
    (``reference.from: policy_base``): the driver calls it as it would a reference group,
    and each call goes to the current policy group's adapter-off twin of the method. A call is
    padded to a multiple of the trainer ranks (under ZeRO-3 they compute in lockstep) and
    the padding's results dropped. A failure names the policy, the process that holds it."""

    METHODS = {"logprobs": "base_logprobs", "token_logprobs": "base_token_logprobs"}

    def __init__(self, roles: "RoleSet"):
        self.roles, self._sizes = roles, {}

    @property
    def group(self) -> ActorGroup:
        return self.roles.policy

    def __len__(self) -> int:
        return len(self.group)

    def submit(self, method: str, items: list) -> list:
        from orchestrator.progress import pad_to_multiple
        refs = self.group.submit(self.METHODS[method], pad_to_multiple(list(items), len(self)))
        self._sizes[refs[0]] = len(items)
        return refs

    def gather(self, method: str, refs: list) -> list:
        return self.group.gather(self.METHODS[method], refs)[:self._sizes.pop(refs[0])]

    def run(self, method: str, items: list) -> list:
        return self.gather(method, self.submit(method, items))


class RoleSet:
    """The groups of a run in their placement groups, and replacing one in the same bundles:
    a dead or hung replica's whole group goes (its peers may wait on it) and a new one starts."""

    def __init__(self, cfg, placement: Placement):
        self.cfg, self.placement = cfg, placement
        self.groups: list[ActorGroup] = []
        self.retired: list[ActorGroup] = []  # replaced or stopped early: usage() counts them

    @property
    def trainables(self) -> list[ActorGroup]:
        """The groups whose state a checkpoint holds."""
        return [g for g in (getattr(self, "policy", None), getattr(self, "critic", None))
                if g is not None]

    def _keep(self, group: ActorGroup) -> ActorGroup:
        self.groups.append(group)
        return group

    def _retire(self, name: str) -> None:
        old = getattr(self, name)
        old.kill()
        self.groups.remove(old)
        self.retired.append(old)

    def _restart(self, name: str, cls: type, args: tuple) -> ActorGroup:
        self._retire(name)
        new = self._keep(self.placement.start(name, cls, args))
        setattr(self, name, new)
        return new

    def replace(self, name: str) -> ActorGroup:
        """A new reference group (the other kinds: :class:`RLRoles`)."""
        if name != "reference":
            raise ValueError(f"role {name} cannot be replaced in place here")
        new = self._restart(name, Reference, (self.cfg,))
        return _loaded(new)

    def replace_trainers(self, names: list[str], method: str | None = None) -> None:
        """New groups for trainer roles ``names`` (policy, critic): each builds a new
        torch.distributed world and DeepSpeed engine from the model dir; the caller loads the
        checkpoint to go on from. ``method``: the call the dead rank was in."""
        new = [self._restart(n, TRAINER_CLASSES[n], (self.cfg,)) for n in names]
        setup_trainers(*new)

    def shutdown(self) -> None:
        for group in self.groups:
            group.kill()
        if getattr(self, "elastic", None) is not None:
            self.elastic.release()
        self.placement.release()

    def usage(self) -> dict:
        """Per role: resources held, for how long, peak memory (ActorGroup.usage); the seconds
        of a replaced or stopped group count too."""
        return merge_usage([{g.role: g.usage()} for g in self.groups + self.retired])


class OfflineRoles(RoleSet):
    """The trainer group, and for DPO the reference group."""

    def __init__(self, cfg):
        super().__init__(cfg, Placement(cfg, cfg.roles()))
        self.reference = None
        try:
            if "reference" in cfg.roles():
                self.reference = self._keep(self.placement.start("reference", Reference, (cfg,)))
            self.policy = self._keep(self.placement.start("policy", PolicyTrainer, (cfg,)))
            self.n_params = setup_trainers(self.policy)[0]  # the reference loads meanwhile
            if self.reference is not None:
                _loaded(self.reference)
            elif cfg.algorithm == "dpo":  # reference.from: policy_base
                self.reference = BaseReference(self)
        except BaseException:
            self.shutdown()
            raise

    def stop_reference(self) -> None:
        """Free the reference's resources once its log-probs are all precomputed."""
        if isinstance(self.reference, BaseReference):
            self.reference = None  # nothing of its own to free
        elif self.reference is not None:
            self._retire("reference")
            if getattr(self.reference, "owns_placement", True):
                ray.util.remove_placement_group(self.reference.placement_group)
                self.placement.groups.pop("reference", None)
            self.reference = None


def merge_usage(parts: list[dict]) -> dict:
    """The usage of runs one after another (iterative DPO's rounds): per role, the seconds
    added, the largest replica count, CPUs, GPUs and peak memory."""
    out: dict = {}
    for part in parts:
        for role, u in part.items():
            m = out.setdefault(role, dict(u, seconds=0.0))
            m["seconds"] += u["seconds"]
            for key in ("actors", "cpus", "gpus", "peak_rss_mib"):
                if u.get(key) is not None:
                    m[key] = max(m.get(key) or 0, u[key])
    return out


def _loaded(*groups: ActorGroup) -> ActorGroup | None:
    """Wait until every replica of ``groups`` (reference, reward: they load in their
    constructor) is up; the first group."""
    ray.get([a.ready.remote() for g in groups for a in g.actors])
    return groups[0] if groups else None


def setup_trainers(*groups: ActorGroup) -> list[int]:
    """Each trainable group joins its own torch.distributed world (rendezvous at its replica
    0) and builds its DeepSpeed engine; the groups set up side by side. Returns #params each."""
    refs = []
    for group in groups:
        addr, port = ray.get(group.actors[0].address.remote())
        refs.append(group.submit("setup", addr, port))
    return [group.gather("setup", r)[0] for group, r in zip(groups, refs)]


def start_offline_roles(cfg) -> OfflineRoles:
    roles = OfflineRoles(cfg)
    log.info("roles up: %s trainer %d x ZeRO-%d (%.2fM parameters)%s", cfg.algorithm,
             len(roles.policy), cfg.policy.zero_stage, roles.n_params / 1e6,
             "" if roles.reference is None else ", reference: the policy's base weights"
             if isinstance(roles.reference, BaseReference) else
             f", reference {len(roles.reference)}")
    return roles


def _engines_started(group: ActorGroup) -> ActorGroup:
    ray.get([a.workers.remote() for a in group.actors])  # surfaces a failed engine start here
    return group


def start_rollout(model_cfg, rollout, timeout_s: float, cluster=None) -> ActorGroup:
    """The rollout group on its own: ``rollout.actors`` engines serving ``model_cfg.path``."""
    rollout.check()
    check_capacity([_request("rollout", rollout)], cluster)
    return _engines_started(start_group("rollout", engine_class(rollout), rollout, timeout_s,
                                        (rollout_settings(model_cfg, rollout),), cluster))


def rollout_settings(model_cfg, rollout):
    """The settings of one engine, from the validated ``model`` and ``rollout`` sections."""
    return RolloutSettings(
        model_path=model_cfg.path, tensor_parallel_size=rollout.tensor_parallel_size,
        max_model_len=rollout.max_model_len, dtype=model_cfg.dtype, seed=rollout.seed,
        enforce_eager=rollout.enforce_eager, gpu_memory_utilization=rollout.gpu_memory_utilization,
        kv_cache_gib=rollout.kv_cache_gib, cpu_threads_bind=rollout.cpu_threads_bind,
        in_actor=rollout.in_actor, long_prompt=rollout.long_prompt,
        weight_backend=backend_for(rollout.gpus), backend=rollout.backend,
        cpus=rollout.cpus, max_num_seqs=rollout.max_num_seqs,
        trust_remote_code=model_cfg.trust_remote_code)


def engine_class(rollout) -> type:
    """The actor class of the rollout role's ``backend``."""
    if rollout.backend == "hf":
        from actors.rollout_hf import HFRolloutEngine
        return HFRolloutEngine
    return RolloutEngine


def reward_settings(cfg) -> RewardSettings:
    r = cfg.reward
    return RewardSettings(kind=r.kind, model_path=r.model_path, function=r.function, url=r.url,
                          timeout_s=r.timeout_s, retries=r.retries, micro_batch=r.micro_batch,
                          on_failure=r.on_failure, auth_env=r.auth_env, ca_bundle=r.ca_bundle,
                          dtype=cfg.model.dtype, cpus=r.cpus, gpus=r.gpus,
                          trust_remote_code=cfg.model.trust_remote_code)


class RLRoles(RoleSet):
    """Rollout, policy, critic (PPO), reference and reward groups, and the weight-sync group
    between the policy and the engines."""

    SYNC_METHODS = ("update_weights", "check_update", "init_weight_sync")

    def __init__(self, cfg):
        super().__init__(cfg, Placement(cfg, cfg.roles()))
        placement = self.placement
        self.elastic = None  # orchestrator/elastic.py, set by the loop that owns the run dir
        self.hybrid = cfg.hybrid  # the policy generates: no engines, nothing to sync
        self._engines = None
        try:
            if not self.hybrid:
                self.rollout = self._keep(placement.start(
                    "rollout", engine_class(cfg.rollout),
                    (rollout_settings(cfg.model, cfg.rollout),)))
                if 0 < cfg.rollout.gpus < 1:  # it may share a device: it starts alone, as
                    _engines_started(self.rollout)  # vLLM sizes its cache by the memory it finds
            self.policy = self._keep(placement.start("policy", PolicyTrainer, (cfg,)))
            self.critic = (self._keep(placement.start("critic", Critic, (cfg,)))
                           if cfg.uses_critic else None)
            self.reference = (self._keep(placement.start("reference", Reference, (cfg,)))
                              if "reference" in cfg.roles() else BaseReference(self))
            self.reward = self._keep(placement.start("reward", RewardScorer,
                                                     (reward_settings(cfg),)))
            setup_trainers(*self.trainables)  # the engines and scorers load meanwhile
            _loaded(*[g for g in self.groups if g.role in ("reference", "reward")])
            if not self.hybrid:
                _engines_started(self.rollout)
            self.connect_engines(self.rollout)
        except BaseException:
            self.shutdown()
            raise

    @property
    def rollout(self) -> ActorGroup:
        """The group that generates: the engines, or with the hybrid engine the policy."""
        return self.policy if self.hybrid else self._engines

    @rollout.setter
    def rollout(self, group: ActorGroup) -> None:
        self._engines = group

    def sync(self) -> dict | None:
        """Weights from the trainer to the engines (nothing to do for the hybrid engine)."""
        if self.hybrid:
            return None
        return sync_weights(self.policy, self.rollout, self.cfg.weight_sync.bucket_bytes)

    def connect_engines(self, engines: ActorGroup) -> None:
        """A new weight-sync group of the policy and ``engines`` (after any change of either)."""
        if self.hybrid:
            return
        cfg = self.cfg
        connect_sync(self.policy, engines, cfg.weight_sync.timeout_s,
                     backend_for(cfg.rollout.gpus), cfg.weight_sync.bucket_bytes,
                     cfg.weight_sync.shared_memory)

    def replace(self, name: str, failure=None) -> ActorGroup:
        """Kill role ``name``'s replicas (a dead or hung one among them) and start new ones in
        the same placement bundles; new engines join a new weight-sync group with the trainer
        and receive its current weights. Rollout, reward and reference only. A rollout
        ``failure`` outside a weight sync replaces only its engine (orchestrator/elastic.py),
        or, with no capacity left for it, goes on with the others."""
        cfg = self.cfg
        if name == "rollout" and failure is not None and self.elastic is not None \
                and failure.method not in self.SYNC_METHODS \
                and not getattr(cfg.rollout, "colocate_with", None):
            self.elastic.lose(failure.rank)
            self.elastic.reconcile(wait_s=cfg.cluster.placement_timeout_s)
            if len(self.rollout) == 0:
                raise failure
            return self.rollout
        if name == "reference":
            return super().replace(name)
        if name == "reward":
            return _loaded(self._restart(name, RewardScorer, (reward_settings(cfg),)))
        new = _engines_started(self._restart(
            "rollout", engine_class(cfg.rollout), (rollout_settings(cfg.model, cfg.rollout),)))
        if self.elastic is not None:
            self.elastic.adopt()  # added engines come back as the next step starts
        self.connect_engines(new)
        sync_weights(self.policy, new, cfg.weight_sync.bucket_bytes)
        return new

    def replace_trainers(self, names: list[str], method: str | None = None) -> None:
        """New trainer groups (see :meth:`RoleSet.replace_trainers`); a new policy opens a new
        weight-sync group with the engines. The engines are replaced as well where they may
        still wait on the dead sender (it died in a sync) or where the transport is NCCL (a
        vLLM communicator is not re-opened in place)."""
        super().replace_trainers(names, method)
        if "policy" not in names or self.hybrid:
            return
        if method in ("send_weights", "weight_update_info") or \
                backend_for(self.cfg.rollout.gpus) == "nccl":
            self.replace("rollout")
        else:
            self.connect_engines(self.rollout)
