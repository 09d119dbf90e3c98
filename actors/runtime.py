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
    warnings.filterwarnings("ignore", message=".*(all_gather_into_tensor|reduce_scatter_tensor).*",
                            category=FutureWarning)


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


def attention(name: str) -> str:
    """``model.attn_implementation`` as transformers takes it; the first use of ``varlen``
    registers it (actors/packed_attention.py) in this process."""
    if name == "varlen":
        import actors.packed_attention  # noqa: F401  (registers itself on import)
    return name


def load_causal_lm(model_cfg, trainable: bool):
    """A transformers causal LM from ``model.path`` in the configured dtype."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(
        model_cfg.path, dtype=DTYPES[model_cfg.dtype],
        attn_implementation=attention(model_cfg.attn_implementation),
        trust_remote_code=model_cfg.trust_remote_code)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_reward_model(model_cfg, pad_id: int):
    """A one-output sequence classifier from ``model.path`` to train as a reward model.

    A causal LM dir (typically an SFT model) gives its transformer and a new score head (its
    LM head is not used); a reward model dir keeps its own head. The pad id is set so that the
    saved model's own pooling finds each sequence's last token when it scores padded batches.
    """
    import logging

    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging
    config = AutoConfig.from_pretrained(model_cfg.path,
                                        trust_remote_code=model_cfg.trust_remote_code)
    config.num_labels = 1
    text_cfg = config.get_text_config()
    if text_cfg.pad_token_id is None:
        text_cfg.pad_token_id = pad_id
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # an unused LM head and a new score head are expected
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            model_cfg.path, config=config, dtype=DTYPES[model_cfg.dtype],
            attn_implementation=attention(model_cfg.attn_implementation), output_loading_info=True,
            trust_remote_code=model_cfg.trust_remote_code)
    finally:
        hf_logging.set_verbosity(verbosity)
    new = [k for k in info["missing_keys"] if not k.startswith("score.")]
    if new:
        raise ValueError(f"model.path: {model_cfg.path} lacks weights of the transformer "
                         f"({sorted(new)[:4]}); give a causal LM or reward model dir")
    logging.getLogger(__name__).info(
        "reward model from %s; new score head: %s", model_cfg.path,
        "yes" if any(k.startswith("score.") for k in info["missing_keys"]) else "no")
    return model.train(True)
