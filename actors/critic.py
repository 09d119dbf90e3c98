"""The critic role (PPO): a value model under DeepSpeed, one replica per rank.

The value model is the policy's transformer (or a reward model's) with a one-output linear
head on every position: the value of the state before response token t is read at the
position that predicts token t, the same positions the policy's log-probs come from.
Trained on the GAE returns with the clipped value loss of orchestrator/rl_losses.py.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from actors.deepspeed_actor import DeepSpeedActor
from actors.group import ALL, SCATTER, SHARDS, dispatch
from actors.logprobs import Sequence, build_inputs, by_sequence, model_kwargs, per_response_token
from actors.runtime import DTYPES, attention, load_tokenizer
from orchestrator.batches import RolloutBatch
from orchestrator.rl_losses import value_loss

log = logging.getLogger(__name__)


def load_value_model(path: str, dtype: str, attn_implementation: str,
                     trust_remote_code: bool = False):
    """A token-level 1-output head over the transformer in ``path``, without dropout.

    A reward model's head (``score``) is kept; a head the checkpoint lacks starts at zero, so
    the first values are 0 rather than noise, and the first advantages are plain returns.
    """
    from transformers import AutoConfig, AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    config.num_labels, config.classifier_dropout = 1, 0.0
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a missing head is expected: it is made here
    try:
        model, info = AutoModelForTokenClassification.from_pretrained(
            path, config=config, dtype=DTYPES[dtype],
            attn_implementation=attention(attn_implementation),
            output_loading_info=True, trust_remote_code=trust_remote_code)
    finally:
        hf_logging.set_verbosity(verbosity)
    log.info("value model from %s; new head parameters: %s", path,
             [k for k in info["missing_keys"] if k.startswith(("score.", "classifier."))]
             or "none")
    head = "score" if hasattr(model, "score") else "classifier"  # GPT-NeoX: classifier
    with torch.no_grad():
        for name, param in getattr(model, head).named_parameters():
            if f"{head}.{name}" in info["missing_keys"]:
                param.zero_()
    return model


def token_values(model, inputs) -> torch.Tensor:
    """Value at each position that predicts a response token, flat in sequence order."""
    out = model(**model_kwargs(model, inputs)).logits.float().reshape(-1)
    return by_sequence(out[inputs.keep.to(out.device)], inputs)


class Critic(DeepSpeedActor):
    role = "critic"

    @dispatch(ALL)
    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the critics' process group, load the value model, build DeepSpeed."""
        cfg = self.cfg
        self.join_world(master_addr, master_port)
        torch.manual_seed(cfg.train.seed)
        path = cfg.critic.model_path or cfg.model.path
        model = load_value_model(path, cfg.model.dtype, cfg.model.attn_implementation,
                                 cfg.model.trust_remote_code)
        if cfg.critic.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model = self.adapt(model, "classifier")
        self.tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.build_engine(model, cfg.critic.lr)
        return sum(p.numel() for p in model.parameters())

    @dispatch(SCATTER)
    def values(self, sequences: list[Sequence]) -> list[list[float]]:
        """Per-response-token values of each (prompt, response)."""
        self.engine.eval()
        return per_response_token(self.engine, sequences, self.cfg.train.micro_batch_size,
                                  self.cfg.packing, self.pad_id, token_values)

    @dispatch(SHARDS)
    def critic_step(self, batch: RolloutBatch) -> dict:
        """Value updates over this replica's rows (rl.epochs passes); sums the driver averages."""
        rl, engine = self.cfg.rl, self.engine
        micro = min(self.cfg.train.micro_batch_size, len(batch))
        sums = {"samples": 0.0, "value_loss": 0.0, "vf_clip_frac": 0.0}
        engine.train()
        for _ in range(rl.epochs):
            for mb in batch.micro_batches(micro):
                inputs = build_inputs(mb.sequences, self.cfg.packing, self.pad_id)
                mask = mb.mask.bool()
                values = torch.zeros(mask.shape, dtype=torch.float32)
                values = values.masked_scatter(mask, token_values(engine, inputs))
                loss, stats = value_loss(values, mb.values, mb.returns, mask, clip=rl.value_clip,
                                         agg=rl.aggregation)
                engine.backward(loss)
                self.step()
                n = len(mb)
                sums["value_loss"] += loss.item() * n
                sums["vf_clip_frac"] += stats["vf_clip_frac"] * n
                sums["samples"] += n
        sums["critic_grad_norm"] = self.grad_norm()
        return sums

    @dispatch(ALL)
    def save(self, ckpt_dir: str, remote=None) -> None:
        """DeepSpeed state + RNG under <ckpt>/critic, and the value model as an HF dir."""
        out = Path(ckpt_dir) / "critic"
        self.save_state(out)
        self.save_model_dir(out / "model")
        self.publish(ckpt_dir, remote)

    @dispatch(ALL)
    def load(self, ckpt_dir: str, remote=None) -> None:
        self.fetch(ckpt_dir, remote)
        self.load_state(Path(ckpt_dir) / "critic")
