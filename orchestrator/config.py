"""The run configuration: one typed schema, loaded from YAML plus dotted overrides.

These dataclasses are also the public Python API for driver scripts::

    from orchestrator import RunConfig, train
    cfg = RunConfig.from_yaml("configs/dpo-tiny.yaml", ["optim.lr=1e-5"])
    result = train(cfg)
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from orchestrator import trackers
from orchestrator.schema import ConfigError, build, describe, param, plain, set_dotted


OFFLINE = ("dpo", "sft", "rm")  # trained from a fixed dataset; the rest sample as they train


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-6 as a string; accept exponent floats without a dot too."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str | Path, what: str = "config"):
    """A YAML file's content; a missing or unparsable file is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    try:
        return parse_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None


@dataclass
class ModelConfig:
    path: str = param(help="local Hugging Face model dir (or hub name where a hub is reachable)")
    dtype: str = param("float32", "parameter dtype for training and log-probs",
                       choices=("float32", "bfloat16", "float16"))
    attn_implementation: str = param("varlen", "attention kernel passed to transformers; varlen: "
                                               "packed sequences in one row without padding, "
                                               "attention within each (actors/packed_attention.py; "
                                               "sdpa outside packed forwards)",
                                     choices=("varlen", "sdpa", "eager"))
    trust_remote_code: bool = param(False, "run the modelling and tokenizer code a checkpoint "
                                           "ships (config.json auto_map) for every model of the "
                                           "run; only for checkpoints you trust")


@dataclass
class DataConfig:
    train: str = param(help="training file (.jsonl, .parquet or .arrow): preference pairs (dpo, "
                            "rm), prompt and response or conversations (sft), prompts (online)")
    eval: Optional[str] = param(None, "held-out file of the same kind; none means no held-out "
                                      "metrics")
    max_length: int = param(512, "longest prompt+response in tokens", ge=8)
    on_bad_row: str = param("error", "a malformed row stops the run, or is skipped and counted; "
                                     "truncate: a too-long row loses its response's end (both "
                                     "responses of a pair; the prompt stays) and is counted, "
                                     "other bad rows stop the run",
                            choices=("error", "skip", "truncate"))
    prompt_key: str = param("prompt", "column holding the prompt (string or chat messages)")
    chosen_key: str = param("chosen", "column holding the preferred response")
    rejected_key: str = param("rejected", "column holding the dispreferred response")
    response_key: str = param("response", "sft: column holding the response to the prompt")
    messages_key: str = param("messages", "sft: column holding a whole conversation (chat "
                                          "messages); every assistant turn is trained")
    margin_key: Optional[str] = param(None, "rm: numeric column with how much more the chosen "
                                            "is preferred (subtracted inside the loss); none: 0")


def colocation(*hosts: str):
    """The ``colocate_with`` key of a role that may share the bundles of one of ``hosts``."""
    return param(None, f"share the placement bundles (same nodes and devices) of the "
                       f"{' or the '.join(hosts)} instead of a placement group of its own",
                 choices=hosts)


@dataclass
class RoleConfig:
    actors: int = param(1, "data-parallel replicas of this role", ge=1)
    cpus: float = param(1.0, "CPUs reserved per replica (also its torch thread count)", gt=0)
    gpus: float = param(0.0, "GPUs reserved per replica", ge=0)
    deadline_s: Optional[float] = param(None, "longest wait for one call to this role before it "
                                              "counts as hung (plus fault.deadline_per_row_s a "
                                              "row); none: fault.deadline_s", gt=0)


@dataclass
class LoraConfig:
    rank: int = param(0, "LoRA rank r of the adapters trained instead of the full weights; 0 "
                         "trains every weight", ge=0)
    alpha: float = param(16.0, "LoRA alpha: the adapters' update is scaled by alpha / rank", gt=0)
    dropout: float = param(0.0, "dropout on the adapters' input", ge=0, lt=1)
    target_modules: list[str] = param(help="modules that get adapters, by name or name suffix "
                                           "(q_proj, v_proj, embed_tokens, ...); all-linear: "
                                           "every linear layer but the output head; adapters "
                                           "on a table tied to the output head change both",
                                      factory=lambda: ["all-linear"])
    save_merged: bool = param(True, "checkpoints also hold the base weights with the adapters "
                                    "merged in, as a plain Hugging Face dir (step-N/model); "
                                    "false: the adapter alone (step-N/adapter)")


@dataclass
class PolicyConfig(RoleConfig):
    zero_stage: int = param(2, "DeepSpeed ZeRO stage", ge=0, le=3)
    gradient_checkpointing: bool = param(False, "recompute activations in backward to save memory")
    lora: LoraConfig = param(help="LoRA adapters (peft) instead of full fine-tuning",
                             factory=LoraConfig)


