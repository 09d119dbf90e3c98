"""`rayalign compare` end to end on a tiny comparison: a shared SFT stage, the SFT baseline and
offline DPO over two seeds, two arm runs at a time. The report's plots open as images, its json holds a finite number
for every figure of every arm and seed, its table shows the json's figures, and a repeated
command runs nothing again."""
from __future__ import annotations

import json
import math
import re

import pytest
from PIL import Image

from orchestrator.compare import RESULT, build_comparison, run_comparison
from orchestrator.compare_report import fmt, mean_std

pytestmark = pytest.mark.e2e

FIGURES = ("gold_reward", "kl", "win_rate", "wall_s")


def spec(assets, root):
    return {
        "run_dir": str(root), "seeds": [0, 1], "budget": {"steps": 4}, "parallel": 2,
        "eval": {"prompts": assets["eval"], "num_prompts": 16, "max_new_tokens": 8,
                 "gold": "orchestrator.synthetic:reward", "curve_points": 2},
        "defaults": {"model": {"path": assets["model"]}, "data": {"max_length": 128},
                     "policy": {"actors": 1, "cpus": 1, "zero_stage": 0},
                     "eval": {"reward_fn": "orchestrator.synthetic:reward", "max_pairs": 16,
                              "num_prompts": 8, "max_new_tokens": 8},
                     "cluster": {"num_cpus": 4}, "log": {"progress_bar": False,
                                                         "trackers": []}},
        "stages": [{"name": "sft", "algorithm": "sft",
                    "data": {"train": assets["sft"], "eval": assets["sft_eval"]},
                    "optim": {"lr": 1e-3}, "train": {"batch_size": 8, "micro_batch_size": 8,
                                                     "max_steps": 2}}],
        "arms": [{"name": "sft", "baseline": True, "from": "sft"},
                 {"name": "dpo", "from": "sft", "algorithm": "dpo",
                  "data": {"train": assets["train"], "eval": assets["eval"]},
                  "reference": {"actors": 1, "cpus": 1},
                  "optim": {"lr": 1e-3}, "train": {"batch_size": 8, "micro_batch_size": 8}}],
    }


def md_table(text: str) -> list[list[str]]:
    """The rows of the report's first table (header and rule left out)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_compare_writes_report_and_reruns_nothing(assets, tmp_path):
    comp = build_comparison(spec(assets, tmp_path / "cmp"))
    assert [(r.arm, r.seed) for r in comp.runs] == [("sft", 0), ("sft", 1), ("dpo", 0), ("dpo", 1)]
    paths = run_comparison(comp)
    for name in ("frontier.png", "curves.png", "cost.png"):
        with Image.open(paths[name]) as image:
            assert image.size[0] > 200 and image.size[1] > 200
    data = json.loads(paths["report.json"].read_text(),
                      parse_constant=lambda c: pytest.fail(f"{c} in report.json"))
    assert [a["label"] for a in data["arms"]] == ["sft", "dpo"]
    for arm in data["arms"]:
        assert [r["seed"] for r in arm["runs"]] == [0, 1]
        for run in arm["runs"]:
            for key in FIGURES:
                assert isinstance(run[key], float) and math.isfinite(run[key]), (arm["label"], key)
    # the two DPO seeds ran side by side (2 at a time, and the cluster holds both)
    (s0, e0), (s1, e1) = ((r["started"], r["finished"]) for r in (
        json.loads((tmp_path / "cmp" / f"dpo_s{seed}" / RESULT).read_text()) for seed in (0, 1)))
    assert s1 < e0 and s0 < e1
    dpo = data["arms"][1]
    assert all(sum(r["cpu_seconds"].values()) > 0 and r["peak_rss_mib"]["policy"] > 100
               and r["curve"] for r in dpo["runs"])
    # the table's gold reward and KL cells are the json's summaries
    table = md_table(paths["report.md"].read_text())
    assert [row[0] for row in table] == ["sft", "dpo"]
    for row, arm in zip(table, data["arms"]):
        assert mean_std(arm["summary"]["gold_reward"]) in row
        assert mean_std(arm["summary"]["kl"]) in row
    assert fmt(data["arms"][0]["summary"]["win_rate"]["mean"]) == "0.5"  # the baseline ties itself
    html = paths["report.html"].read_text()
    assert len(re.findall(r"<img ", html)) == 3 and "<table" in html
    # a repeat runs nothing: no arm result and no checkpoint is written again
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cmp").rglob("*")
              if p.name == RESULT or p.name == "stage_result.json"}
    again = run_comparison(build_comparison(spec(assets, tmp_path / "cmp")))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads(again["report.json"].read_text())["arms"] == data["arms"]
