"""rayalign's driver side: config, data, loops, placement, checkpoints, metrics.

Public API for driver scripts: :class:`RunConfig` (and its sections), :func:`train`,
:class:`TrainResult`, :func:`pipeline`, :func:`scale`, :class:`ConfigError`.
"""
from orchestrator.config import RunConfig
from orchestrator.schema import ConfigError


def train(cfg):
    """Run training as ``cfg`` says; see :func:`orchestrator.run.train`."""
    from orchestrator.run import train as _train
    return _train(cfg)


def pipeline(path, overrides=()):
    """Run the pipeline file ``path``; see :func:`orchestrator.pipelines.pipeline`."""
    from orchestrator.pipelines import pipeline as _pipeline
    return _pipeline(path, overrides)


def scale(run_dir, rollout: int):
    """Ask a running online run for ``rollout`` engines; see :func:`orchestrator.elastic.scale`."""
    from orchestrator.elastic import scale as _scale
    return _scale(run_dir, rollout)


__all__ = ["RunConfig", "ConfigError", "train", "pipeline", "scale"]