@dataclass
class CriticConfig(PolicyConfig):
    model_path: Optional[str] = param(None, "starting weights of the value model: a causal LM or a "
                                            "1-label reward model dir; none: the policy's model.path")
    lr: float = param(1e-5, "critic's peak learning rate (schedule and AdamW settings from optim)",
                      gt=0, le=1)
    colocate_with: Optional[str] = colocation("policy")


@dataclass
class ReferenceConfig(RoleConfig):
    precompute: bool = param(True, "score the whole dataset once before training "
                                   "instead of every batch")
    source: str = param("model", "model: a frozen copy of model.path in its own actors; "
                                 "policy_base: the policy trainer's own base weights with its "
                                 "LoRA adapters switched off (no reference actors at all)",
                        choices=("model", "policy_base"), key="from")
    colocate_with: Optional[str] = colocation("policy")


@dataclass
class RolloutConfig(RoleConfig):
    tensor_parallel_size: int = param(1, "workers (chips) per engine; the weights are sharded "
                                         "over them", ge=1)
    max_model_len: int = param(1024, "longest prompt + response an engine accepts, in tokens",
                               ge=16)
    seed: int = param(0, "sampling seed of engine 0; engine i uses seed + i", ge=0)
    enforce_eager: bool = param(True, "no graph capture or compilation: faster start, slower "
                                      "decoding on GPU")
    gpu_memory_utilization: float = param(0.5, "GPU: fraction of device memory for weights and "
                                               "KV cache", gt=0, le=1)
    kv_cache_gib: float = param(1.0, "CPU: KV-cache size per engine in GiB", gt=0)
    cpu_threads_bind: str = param("auto", "CPU: vLLM's OpenMP binding ('auto', 'nobind', or "
                                          "core lists such as '0-3')")
    in_actor: bool = param(True, "run vLLM's engine core (and at tp=1 its worker) in the actor "
                                 "process instead of spawning them")
    long_prompt: str = param("error", "a prompt longer than max_model_len - 1 tokens: stop with an "
                                      "error, keep its last tokens, or skip it",
                             choices=("error", "truncate", "skip"))
    max_num_seqs: Optional[int] = param(None, "most sequences an engine decodes at once (the "
                                              "rest wait); none: vLLM's default, 256 for hf",
                                        ge=1)
    backend: str = param("vllm", "what generates: vLLM engines, or transformers' generate in the "
                                 "actor (hf: CPU only, tensor_parallel_size 1; faster than vLLM "
                                 "for tiny models on a CPU)", choices=("vllm", "hf"))
    stream_groups: int = param(0, "online RL: each engine hands back every N prompts whose "
                                  "samples are all done, and their scoring starts while it "
                                  "samples the rest; 0: a step's samples are scored once all "
                                  "are in", ge=0)
    colocate_with: Optional[str] = param(
        None, "policy: the hybrid engine, generation inside the policy trainer's actors (no "
              "rollout actors; hf: with the trainer's own module, no weight copy; vllm: an "
              "engine in the trainer's process, weights copied in memory after each update, "
              "asleep while the trainer trains on GPU); none: engines of their own",
        choices=("policy",))

    def check(self) -> None:
        """Rules between the keys of this section (also used by ``rayalign generate``)."""
        if self.backend == "hf" and self.gpus > 0:
            raise ConfigError(f"rollout.gpus: {self.gpus:g} with rollout.backend hf; the hf "
                              f"backend runs on CPU only: set rollout.gpus to 0 or use "
                              f"rollout.backend vllm")
        if self.colocate_with == "policy" and self.backend == "vllm" and (
                self.tensor_parallel_size != 1 or not self.in_actor):
            raise ConfigError(f"rollout.tensor_parallel_size: {self.tensor_parallel_size}, "
                              f"rollout.in_actor: {self.in_actor}; the hybrid engine runs vLLM "
                              f"whole inside each trainer process: set tensor_parallel_size 1 "
                              f"and in_actor true, or drop rollout.colocate_with")
        if self.colocate_with == "policy" and self.stream_groups:
            raise ConfigError(f"rollout.stream_groups: {self.stream_groups} with "
                              f"rollout.colocate_with: policy; the hybrid engine samples in the "
                              f"trainer, which scores nothing until it is done: set "
                              f"stream_groups to 0 or drop colocate_with")
        if self.backend == "hf" and self.tensor_parallel_size != 1:
            raise ConfigError(f"rollout.tensor_parallel_size: {self.tensor_parallel_size} with "
                              f"rollout.backend hf, which holds the whole model in one process; "
                              f"set it to 1 or use rollout.backend vllm")


