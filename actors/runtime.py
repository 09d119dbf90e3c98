"""What every actor does on start: threads, addresses, model loading."""
from __future__ import annotations

import os
import socket
import warnings

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def set_threads(cpus: float) -> None:
    """Use as many torch threads as the role reserved CPUs (at least one); quiet HF loading."""
    n = max(1, int(round(cpus)))
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed from JIT-building its CPU shared-memory all-reduce op.

    That op only serves ``inference_all_reduce``; training collectives go through
    torch.distributed (gloo) either way. Building it costs about a minute on a fresh
    machine, and concurrent ranks rebuild it over each other.
    """
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def node_address() -> tuple[str, int]:
    """This node's IP and a free TCP port on it, for a torch.distributed rendezvous."""
    import ray
    ip = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ip, port


def set_dist_env(master_addr: str, master_port: int, rank: int, world_size: int) -> None:
    """The env:// rendezvous variables, set by the actor itself (no launcher)."""
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")


def load_causal_lm(model_cfg, trainable: bool):
    """A transformers causal LM from ``model.path`` in the configured dtype."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(
        model_cfg.path, dtype=DTYPES[model_cfg.dtype],
        attn_implementation=model_cfg.attn_implementation)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)
