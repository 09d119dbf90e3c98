"""Pipelines: stage links, overrides by stage, validation before anything runs, and the
stage-done rule (no Ray here: nothing is run)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import parse_yaml
from orchestrator.pipelines import build_pipeline, load_pipeline
from orchestrator.schema import ConfigError

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    for name in ("sft", "pairs", "eval"):
        (tmp_path / f"{name}.jsonl").write_text("{}\n")
    return tmp_path


def spec(root: Path) -> dict:
    return {
        "run_dir": str(root / "run"),
        "defaults": {"model": {"path": str(root / "model")},
                     "reward": {"kind": "function", "function": "orchestrator.synthetic:reward"},
                     "optim": {"lr": 1e-4}},
        "stages": [
            {"name": "sft", "algorithm": "sft", "data": {"train": str(root / "sft.jsonl")}},
            {"name": "rm", "from": "sft", "algorithm": "rm",
             "data": {"train": str(root / "pairs.jsonl")}},
            {"name": "ppo", "from": ["sft", "rm"], "algorithm": "ppo",
             "data": {"train": str(root / "pairs.jsonl")},
             "train": {"batch_size": 64, "micro_batch_size": 32}},
            {"name": "dpo", "from": "sft", "algorithm": "dpo",
             "data": {"train": str(root / "pairs.jsonl")}},
        ],
    }


def test_links_feed_later_stages(files):
    root, stages = build_pipeline(spec(files))
    sft, rm, ppo, dpo = stages
    assert root == files / "run"
    assert sft.cfg.run_dir == str(files / "run" / "sft")
    assert sft.output == files / "run" / "sft" / "checkpoints" / "step-0000100" / "model"
    assert sft.cfg.model.path == str(files / "model")
    assert rm.cfg.model.path == str(sft.output) and rm.pending == ("model.path",)
    assert ppo.cfg.model.path == str(sft.output)
    assert ppo.cfg.reward.kind == "model" and ppo.cfg.reward.model_path == str(rm.output)
    assert ppo.cfg.reward.function is None          # the default's function gave way
    assert ppo.cfg.critic.model_path == str(rm.output)
    assert dpo.cfg.model.path == str(sft.output) and dpo.cfg.algorithm == "dpo"
    assert all(s.cfg.optim.lr == 1e-4 for s in stages)  # defaults reach every stage


def test_overrides_address_one_stage_or_all(files):
    _, stages = build_pipeline(spec(files), ["rm.optim.lr=1e-5", "train.max_steps=7",
                                             "dpo.dpo.beta=0.3", f"run_dir={files}/other"])
    by = {s.name: s.cfg for s in stages}
    assert by["rm"].optim.lr == 1e-5 and by["sft"].optim.lr == 1e-4
    assert all(c.train.max_steps == 7 for c in by.values())
    assert by["dpo"].dpo.beta == 0.3 and by["sft"].dpo.beta == 0.1
    assert by["rm"].run_dir == str(files / "other" / "rm")
    # a link points at the producer's last step under the overridden step count
    assert by["rm"].model.path.endswith("step-0000007/model")
    # a common model.path is a default: links still win over it
    _, stages = build_pipeline(spec(files), [f"model.path={files}/model"])
    assert stages[1].cfg.model.path == str(stages[0].output)


def test_critic_path_of_its_own_is_kept(files):
    s = spec(files)
    s["stages"][2]["critic"] = {"model_path": str(files / "model")}
    ppo = build_pipeline(s)[1][2]
    assert ppo.cfg.critic.model_path == str(files / "model")
    assert ppo.pending == ("model.path", "reward.model_path")


@pytest.mark.parametrize("change, message", [
    (lambda s: s["stages"][1].update({"from": "nope"}), r"stages\[1\] \(rm\): from 'nope': no earlier"),
    (lambda s: s["stages"][0].update({"from": "rm"}), r"from 'rm': no earlier stage"),
    (lambda s: s["stages"][3].update({"from": "rm"}), "dpo does not use one"),
    (lambda s: s["stages"][1].update({"model": {"path": "x"}}), "remove the stage's own model.path"),
    (lambda s: s["stages"][2].update({"reward": {"function": "a:b"}}), "remove reward.function"),
    (lambda s: s["stages"][3].update({"from": ["sft", "ppo"]}), "more than one stage gives the policy"),
    (lambda s: s["stages"][1].update({"name": "sft"}), "name 'sft' is taken"),
    (lambda s: s["stages"][1].pop("name"), r"stages\[1\]: needs a 'name'"),
    (lambda s: s["stages"][1].update({"run_dir": "x"}), "run_dir is set by the pipeline"),
    (lambda s: s["stages"][1].update({"optim": {"lr": -1}}), r"\(rm\): optim.lr: got -1"),
    (lambda s: s.update({"stages": []}), "non-empty 'stages' list"),
    (lambda s: s.update({"extra": 1}), "unknown key"),
    (lambda s: s.update({"run_dir": "s3://bucket/x"}), "local path"),
    (lambda s: s["stages"][0]["data"].update({"train": "missing.jsonl"}),
     "stage sft: data.train: file missing.jsonl not found"),
])
def test_bad_pipelines_fail_before_anything_runs(files, change, message):
    s = copy.deepcopy(spec(files))
    change(s)
    with pytest.raises(ConfigError, match=message):
        build_pipeline(s)


def test_done_means_the_final_checkpoint_is_complete(files):
    _, stages = build_pipeline(spec(files))
    sft = stages[0]
    assert not sft.done()
    ckpt = sft.output.parent
    ckpt.mkdir(parents=True)
    assert not sft.done()          # a checkpoint dir without its marker is not done
    (ckpt / "COMPLETE").write_text("100")
    assert sft.done()


def test_shipped_pipeline_validates(tmp_path, files):
    """configs/rlhf-tiny.yaml, pointed at existing files, passes `rayalign validate`."""
    text = (REPO / "configs" / "rlhf-tiny.yaml").read_text()
    text = (text.replace("runs/demo/model", str(files / "model"))
                .replace("runs/demo/data/sft.jsonl", str(files / "sft.jsonl"))
                .replace("runs/demo/data/sft_eval.jsonl", str(files / "sft.jsonl"))
                .replace("runs/demo/data/train.jsonl", str(files / "pairs.jsonl"))
                .replace("runs/demo/data/eval.jsonl", str(files / "eval.jsonl")))
    path = tmp_path / "p.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 0
    root, stages = load_pipeline(path)
    assert [s.name for s in stages] == ["sft", "rm", "ppo", "dpo"]
    assert [s.cfg.algorithm for s in stages] == ["sft", "rm", "ppo", "dpo"]
    assert parse_yaml(text)["run_dir"] == "runs/demo/rlhf"
    assert main(["validate", str(path), "rm.optim.lr=-1"]) == 2