@dataclass
class WeightSyncConfig:
    bucket_mb: float = param(16.0, "MiB per broadcast: parameters are packed into buckets of "
                                   "this size", gt=0)
    timeout_s: float = param(300.0, "how long a member of the trainer<->engines group waits "
                                    "for the others", gt=0)
    every: int = param(1, "sync the engines after every N optimizer steps", ge=1)
    shared_memory: bool = param(True, "CPU engines on the trainer's node read the weights "
                                      "from shared memory (/dev/shm), the others get them over "
                                      "the gloo socket; false: the socket for all")

    @property
    def bucket_bytes(self) -> int:
        return int(self.bucket_mb * (1 << 20))


@dataclass
class RewardConfig(RoleConfig):
    kind: str = param("function", "reward source: a sequence classifier, a Python function or "
                                  "an HTTP endpoint", choices=("model", "function", "http"))
    model_path: Optional[str] = param(None, "kind model: Hugging Face dir of a 1-label classifier")
    function: Optional[str] = param(None, "kind function: module:function(prompt, response, **extra)")
    url: Optional[str] = param(None, "kind http: endpoint taking {prompts, responses, extra}")
    timeout_s: float = param(10.0, "kind http: seconds per attempt", gt=0)
    retries: int = param(3, "kind http: attempts after the first", ge=0)
    auth_env: Optional[str] = param(None, "kind http: name of an environment variable holding the "
                                          "Authorization header's value (e.g. 'Bearer ...'); the "
                                          "secret never goes into the config")
    ca_bundle: Optional[str] = param(None, "kind http: PEM file of the certificate authorities "
                                           "to trust for an https endpoint (a private CA); "
                                           "TLS certificates are always verified, by default "
                                           "against the system's CAs")
    on_failure: str = param("fail", "kind http: a request still failing after its retries fails "
                                    "the step (fail), or its samples are left out of the step "
                                    "and counted in reward/dropped (drop; a prompt's whole group "
                                    "goes)", choices=("fail", "drop"))
    micro_batch: int = param(16, "model: sequences per forward; http: samples per request", ge=1)
    colocate_with: Optional[str] = colocation("critic", "policy")


@dataclass
class RLConfig:
    prompts_per_step: int = param(16, "prompts sampled per step", ge=1)
    group_size: int = param(8, "responses sampled per prompt", ge=1)
    max_new_tokens: int = param(32, "tokens sampled per response at most", ge=1)
    temperature: float = param(1.0, "sampling temperature", gt=0)
    top_p: float = param(1.0, "nucleus sampling mass", gt=0, le=1)
    top_k: int = param(0, "top-k cut; 0 is off", ge=0)
    epochs: int = param(1, "passes over each rollout batch", ge=1)
    eps_low: float = param(0.2, "ratio clip below 1", gt=0, lt=1)
    eps_high: float = param(0.2, "ratio clip above 1", gt=0)
    dual_clip: Optional[float] = param(None, "dual-clip bound c (> 1) for negative advantages", gt=1)
    entropy_coef: float = param(0.0, "entropy bonus weight", ge=0)
    kl_coef: float = param(0.0, "weight of the KL to the reference", ge=0)
    kl_estimator: str = param("k3", "per-token KL estimator", choices=("k1", "k2", "k3"))
    kl_mode: str = param("loss", "KL as a loss term or as a reward penalty",
                         choices=("loss", "reward"))
    aggregation: str = param("token_mean", "how token losses reduce",
                             choices=("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"))
    gamma: float = param(1.0, "discount (PPO's GAE, REINFORCE++)", ge=0, le=1)
    lam: float = param(0.95, "PPO: GAE lambda", ge=0, le=1)
    whiten: bool = param(True, "PPO: whiten GAE advantages over the batch")
    value_clip: Optional[float] = param(0.2, "PPO: clip of the value update around the rollout's "
                                             "values; none is off", gt=0)
    scale_by_std: bool = param(True, "GRPO: divide by the group's reward std")
    async_rollout: bool = param(False, "generate the next step's samples while this step scores "
                                       "and trains: the engines sample one update behind (set "
                                       "tis_cap to weight tokens for that lag)")
    tis_cap: Optional[float] = param(None, "cap of the truncated importance weight between the "
                                           "engine's and the trainer's log-probs; none is off", gt=0)
    rounds: int = param(0, "online_dpo: 0 steps on pairs of every step's own samples; N > 0 runs "
                           "iterative DPO instead: N rounds of (sample a preference set with the "
                           "current policy, label it with the reward role, train offline DPO on "
                           "it for max_steps / N steps), as pipeline stages (orchestrator/rounds.py)",
                        ge=0)


