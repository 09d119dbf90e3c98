"""What the two trainable roles (policy trainer, critic) share: one torch.distributed world per
role whose rendezvous the driver hands out, an AdamW + lr schedule under DeepSpeed, and saving
and loading that state with each rank's RNG.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from actors import lora
from actors.group import ALL, Measured, dispatch
from actors.runtime import node_address, set_dist_env, set_threads, skip_shm_comm_op

log = logging.getLogger(__name__)


def lr_lambda(warmup: int, total: int, schedule: str):
    """Multiplier of the peak lr at a step: linear warm-up, then constant/linear/cosine decay."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def clips_itself(cfg, role_cfg) -> bool:
    """Whether the actor clips gradients itself rather than DeepSpeed: ZeRO-0 in float32, where
    the gradients are plain ``.grad`` tensors and one foreach norm gives both the clip and the
    logged grad norm (DeepSpeed would compute the norm again, a parameter at a time)."""
    return role_cfg.zero_stage == 0 and cfg.model.dtype == "float32"


def deepspeed_config(cfg, role_cfg) -> dict:
    """DeepSpeed's config for a role whose replicas split ``train.batch_size`` samples a step."""
    per_actor = cfg.train.batch_size // role_cfg.actors
    micro = min(cfg.train.micro_batch_size, per_actor)
    return {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": per_actor // micro,
        "gradient_clipping": 0.0 if clips_itself(cfg, role_cfg) else cfg.optim.grad_clip,
        "zero_optimization": {"stage": role_cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedActor(Measured):
    """Base of a trainable role; ``role`` names its config section ("policy", "critic")."""

    role = ""

    def __init__(self, rank: int, world_size: int, cfg):
        self.rank, self.world_size, self.cfg = rank, world_size, cfg
        self.role_cfg = getattr(cfg, self.role)
        set_threads(self.role_cfg.cpus)
        self.engine = None

    def address(self) -> tuple[str, int]:
        return node_address()

    def join_world(self, master_addr: str, master_port: int) -> None:
        """This role's process group: gloo on CPU, NCCL when the replica holds a GPU."""
        import deepspeed
        set_dist_env(master_addr, master_port, self.rank, self.world_size)
        backend = "nccl" if torch.cuda.is_available() and self.role_cfg.gpus > 0 else "gloo"
        if backend == "gloo":
            skip_shm_comm_op()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   rank=self.rank, world_size=self.world_size)

    @property
    def lora(self) -> bool:
        """Whether this role trains LoRA adapters (``<role>.lora.rank`` > 0)."""
        return self.role_cfg.lora.rank > 0

    def adapt(self, model, kind: str):
        """``model`` with this role's LoRA adapters (actors/lora.py), or as it is."""
        if not self.lora:
            return model
        model = lora.apply_lora(model, self.role_cfg.lora, kind)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        if self.rank == 0:
            log.info("%s: LoRA rank %d trains %.3fM of %.2fM parameters", self.role,
                     self.role_cfg.lora.rank, trained / 1e6, total / 1e6)
        return model

    def build_engine(self, model, lr: float):
        """AdamW (no decay on biases and norms) with the configured schedule, under DeepSpeed.
        Only the parameters that train (all, or the LoRA adapters) get optimizer state."""
        import deepspeed
        o, cfg = self.cfg.optim, self.cfg
        trained = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in trained if p.ndim >= 2]
        no_decay = [p for p in trained if p.ndim < 2]
        # fused: one kernel per parameter group instead of a loop of element-wise ops (the
        # optimizer holds float32 or bfloat16 parameters: DeepSpeed keeps float32 masters for
        # float16 training)
        groups = [{"params": decay, "weight_decay": o.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]],  # LoRA adapters: no parameter without decay
            lr=lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.eps, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(o.warmup_steps, cfg.train.max_steps, o.schedule))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(cfg, self.role_cfg))
        if self.role_cfg.zero_stage == 0 and self.world_size == 1 and cfg.model.dtype == "float32":
            # alone, DeepSpeed's gradient all-reduce only flattens and copies the gradients back
            self.engine.enable_backward_allreduce = False
        return self.engine

    def step(self) -> None:
        """engine.step(), noting the global grad norm where DeepSpeed reports none (ZeRO-0),
        and clipping there first where the actor clips itself (:func:`clips_itself`). At the
        accumulation boundary the gradients are already all-reduced (in engine.backward)."""
        engine = self.engine
        if self.role_cfg.zero_stage == 0 and engine.is_gradient_accumulation_boundary():
            params = [p for p in engine.module.parameters() if p.grad is not None]
            if not params:
                self._own_norm = 0.0
            elif clips_itself(self.cfg, self.role_cfg) and self.cfg.optim.grad_clip > 0:
                self._own_norm = torch.nn.utils.clip_grad_norm_(
                    params, self.cfg.optim.grad_clip, foreach=True).item()
            else:
                self._own_norm = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
        engine.step()

    def grad_norm(self) -> float:
        """Global grad norm (before clipping) of the last optimizer step."""
        if self.role_cfg.zero_stage == 0:
            return getattr(self, "_own_norm", float("nan"))
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save_state(self, out: Path) -> None:
        """DeepSpeed state (model, optimizer, scheduler) and this rank's RNG under ``out``."""
        # with LoRA the frozen base weights are model.path's: only what trains is saved
        self.engine.save_checkpoint(str(out / "deepspeed"), tag="state", save_latest=False,
                                    exclude_frozen_parameters=self.lora)
        rng_dir = out / "rng"
        rng_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"torch": torch.get_rng_state()}, rng_dir / f"rank{self.rank}.pt")

    def load_state(self, src: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(src / "deepspeed"), tag="state",
                                              load_optimizer_states=True,
                                              load_lr_scheduler_states=True,
                                              load_module_strict=not self.lora)
        if path is None:
            raise RuntimeError(f"{self.role} rank {self.rank}: no DeepSpeed state in "
                               f"{src}/deepspeed")
        rng_file = src / "rng" / f"rank{self.rank}.pt"
        if rng_file.is_file():
            torch.set_rng_state(torch.load(rng_file)["torch"])

    def publish(self, ckpt_dir: str, remote) -> None:
        """Upload the checkpoint files this replica wrote when the run dir is a URI and this
        replica is on another node than the driver (the driver uploads its own node's)."""
        if remote is None or remote[2] == node_address()[0]:
            return
        from orchestrator.storage import RunStorage
        uri, dest, _ = remote
        storage = RunStorage(uri)
        storage.upload(str(Path(ckpt_dir).relative_to(storage.local_dir)), dest=dest)

    def fetch(self, ckpt_dir: str, remote) -> None:
        """Download a checkpoint to this node first when it is only on the run's URI."""
        if remote is None or Path(ckpt_dir).is_dir():
            return
        import fcntl
        from orchestrator.storage import RunStorage
        lock = Path(ckpt_dir).with_name(f".fetch-{Path(ckpt_dir).name}.lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "w") as fh:  # one download per node, however many replicas it holds
            fcntl.flock(fh, fcntl.LOCK_EX)
            if not Path(ckpt_dir).is_dir():
                RunStorage(remote[0]).download(remote[1])

    def save_model_dir(self, out_dir: Path, tokenizer=None) -> None:
        """The model as a Hugging Face dir ``out_dir`` (gathered under ZeRO-3), with
        ``tokenizer``. With LoRA: the adapters as a peft dir beside it (``adapter``), and
        ``out_dir`` the base with the adapters merged in, unless ``lora.save_merged`` is off."""
        module = self.engine.module
        dirs = [out_dir]
        if self.lora:
            adapter_dir = out_dir.with_name("adapter")
            state = lora.trained_state(module, self.role_cfg.zero_stage == 3, self.rank)
            if self.rank == 0:
                module.save_pretrained(str(adapter_dir), state_dict=state,
                                       safe_serialization=True, save_embedding_layers=False)
            dirs = [adapter_dir]
            if self.role_cfg.lora.save_merged:
                self._save_plain(lora.plain_model(module), out_dir)
                dirs.append(out_dir)
        else:
            self._save_plain(module, out_dir)
        if self.rank == 0 and tokenizer is not None:
            for d in dirs:
                tokenizer.save_pretrained(str(d))
        torch.distributed.barrier()

    def _save_plain(self, model, out_dir: Path) -> None:
        state = self.gathered_state_dict(model)
        if self.rank == 0:
            model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)

    def gathered_state_dict(self, model) -> dict | None:
        """``model``'s full state dict on rank 0 (None elsewhere), gathered under ZeRO-3; a
        model with LoRA adapters gives the plain model's, each adapted layer merged."""
        import deepspeed
        if lora.has_adapters(model):
            merged = {}
            # every rank iterates: under ZeRO-3 each layer's gather is a collective
            for name, tensor in lora.plain_parameters(model, self.role_cfg.zero_stage == 3):
                if self.rank == 0:
                    merged[name] = tensor.clone()
            return merged if self.rank == 0 else None
        if self.role_cfg.zero_stage == 3:
            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
                return ({k: v.detach().clone() for k, v in model.state_dict().items()}
                        if self.rank == 0 else None)
        return model.state_dict() if self.rank == 0 else None

    @dispatch(ALL)
    def pid(self) -> int:
        import os
        return os.getpid()
