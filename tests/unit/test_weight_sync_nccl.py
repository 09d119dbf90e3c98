"""The GPU weight-sync path's payloads and selection, checked without a GPU: what the driver
and the engine actor hand to vLLM's NCCL weight-transfer engine must parse there."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from actors.weight_sync import describe
from actors.weight_sync_nccl import (VLLM_BACKEND, engine_init_payload, rendezvous,
                                     update_payload)
from orchestrator.config import RunConfig
from orchestrator.schema import ConfigError
from orchestrator.weight_sync import backend_for

pytestmark = pytest.mark.unit
GRPO = Path(__file__).resolve().parents[2] / "configs" / "grpo-tiny.yaml"


def test_engines_with_gpus_use_vllms_nccl_backend():
    assert backend_for(1) == "nccl" and backend_for(0.5) == "nccl"
    assert backend_for(0) == "rayalign_gloo"


def test_engine_init_payload_parses_as_the_registered_nccl_engines_init_info():
    """Engines with GPUs get vLLM's NCCL engine under our name, whose init info is vLLM's
    plus the rendezvous timeout from weight_sync.timeout_s."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

    from actors.vllm_weight_engine import register
    register()
    engine = WeightTransferEngineFactory._registry[VLLM_BACKEND]()
    assert issubclass(engine, NCCLWeightTransferEngine)
    payload = engine_init_payload("10.0.0.1", 29511, rank_offset=3, world_size=5,
                                  bucket_bytes=16 << 20, timeout_s=42)
    info = engine.init_info_cls(**payload)
    assert (info.master_address, info.master_port, info.rank_offset, info.world_size) == \
        ("10.0.0.1", 29511, 3, 5)
    assert info.packed and info.packed_buffer_size_bytes == 16 << 20
    assert info.store_timeout_s == 42


def test_an_engine_rank_whose_trainer_never_comes_fails_within_the_timeout():
    """vLLM's own rendezvous waits 300 s whatever the run says; ours waits
    weight_sync.timeout_s and names the address and the setting."""
    import socket
    import time

    from actors.weight_sync import WeightSyncError
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match=rf"rank 1 of 2 .* 127.0.0.1:{port} within "
                                              r"weight_sync.timeout_s=2s"):
        rendezvous("127.0.0.1", port, rank=1, world_size=2, timeout_s=2)
    assert time.monotonic() - t0 < 30


def test_update_payload_parses_as_vllms_nccl_update_info():
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ours = describe(model, 64, ()).payload()
    assert "buckets" in ours
    info = NCCLWeightTransferUpdateInfo(**update_payload(ours))
    assert info.names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert info.dtype_names == ["float32"] * 4 and info.shapes[0] == [3, 4]


def test_policy_and_engines_must_both_have_gpus_or_neither():
    with pytest.raises(ConfigError, match="rollout.gpus: 1 with policy.gpus=0"):
        RunConfig.from_yaml(GRPO, ["rollout.gpus=1"])
    with pytest.raises(ConfigError, match="rollout.gpus"):
        RunConfig.from_yaml(GRPO, ["policy.gpus=1"])
    RunConfig.from_yaml(GRPO, ["policy.gpus=1", "rollout.gpus=1"])
