"""The GPU weight-sync path's payloads and selection, checked without a GPU: what the driver
and the engine actor hand to vLLM's NCCL weight-transfer engine must parse there."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from actors.weight_sync import describe
from actors.weight_sync_nccl import engine_init_payload, update_payload
from orchestrator.config import RunConfig
from orchestrator.schema import ConfigError
from orchestrator.weight_sync import backend_for

pytestmark = pytest.mark.unit
GRPO = Path(__file__).resolve().parents[2] / "configs" / "grpo-tiny.yaml"


def test_engines_with_gpus_use_vllms_nccl_backend():
    assert backend_for(1) == "nccl" and backend_for(0.5) == "nccl"
    assert backend_for(0) == "rayalign_gloo"


def test_engine_init_payload_parses_as_vllms_nccl_init_info():
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo
    payload = engine_init_payload("10.0.0.1", 29511, rank_offset=3, world_size=5,
                                  bucket_bytes=16 << 20)
    info = NCCLWeightTransferInitInfo(**payload)
    assert (info.master_address, info.master_port, info.rank_offset, info.world_size) == \
        ("10.0.0.1", 29511, 3, 5)
    assert info.packed and info.packed_buffer_size_bytes == 16 << 20


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
