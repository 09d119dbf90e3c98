"""Engine side of trainer => engine weight sync: vLLM's ``rayalign_gloo`` transfer engine.

Importing this module inside a vLLM process registers the engine in vLLM's
``WeightTransferEngineFactory``; vLLM imports it in its worker processes because the rollout
engine names :class:`WeightSyncExtension` as its ``worker_extension_cls``. The wire (group,
bucket layout, metadata) is shared with the trainer side in ``actors/weight_sync.py``.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch

from actors.weight_sync import (BACKEND, SyncTally, UpdateInfo, WeightGroup, checkpoint_names,
                                 open_group, receive_buckets)

# the engine inside the policy trainer's own process (the hybrid engine with vLLM): weights
# come by an in-memory copy from the trainer's tensors, which the trainer hands over here
LOCAL = "rayalign_local"
LOCAL_BATCH = 32  # tensors per load_weights call
_local_source = None


def feed_local(tensors) -> None:
    """The trainer's side of a local sync: an iterator of (checkpoint name, tensor) in the
    order of the update's metadata, consumed by the next ``update_weights`` in this process."""
    global _local_source
    _local_source = tensors


def _take_local():
    global _local_source
    source, _local_source = _local_source, None
    if source is None:
        raise RuntimeError("local weight update without the trainer's tensors (feed_local)")
    return source


def refresh_shared_layers(model: torch.nn.Module) -> int:
    """Re-run weight post-processing of layers that share a parameter with another layer.

    A tied LM head holds the embedding's parameter but receives no tensor of its own, so
    vLLM's layerwise reload skips its post-processing; on CPU that step builds the oneDNN
    matmul handle from a copy of the weight, which would keep serving the old weights.
    Returns how many layers were refreshed.
    """
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    refreshed = 0
    for modules in owners.values():
        if len(modules) < 2:
            continue
        for module in modules:
            method = getattr(module, "quant_method", None)
            weight = getattr(module, "weight", None)
            if weight is None or weight.numel() == 0:  # already packed away (CPU linear layers)
                continue
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(module)
                refreshed += 1
    return refreshed


def _member_rank(init_info, parallel_config) -> int:
    """A vLLM worker's rank in the trainer<->engines group: after the ranks before its engine
    (``rank_offset``), its data-parallel replica's workers, then its own rank in the replica."""
    pc = parallel_config
    return init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank


def _engine_classes():
    """Define the vLLM-side classes (vLLM is imported only where an engine runs)."""
    from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,
                                                       WeightTransferUpdateInfo)

    @dataclass
    class GlooInitInfo(WeightTransferInitInfo):
        """Rendezvous of one engine: its first rank in the group, and the group's size."""
        master_address: str
        master_port: int
        rank_offset: int
        world_size: int
        timeout_s: float = 300.0

    @dataclass
    class GlooUpdateInfo(UpdateInfo, WeightTransferUpdateInfo):
        pass

    class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
        """Receives full (checkpoint-format) tensors over gloo and loads them layer by layer."""
        init_info_cls = GlooInitInfo
        update_info_cls = GlooUpdateInfo

        def __init__(self, config, vllm_config, device, model):
            super().__init__(config, vllm_config, device, model)
            self.group: WeightGroup | None = None
            hf = self.model_config.hf_config
            self.expected = checkpoint_names(self.model_config.model,
                                             bool(getattr(hf, "tie_word_embeddings", False)))
            self.tally = SyncTally(self.expected)
            self.report: dict = {}

        def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
            self.group = open_group(init_info.master_address, init_info.master_port,
                                    _member_rank(init_info, self.parallel_config),
                                    init_info.world_size, init_info.timeout_s)

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload
            self.tally = SyncTally(self.expected)
            initialize_layerwise_reload(self.model)

        def update_weights(self, update_info: dict) -> None:
            # the base class would also synchronize an accelerator; gloo on CPU is synchronous
            self.receive_weights(self.parse_update_info(update_info))

        def receive_weights(self, info: GlooUpdateInfo) -> None:
            for batch in receive_buckets(self.group, info, self.tally):
                self.model.load_weights(batch)

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
            # layers that never get a tensor of their own (a tied LM head, the rotary cache)
            # make vLLM warn on every sync; the completeness check below is ours
            quiet = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                finalize_layerwise_reload(self.model, self.model_config)
            finally:
                quiet.setLevel(level)
            refresh_shared_layers(self.model)
            self.report = self.tally.report()

        def shutdown(self) -> None:
            self.group = None

    class LocalWeightTransferEngine(GlooWeightTransferEngine):
        """Copies the trainer's tensors in the same process (no group, no wire). Each tensor
        is cloned before it is loaded: a layerwise reload keeps what it is given until the
        layer is whole, and the trainer's tensor may be a ZeRO-3 gather freed right after."""

        def init_transfer_engine(self, init_info) -> None:
            pass

        def receive_weights(self, info: GlooUpdateInfo) -> None:
            batch = []
            for name, tensor in _take_local():
                if not self.tally.accept(name):
                    continue
                batch.append((name, tensor.detach().clone()))
                if len(batch) >= LOCAL_BATCH:
                    self.model.load_weights(batch)
                    batch = []
            if batch:
                self.model.load_weights(batch)

    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

    @dataclass(kw_only=True)
    class TimedNCCLInitInfo(NCCLWeightTransferInitInfo):
        """vLLM's NCCL rendezvous, and how long to wait for the group (weight_sync.timeout_s)."""
        store_timeout_s: float = 300.0

    class TimedNCCLWeightTransferEngine(NCCLWeightTransferEngine):
        """vLLM's NCCL engine; only its rendezvous differs (actors/weight_sync_nccl.py ``join``):
        vLLM's waits a fixed 300 s for the trainer, whatever the run's deadlines say."""
        init_info_cls = TimedNCCLInitInfo

        def init_transfer_engine(self, init_info: TimedNCCLInitInfo) -> None:
            from actors.weight_sync_nccl import join
            self.packed = init_info.packed
            self.packed_buffer_size_bytes = init_info.packed_buffer_size_bytes
            self.packed_num_buffers = init_info.packed_num_buffers
            self.model_update_group = join(init_info,
                                           _member_rank(init_info, self.parallel_config))

    return (GlooInitInfo, GlooUpdateInfo, GlooWeightTransferEngine, LocalWeightTransferEngine,
            TimedNCCLWeightTransferEngine)


class WeightSyncExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); adds a sync report.

    Naming this class makes vLLM import this module in its worker process, which registers
    the ``rayalign_gloo`` engine there before the worker builds its transfer engine.
    """

    def rayalign_sync_report(self) -> dict:
        engine = getattr(self, "weight_transfer_engine", None)
        # vLLM's own engines (nccl on GPU) keep no report: the completeness check is ours
        return dict(getattr(engine, "report", None) or {})


def register() -> None:
    """Register ``rayalign_gloo``, ``rayalign_local`` and ``rayalign_nccl`` in vLLM's factory
    (idempotent); needs vLLM installed."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from actors.weight_sync_nccl import VLLM_BACKEND
    if BACKEND not in WeightTransferEngineFactory._registry:
        classes = _engine_classes()
        WeightTransferEngineFactory.register_engine(BACKEND, classes[2])
        WeightTransferEngineFactory.register_engine(LOCAL, classes[3])
        WeightTransferEngineFactory.register_engine(VLLM_BACKEND, classes[4])


if "vllm" in sys.modules:
    # inside a vLLM process (the rollout actor, vLLM's workers); trainers never import vLLM
    register()
