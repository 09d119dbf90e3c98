"""Imported first by every benchmark: quiet, offline output and the repository on sys.path.

The variables must be set before torch, transformers, Ray or vLLM are imported.
"""
import os
import sys
from pathlib import Path

for key, value in {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                   "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
                   "RAY_DEDUP_LOGS": "1", "RAY_USAGE_STATS_ENABLED": "0",
                   "VLLM_LOGGING_LEVEL": "WARNING", "DS_ACCELERATOR": "cpu"}.items():
    os.environ.setdefault(key, value)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def setup_logging() -> None:
    """Progress lines on stdout with times; third-party chatter only from warnings up."""
    import logging
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def role_peaks(usage: dict) -> dict:
    """Peak resident MiB of each role of a rayalign run (TrainResult.usage), roles in order."""
    return {role: u.get("peak_rss_mib") for role, u in usage.items()}


def process_peak_mib() -> float:
    """Peak resident MiB of this process so far (TRL trains in it)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_line(ray_peaks: dict, trl_peak: float) -> str:
    roles = ", ".join(f"{r} {m:.0f}" if m is not None else f"{r} ?" for r, m in ray_peaks.items())
    return (f"Peak resident memory, MiB: rayalign per role (largest replica) {roles}; TRL's "
            f"process {trl_peak:.0f} (the benchmark process, which also ran rayalign's driver).")