@dataclass
class DPOConfig:
    loss: str = param("sigmoid", "preference loss: sigmoid (DPO), ipo, cdpo (label smoothing), hinge",
                      choices=("sigmoid", "ipo", "cdpo", "hinge"))
    beta: float = param(0.1, "strength of the tie to the reference (IPO: tau)", gt=0)
    label_smoothing: float = param(0.0, "assumed label noise for cdpo", ge=0, lt=0.5)
    nll_weight: float = param(0.0, "weight of an NLL term on chosen responses (RPO); 0 is off", ge=0)
    ipo_average: bool = param(True, "ipo: average each response's log-ratio over its tokens (the "
                                    "IPO authors' form, as TRL); false sums them")


@dataclass
class RMLossConfig:
    center_coef: float = param(0.0, "reward centering: weight of (r_chosen + r_rejected)^2 in the "
                                    "loss; 0 is off", ge=0)


@dataclass
class OptimConfig:
    lr: float = param(1e-6, "peak learning rate", gt=0, le=1)
    weight_decay: float = param(0.0, "AdamW weight decay", ge=0)
    adam_beta1: float = param(0.9, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = param(0.999, "AdamW beta2", ge=0, lt=1)
    eps: float = param(1e-8, "AdamW epsilon", gt=0)
    warmup_steps: int = param(0, "linear warm-up steps", ge=0)
    schedule: str = param("constant", "lr after warm-up", choices=("constant", "linear", "cosine"))
    grad_clip: float = param(1.0, "max global grad norm; 0 turns clipping off", ge=0)


@dataclass
class TrainConfig:
    batch_size: int = param(8, "rows per optimizer step over all trainer replicas (pairs for dpo "
                               "and rm, sequences for sft, samples for online RL; online_dpo: "
                               "rl.prompts_per_step pairs, one step per rollout)", ge=1)
    micro_batch_size: int = param(8, "rows per forward pass on one replica", ge=1)
    max_steps: int = param(100, "optimizer steps in the run", ge=1)
    seed: int = param(0, "seed for the sampler, model init and dropout", ge=0)
    pack: bool = param(True, "pack sequences into one row instead of padding")


@dataclass
class EvalConfig:
    every: int = param(0, "held-out evaluation every N steps; 0 means only before and after", ge=0)
    max_pairs: int = param(256, "held-out rows used: pairs for preference accuracy (dpo, rm), "
                                "sequences for held-out loss (sft)", ge=1)
    reward_fn: Optional[str] = param(None, "module:function scoring (prompt, response) strings; "
                                           "enables the sampled-reward metric")
    num_prompts: int = param(64, "held-out prompts sampled for the reward metric", ge=1)
    max_new_tokens: int = param(32, "tokens sampled per prompt for the reward metric", ge=1)
    temperature: float = param(1.0, "sampling temperature for the reward metric", gt=0)


@dataclass
class CheckpointConfig:
    every: int = param(0, "save every N steps; 0 means only at the end", ge=0)
    keep: int = param(2, "newest checkpoints kept on disk", ge=1)
    resume: str = param("auto", "'auto' (newest complete checkpoint in the run dir), "
                                "'never', or a checkpoint dir")


@dataclass
class ClusterConfig:
    address: Optional[str] = param(None, "Ray address to join; none starts an embedded local Ray")
    num_cpus: Optional[float] = param(None, "logical CPUs of the embedded local Ray; none: all cores",
                                      gt=0)
    placement_timeout_s: float = param(30.0, "how long to wait for a role's placement", gt=0)
    autoscaler: str = param("auto", "may an autoscaler add nodes when the roles do not fit? auto: "
                                    "ask the cluster; present: wait for nodes; absent: fail at once",
                            choices=("auto", "present", "absent"))
    capacity_timeout_s: float = param(600.0, "with an autoscaler: how long to wait for it to add "
                                             "the nodes the roles need", gt=0)


@dataclass
class FaultConfig:
    deadline_s: float = param(900.0, "longest wait for one call to any role (model loading, a "
                                     "step, a save) before the replica counts as hung; a role's "
                                     "own deadline_s wins", gt=0)
    deadline_per_row_s: float = param(1.0, "seconds added to a call's deadline for each row "
                                           "(sample, pair, sequence) it carries", ge=0)
    preempt_file: Optional[str] = param(None, "a path whose appearance asks the run to stop as "
                                              "on SIGTERM (finish the step, checkpoint, exit 0): "
                                              "for schedulers that announce preemption by file")
    stop_on_drain: bool = param(True, "stop as on SIGTERM when Ray drains a node that holds the "
                                      "driver or a trainer rank (the autoscaler's notice before "
                                      "preemption, or `ray drain-node` from a cloud's hook)")
    enabled: bool = param(True, "recover failed roles in place (see max_restarts); false: a "
                                "failure stops the run with a checkpoint, as max_restarts 0")
    max_restarts: int = param(2, "replacements in place per role (rollout, reward, reference; "
                                 "a policy or critic rank: the role's world is rebuilt from the "
                                 "newest checkpoint) before the run stops with a checkpoint; 0: "
                                 "none", ge=0)
    inject: Optional[str] = param(None, "fault injection for tests: 'role[:rank]@step[,...]' "
                                        "kills that rank (default 0) of the role (kill -9 of its "
                                        "process) as that step starts")

    def injections(self) -> list[tuple[str, int, int]]:
        """(role, rank, step) of each ``inject`` item; ConfigError naming a malformed one."""
        out = []
        for item in (self.inject or "").split(","):
            if not item.strip():
                continue
            who, _, step = item.strip().partition("@")
            role, _, rank = who.partition(":")
            if not step.isdigit() or int(step) < 1 or (rank and not rank.isdigit()):
                raise ConfigError(f"fault.inject: {item.strip()!r} must look like role@step or "
                                  f"role:rank@step (step >= 1), e.g. reward@3 or policy:1@4")
            out.append((role, int(rank or 0), int(step)))
        return out


@dataclass
class LogConfig:
    progress_bar: bool = param(True, "progress bars (steps, reference precompute) when stderr is "
                                     "a terminal; never in CI or job logs")
    trackers: list[str] = param(help="experiment trackers that get the config, every step's "
                                     "metrics and the final summary (metrics.jsonl is always "
                                     "written); wandb and mlflow are optional extras",
                                choices=trackers.KINDS, factory=lambda: ["tensorboard"])
    project: str = param("rayalign", "W&B project / MLflow experiment the run is logged under")
    run_name: Optional[str] = param(None, "the run's name in W&B / MLflow (default: the run "
                                          "dir's name)")
    wandb_mode: Optional[str] = param(None, "W&B mode (default: WANDB_MODE, else online); "
                                            "offline writes under run_dir/wandb for `wandb sync`",
                                      choices=("online", "offline", "disabled", None))
    mlflow_uri: Optional[str] = param(None, "MLflow tracking URI: http(s):, sqlite:, file: "
                                            "(default: MLFLOW_TRACKING_URI, else an sqlite store "
                                            "run_dir/mlflow.db)")
    level: str = param("INFO", "logging level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass
class RunConfig:
    model: ModelConfig = param(help="the policy to train")
    data: DataConfig = param(help="datasets")
    algorithm: str = param("dpo", "training method: offline DPO, supervised fine-tuning, reward "
                                  "model, online PPO with a critic, online critic-free RL, or "
                                  "online DPO (pairs from the run's own samples)",
                           choices=("dpo", "sft", "rm", "ppo", "grpo", "rloo", "reinforce_pp",
                                    "online_dpo"))
    run_dir: str = param("runs/default", "where checkpoints, metrics and logs go: a local path "
                                         "(shared by all nodes on a cluster) or a URI that pyarrow "
                                         "opens (s3://, gs://, hdfs://, abfs://), staged locally")
    policy: PolicyConfig = param(help="trainer role: the policy (for rm, the reward model being "
                                      "trained)", factory=PolicyConfig)
    reference: ReferenceConfig = param(help="frozen reference role", factory=ReferenceConfig)
    rollout: RolloutConfig = param(help="vLLM rollout engines (online methods, generation)",
                                   factory=RolloutConfig)
    weight_sync: WeightSyncConfig = param(help="trainer => engine weight sync",
                                          factory=WeightSyncConfig)
    reward: RewardConfig = param(help="reward role (online RL)", factory=RewardConfig)
    critic: CriticConfig = param(help="value model (PPO)", factory=CriticConfig)
    dpo: DPOConfig = param(help="DPO loss", factory=DPOConfig)
    rm_loss: RMLossConfig = param(help="reward-model loss (algorithm rm)", factory=RMLossConfig)
    rl: RLConfig = param(help="online RL: sampling, estimator, losses", factory=RLConfig)
    optim: OptimConfig = param(help="optimizer", factory=OptimConfig)
    train: TrainConfig = param(help="steps and batches", factory=TrainConfig)
    eval: EvalConfig = param(help="held-out evaluation", factory=EvalConfig)
    checkpoint: CheckpointConfig = param(help="checkpoints", factory=CheckpointConfig)
    cluster: ClusterConfig = param(help="Ray cluster", factory=ClusterConfig)
    fault: FaultConfig = param(help="failure detection and stopping", factory=FaultConfig)
    log: LogConfig = param(help="logging", factory=LogConfig)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, overrides: list[str] | tuple = ()) -> "RunConfig":
        """Build and validate from a nested dict plus ``key.sub=value`` overrides."""
        data = deep_copy(data or {})
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"{item}: an override must look like key.sub=value")
            key, raw = item.split("=", 1)
            set_dotted(data, key.strip(), parse_yaml(raw))
        cfg = build(cls, data)
        cfg.check()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple = ()) -> "RunConfig":
        return cls.from_dict(read_yaml(path), overrides)

    def to_dict(self) -> dict:
        return plain(self)

    # ---- rules that span fields --------------------------------------------------------------
    def check(self) -> None:
        """Cross-field rules; raises ConfigError naming the keys involved."""
        if self.online:
            self._check_online()
        self._check_colocation()
        for role in ("policy", "critic") if self.uses_critic else ("policy",):
            n = getattr(self, role).actors
            if self.train.batch_size % n:
                raise ConfigError(f"train.batch_size: {self.train.batch_size} does not split evenly "
                                  f"over {role}.actors={n}; use a multiple of {n}")
            per_actor = self.train.batch_size // n
            if per_actor % min(self.train.micro_batch_size, per_actor):
                raise ConfigError(f"train.micro_batch_size: {self.train.micro_batch_size} does not "
                                  f"divide the {per_actor} samples each {role} replica gets per step")
        for role, rank, _ in self.fault.injections():
            if role not in self.roles():
                raise ConfigError(f"fault.inject: {role!r} is not a role of algorithm "
                                  f"{self.algorithm!r} (its roles: {', '.join(self.roles())})")
            if rank >= getattr(self, role).actors:
                raise ConfigError(f"fault.inject: {role} has no rank {rank} ({role}.actors="
                                  f"{getattr(self, role).actors}); ranks count from 0")
        self._check_trackers()
        self._check_lora()
        if self.eval.reward_fn is not None and ":" not in self.eval.reward_fn:
            raise ConfigError(f"eval.reward_fn: {self.eval.reward_fn!r} must look like module:function")
        if self.algorithm not in ("dpo", "online_dpo"):
            return
        if self.dpo.loss == "cdpo" and self.dpo.label_smoothing == 0:
            raise ConfigError("dpo.label_smoothing: loss 'cdpo' needs a value in (0, 0.5)")
        if self.dpo.loss != "cdpo" and self.dpo.label_smoothing != 0:
            raise ConfigError(f"dpo.label_smoothing: only used by loss 'cdpo', not '{self.dpo.loss}'")

    def _check_lora(self) -> None:
        trained = [r for r in ("policy", "critic") if r in self.roles()]
        with_lora = [r for r in trained if getattr(self, r).lora.rank > 0]
        if self.reference.source == "policy_base" and self.algorithm not in ("sft", "rm"):
            if self.policy.lora.rank == 0:
                raise ConfigError("reference.from: policy_base is the policy's base weights "
                                  "with its LoRA adapters switched off, and policy.lora.rank "
                                  "is 0 (full fine-tuning moves the base weights too); set "
                                  "policy.lora.rank > 0, or reference.from: model")
        if with_lora:
            import importlib.util
            if importlib.util.find_spec("peft") is None:
                raise ConfigError(f"{with_lora[0]}.lora.rank: LoRA needs peft, which is not "
                                  f"installed here; pip install 'rayalign[lora]'")

    def _check_lora_targets(self, model_dir: Path) -> None:
        """On tied embeddings the input table and the output head are one tensor: adapters on
        the table change both (actors/lora.py ``tie_head_to_embedding``), while adapters on
        the head alone would change a tensor the table shares, so the model that trained would
        not be the one sent."""
        import json
        config = json.loads((model_dir / "config.json").read_text())
        tied = config.get("tie_word_embeddings", config.get("text_config", {}).get(
            "tie_word_embeddings", True))
        heads = {"lm_head", "embed_out"}
        for role in ("policy", "critic"):
            lora = getattr(self, role).lora
            bad = sorted(heads & set(lora.target_modules))
            if lora.rank and tied and bad and role in self.roles():
                raise ConfigError(f"{role}.lora.target_modules: {', '.join(bad)} is the output "
                                  f"head of {model_dir}, which shares its weights with the "
                                  f"input embedding table (tied); name the table instead "
                                  f"(embed_tokens), whose adapters change both")

    def _check_varlen(self, model_dir: Path) -> None:
        """The varlen attention lays a shared prompt out once (a preference pair's, an RL
        group's); a model whose attention it cannot run falls back to transformers' mask,
        which cannot show such a prompt to its responses (actors/packed_attention.py)."""
        import json
        if self.packing != "one_row":
            return
        config = json.loads((model_dir / "config.json").read_text())
        longest = self.rollout.max_model_len if self.online else self.data.max_length
        window = config.get("sliding_window")
        windowed = (window and config.get("use_sliding_window", True) is not False
                    and "sliding_attention" in config.get("layer_types", ["sliding_attention"]))
        why = {f"attention_dropout {config.get('attention_dropout')}":
               (config.get("attention_dropout") or 0) > 0,
               "attn_logit_softcapping": config.get("attn_logit_softcapping"),
               f"a sliding window of {window} tokens, shorter than the longest sequence "
               f"({longest})": windowed and window < longest}
        reason = next((k for k, present in why.items() if present), None)
        if reason is not None:
            raise ConfigError(f"model.attn_implementation: varlen cannot run {model_dir}'s "
                              f"attention ({reason}) on rows with shared prompts; set "
                              f"model.attn_implementation=sdpa")

    def _check_trackers(self) -> None:
        named = self.log.trackers
        if len(set(named)) != len(named):
            raise ConfigError(f"log.trackers: {named} names a tracker twice; name each once")
        absent = trackers.missing(named)
        if absent:
            raise ConfigError(f"log.trackers: {', '.join(absent)} not installed here; install "
                              f"the extra (pip install 'rayalign[{','.join(absent)}]') or "
                              f"remove it from log.trackers")

    @property
    def online(self) -> bool:
        return self.algorithm not in OFFLINE

    @property
    def uses_critic(self) -> bool:
        return self.algorithm == "ppo"

    def roles(self) -> list[str]:
        """The config sections of the roles this run starts, in start order."""
        if self.algorithm in ("sft", "rm"):
            return ["policy"]
        # reference.from policy_base: the policy scores with its adapters off, no own actors
        reference = ["reference"] if self.reference.source == "model" else []
        if self.algorithm == "dpo":
            return ["policy", *reference]
        engines = [] if self.hybrid else ["rollout"]  # hybrid: the policy generates
        return [*engines, "policy", *(["critic"] if self.uses_critic else []), *reference,
                "reward"]

    @property
    def hybrid(self) -> bool:
        """Whether the policy trainer generates (``rollout.colocate_with: policy``)."""
        return self.online and self.rollout.colocate_with == "policy"

    def _check_colocation(self) -> None:
        roles = self.roles()
        for guest in roles:
            host = getattr(getattr(self, guest), "colocate_with", None)
            if host is None:
                continue
            if host not in roles:
                raise ConfigError(f"{guest}.colocate_with: {host!r} is not a role of algorithm "
                                  f"{self.algorithm!r} (its roles: {', '.join(roles)})")
            if getattr(getattr(self, host), "colocate_with", None):
                raise ConfigError(f"{guest}.colocate_with: {host} is itself colocated; name the "
                                  f"role that {host} shares with")
            if getattr(self, guest).actors != getattr(self, host).actors:
                raise ConfigError(f"{guest}.actors: colocated with {host}, replica i shares "
                                  f"{host} replica i's bundle, so both need the same count "
                                  f"({getattr(self, guest).actors} vs {host}.actors="
                                  f"{getattr(self, host).actors})")

    def _check_online(self) -> None:
        rl, rollout_size = self.rl, self.rl.prompts_per_step * self.rl.group_size
        self.rollout.check()
        if self.algorithm in ("grpo", "rloo", "online_dpo") and rl.group_size < 2:
            raise ConfigError(f"rl.group_size: {self.algorithm} compares responses to one prompt; "
                              f"use at least 2")
        if rl.rounds and self.algorithm != "online_dpo":
            raise ConfigError(f"rl.rounds: {rl.rounds} is for algorithm online_dpo (iterative "
                              f"DPO), not {self.algorithm}; set it to 0")
        if rl.rounds and self.train.max_steps % rl.rounds:
            raise ConfigError(f"train.max_steps: {self.train.max_steps} does not split into "
                              f"rl.rounds={rl.rounds} rounds of equal steps; use a multiple of "
                              f"{rl.rounds}")
        if self.algorithm == "online_dpo" and not rl.rounds:
            if self.train.batch_size != rl.prompts_per_step:
                raise ConfigError(f"train.batch_size: {self.train.batch_size}; online_dpo takes one "
                                  f"step per rollout on at most one pair per prompt: set it to "
                                  f"rl.prompts_per_step ({rl.prompts_per_step})")
        elif rollout_size % self.train.batch_size:
            raise ConfigError(f"train.batch_size: {self.train.batch_size} samples per optimizer step "
                              f"must divide the {rollout_size} samples of a step "
                              f"(rl.prompts_per_step x rl.group_size)")
        if (self.rollout.gpus > 0) != (self.policy.gpus > 0):
            raise ConfigError(f"rollout.gpus: {self.rollout.gpus:g} with policy.gpus="
                              f"{self.policy.gpus:g}; weights go from trainer to engines over NCCL "
                              f"when both hold GPUs and over gloo when neither does: give both "
                              f"GPUs or neither")
        if self.rollout.gpus > 0 and self.rollout.gpus % 1:
            raise ConfigError(f"rollout.gpus: {self.rollout.gpus:g}; on GPU the engines join the "
                              f"trainer in one NCCL group, which refuses two members on one "
                              f"device (a fraction lets Ray pack engines onto a shared GPU): "
                              f"give each engine whole GPUs (rollout.gpus = "
                              f"rollout.tensor_parallel_size)")
        need = {"model": "model_path", "function": "function", "http": "url"}[self.reward.kind]
        if not getattr(self.reward, need):
            raise ConfigError(f"reward.{need}: required when reward.kind is {self.reward.kind!r}")
        if self.reward.auth_env and not os.environ.get(self.reward.auth_env):
            raise ConfigError(f"reward.auth_env: the environment variable "
                              f"{self.reward.auth_env} is not set here; export it (its value is "
                              f"the endpoint's Authorization header)")
        if self.reward.on_failure == "drop" and self.reward.kind != "http":
            raise ConfigError(f"reward.on_failure: 'drop' is for reward.kind 'http' (an endpoint "
                              f"that may be down); kind {self.reward.kind!r} fails the call, and "
                              f"a dead reward actor is replaced (fault.max_restarts)")

    def check_paths(self, pending: tuple[str, ...] = ()) -> None:
        """Check that the files the run reads exist (done before any actor starts); keys in
        ``pending`` (model.path, critic.model_path) name dirs an earlier pipeline stage makes."""
        model = Path(self.model.path)
        if "model.path" not in pending:
            if model.exists() and not (model / "config.json").is_file():
                raise ConfigError(f"model.path: {model} has no config.json; give a Hugging Face "
                                  f"model dir")
            if not model.exists() and (self.model.path.startswith((".", "/")) or model.suffix
                                       or self.model.path.count("/") > 1):
                raise ConfigError(f"model.path: {model} not found; create one with "
                                  f"`rayalign tiny-model {model}`")
            if (model / "config.json").is_file():
                check_family(model, self.model.trust_remote_code)
                self._check_lora_targets(model)
                self._check_varlen(model)
        critic = self.critic.model_path
        if (self.uses_critic and critic and "critic.model_path" not in pending
                and not (Path(critic) / "config.json").is_file()):
            raise ConfigError(f"critic.model_path: {critic} is not a Hugging Face model dir "
                              f"(no config.json)")
        for key in ("train", "eval"):
            value = getattr(self.data, key)
            if value is not None and f"data.{key}" not in pending and not Path(value).is_file():
                raise ConfigError(f"data.{key}: file {value} not found")

    @property
    def packing(self) -> bool | str:
        """How sequences are laid out for a forward (actors/logprobs.py ``build_inputs``):
        False pads each, True packs rows as wide as the longest, ``one_row`` packs all into one
        row (needs the varlen attention, which keeps sequences apart without a mask)."""
        if self.train.pack and self.model.attn_implementation == "varlen":
            return "one_row"
        return self.train.pack

    @property
    def per_actor_batch(self) -> int:
        return self.train.batch_size // self.policy.actors


def check_family(model_dir: Path, trust_remote_code: bool = False) -> None:
    """Refuse a model family whose transformers load converts checkpoint tensors (fuses or
    splits them, as for mixture-of-experts layers): the trainer's parameters would not be the
    checkpoint's, which the rollout engines load and the weight sync sends by name. Refuse a
    family whose code ships with the checkpoint unless ``model.trust_remote_code`` allows it."""
    import json

    from transformers import CONFIG_MAPPING
    from transformers.conversion_mapping import (WeightRenaming,
                                                 get_checkpoint_conversion_mapping)
    config = json.loads((model_dir / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING and config.get("auto_map") and not trust_remote_code:
        raise ConfigError(f"model.path: {model_dir} is a {model_type!r} model whose code ships "
                          f"with the checkpoint (config.json auto_map: "
                          f"{', '.join(sorted(config['auto_map']))}); read that code, then set "
                          f"model.trust_remote_code=true to run it")
    convs = get_checkpoint_conversion_mapping(model_type) if model_type else None
    fused = [type(c).__name__ for c in convs or [] if not isinstance(c, WeightRenaming)]
    if fused:
        raise ConfigError(f"model.path: {model_dir} is a {model_type!r} model, whose tensors "
                          f"transformers converts on load ({', '.join(sorted(set(fused)))}); "
                          f"rayalign does not support this family yet (supported and tested: "
                          f"llama, qwen2, mistral, gemma, gpt_neox)")


def schema_lines() -> list[str]:
    """Every config key with its default, range and meaning."""
    return describe(RunConfig)


def deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [deep_copy(v) for v in data]
    return data
