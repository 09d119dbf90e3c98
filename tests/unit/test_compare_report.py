"""The compare report: summaries checked by hand, the md table against report.json, findings
read off made-up numbers, strict JSON and plots that open."""
from __future__ import annotations

import json
import logging
import math

import pytest
from PIL import Image

from orchestrator.compare_report import findings, fmt, summarize, write_report

pytestmark = pytest.mark.unit

SEEDS = [1, 2, 3]
# arm, point, algorithm, setting, models held, final gold per seed, mean KL, CPU-s per role
POINTS = [
    ("sft", "sft", "sft", {}, 1, [0.27, 0.28, 0.29], 0.0, 0.0),
    ("dpo", "beta=0.1", "dpo", {"dpo.beta": 0.1}, 2, [0.58, 0.60, 0.62], 3.2, 40.0),
    ("dpo", "beta=0.5", "dpo", {"dpo.beta": 0.5}, 2, [0.45, 0.46, 0.47], 1.1, 40.0),
    ("ppo", "kl_coef=0.01", "ppo", {"ppo.kl_coef": 0.01}, 4, [0.55, 0.70, 0.85], 6.0, 80.0),
    ("ppo", "kl_coef=0.1", "ppo", {"ppo.kl_coef": 0.1}, 4, [0.40, 0.45, 0.50], 2.0, 80.0),
    ("grpo", "grpo", "grpo", {}, 2, [0.50, 0.52, 0.54], 2.5, 60.0),
    ("online_dpo", "online_dpo", "online_dpo", {}, 3, [0.48, 0.50, 0.52], 2.2, 70.0),
]
# header of the summary table -> key of the json summary
SUMMARY_COLUMNS = {"gold reward": "gold_reward", "proxy reward": "proxy_reward", "KL": "kl",
                   "win rate vs SFT": "win_rate", "wall s": "wall_s", "CPU-s": "cpu_s",
                   "peak MiB": "peak_rss_mib"}


def make_run(seed, algorithm, gold, kl, cpu) -> dict:
    sft = algorithm == "sft"
    roles = {"policy": cpu, "reference": cpu} if not sft else {}
    steps = [0, 10, 20] if not sft else []
    return {"seed": seed, "gold_reward": gold, "proxy_reward": None if sft else gold - 0.1,
            "kl": 0.0 if sft else kl + 0.1 * seed, "win_rate": 0.5 if sft else 0.6 + 0.01 * seed,
            "wall_s": 0.0 if sft else cpu + seed, "cpu_seconds": roles,
            "gpu_seconds": {r: 0 for r in roles},
            "peak_rss_mib": {"policy": 900.0 + seed, "reference": 700.0} if not sft else {},
            "spikes": {"loss": [], "kl": []},
            "curve": [[s, 0.28 + (gold - 0.28) * s / 20] for s in steps]}


def make_data() -> dict:
    arms = []
    for arm, point, algorithm, setting, held, golds, kl, cpu in POINTS:
        label = arm if point == arm else f"{arm} {point}"
        runs = [make_run(seed, algorithm, g, kl, cpu) for seed, g in zip(SEEDS, golds)]
        arms.append({"arm": arm, "point": point, "label": label, "algorithm": algorithm,
                     "setting": setting, "models_held": held, "runs": runs})
    arms[1]["runs"][0]["spikes"] = {"loss": [7], "kl": [7, 12]}  # dpo beta=0.1, seed 1
    return {"title": "rayalign compare: configs/compare-tiny.yaml",
            "budget": {"unit": "steps", "value": 20,
                       "text": "each arm trains 20 optimizer steps of 16 samples"},
            "eval": {"prompts": 64, "temperature": 1.0, "max_new_tokens": 24, "seed": 0},
            "seeds": SEEDS, "arms": arms}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    data = make_data()
    paths = write_report(data, tmp_path_factory.mktemp("report"))
    return data, paths


def reject(name):
    raise ValueError(f"non-strict JSON constant {name}")


def md_table(md: str, first_header: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the first md table whose header row starts with first_header."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    split = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        split.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return split[0], split[2:]


def test_fmt():
    assert [fmt(None), fmt(0.0), fmt(-0.0), fmt(0), fmt(3)] == ["-", "0", "0", "0", "3"]
    assert [fmt(0.123456), fmt(3.2), fmt(40.15), fmt(999.7), fmt(1234.5)] == \
        ["0.123", "3.2", "40.1", "1000", "1234"]


def test_summarize_by_hand():
    point = {"runs": [
        {"gold_reward": 0.2, "proxy_reward": None, "kl": 1.0, "cpu_seconds": {"a": 1.0, "b": 2.0},
         "peak_rss_mib": {"a": 10.0, "b": 30.0}, "spikes": {"loss": [3], "kl": [3, 5]}},
        {"gold_reward": 0.4, "proxy_reward": None, "kl": None, "cpu_seconds": {"a": 3.0},
         "peak_rss_mib": {"a": 20.0}, "spikes": {"loss": [], "kl": []}},
        {"gold_reward": 0.9, "proxy_reward": None, "kl": 3.0, "cpu_seconds": {},
         "spikes": {"loss": [1]}}]}
    s = summarize(point)
    assert s["gold_reward"]["mean"] == pytest.approx(0.5)
    # population std: sqrt((0.3^2 + 0.1^2 + 0.4^2) / 3)
    assert s["gold_reward"]["std"] == pytest.approx(math.sqrt(0.26 / 3))
    assert s["spread"] == pytest.approx(0.7)
    assert s["proxy_reward"] is None and s["win_rate"] is None
    assert s["kl"] == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 2}
    assert (s["cpu_s"]["mean"], s["cpu_s"]["n"]) == (3.0, 2)  # 1 + 2 and 3; {} unmeasured
    assert (s["peak_rss_mib"]["max"], s["peak_rss_mib"]["min"]) == (30.0, 20.0)
    assert s["spike_steps"] == 3  # steps {3, 5}, {}, {1}
    one = summarize({"runs": point["runs"][:1]})
    assert one["gold_reward"]["std"] == 0 and one["spread"] == 0


def test_plots_open(report):
    _, paths = report
    for name in ("frontier.png", "curves.png", "cost.png"):
        with Image.open(paths[name]) as img:
            img.load()
            assert img.width >= 400 and img.height >= 300, name
            assert len(img.convert("RGB").getcolors(1 << 20)) > 20, f"{name} looks blank"


def test_json_strict_and_finite(report):
    data, paths = report
    out = json.loads(paths["report.json"].read_text(), parse_constant=reject)
    assert [p["label"] for p in out["arms"]] == [p["label"] for p in data["arms"]]
    for given, written in zip(data["arms"], out["arms"]):
        for run_in, run_out in zip(given["runs"], written["runs"]):
            for key, value in run_in.items():
                if isinstance(value, float):
                    assert math.isfinite(run_out[key]) and run_out[key] == value
        for metric, stat in written["summary"].items():
            values = stat.values() if isinstance(stat, dict) else [stat]
            assert all(v is None or math.isfinite(v) for v in values), metric
        assert written["summary"]["gold_reward"]["n"] == len(SEEDS)
    assert out["arms"][0]["summary"]["proxy_reward"] is None


def test_non_finite_becomes_null(tmp_path, caplog):
    data = make_data()
    data["arms"][3]["runs"][1]["kl"] = float("nan")
    data["arms"][3]["runs"][2]["wall_s"] = float("inf")
    with caplog.at_level(logging.WARNING, logger="orchestrator.compare_report"):
        paths = write_report(data, tmp_path)
    assert "2 non-finite" in caplog.text and "data.arms[3].runs[1].kl" in caplog.text
    out = json.loads(paths["report.json"].read_text(), parse_constant=reject)
    assert out["arms"][3]["runs"][1]["kl"] is None and out["arms"][3]["summary"]["kl"]["n"] == 2
    assert math.isnan(data["arms"][3]["runs"][1]["kl"])  # the caller's dict is left alone


def test_md_summary_table_matches_json(report):
    data, paths = report
    out = json.loads(paths["report.json"].read_text())
    md = paths["report.md"].read_text()
    header, rows = md_table(md, "arm point")
    assert "GPU-s" not in header  # every gpu_seconds is 0
    assert [r[0] for r in rows] == [p["label"] for p in data["arms"]]
    for row, point in zip(rows, out["arms"]):
        cells, s = dict(zip(header, row)), point["summary"]
        for col, key in SUMMARY_COLUMNS.items():
            want = "-" if s[key] is None else f"{fmt(s[key]['mean'])} ± {fmt(s[key]['std'])}"
            assert cells[col] == want, (point["label"], col)
        assert cells["models held"] == fmt(point["models_held"])
        assert cells["spread"] == fmt(s["spread"])
        assert cells["spikes"] == fmt(s["spike_steps"])
    sft = dict(zip(header, rows[0]))
    assert sft["proxy reward"] == "-" and sft["KL"] == "0 ± 0"
    assert dict(zip(header, rows[1]))["spikes"] == "2"  # steps {7, 12} of one seed
    runs_header, runs = md_table(md.split("## Every run")[1], "arm point")
    assert runs_header[:2] == ["arm point", "seed"] and len(runs) == len(POINTS) * len(SEEDS)


def test_md_order(report):
    md = report[1]["report.md"].read_text()
    marks = ["# rayalign compare", "each arm trains 20 optimizer steps", "temperature 1.0",
             "highest mean gold reward", "![", "| arm point | gold reward", "| arm point | seed"]
    at = [md.index(m) for m in marks]
    assert at == sorted(at)
    assert all(f"]({name})" in md for name in ("frontier.png", "curves.png", "cost.png"))


def test_findings_name_best_and_families(report):
    text = " ".join(json.loads(report[1]["report.json"].read_text())["findings"])
    # ppo kl_coef=0.01 has the highest mean gold (0.70); SFT 0.28
    assert "ppo kl_coef=0.01 reached the highest mean gold reward, 0.7 (SFT baseline 0.28)" in text
    # gain per KL: dpo beta=0.5 (0.18 / 1.3) beats online_dpo (0.22 / 2.4) and the rest
    assert ("dpo beta=0.5 reached the highest gold-reward gain over SFT per unit of KL: 0.138 "
            "(gain 0.18 at KL 1.3)") in text
    # per 1000 CPU-s: dpo beta=0.1 (0.32 / 80) beats ppo kl_coef=0.01 (0.42 / 160)
    assert ("dpo beta=0.1 reached the highest gold-reward gain over SFT per 1000 CPU-s: 4 "
            "(gain 0.32 for 80 CPU-s)") in text
    assert "most across seeds for ppo kl_coef=0.01 (spread 0.3) and least for sft (spread 0.02)" \
        in text
    assert "Loss/KL spike steps, summed over seeds: dpo beta=0.1 (2)." in text
    assert "RLHF (ppo kl_coef=0.01) reached 0.7 vs DPO's best (dpo beta=0.1) 0.6" in text
    assert "it held 4 models vs 2 and cost 160 CPU-s vs 80" in text
    assert "RLHF reached a higher gold reward than DPO: yes (0.7 vs 0.6)" in text
    assert "DPO was cheaper: yes (80 vs 160 CPU-s)" in text
    assert ("DPO varied less across seeds: yes (largest spread of final gold reward: 0.04 for "
            "dpo beta=0.1 vs 0.3 for ppo kl_coef=0.01)") in text


def test_findings_none_qualifies():
    data = make_data()
    for point in data["arms"][1:]:
        for run in point["runs"]:
            run["gold_reward"] -= 0.5  # every trained arm is worse than SFT
    lines = findings(data)
    assert any("none qualifies for gain per unit of KL" in s for s in lines)
    assert any("none qualifies for gain per 1000 CPU-s" in s for s in lines)
    assert lines[0].startswith("sft reached the highest mean gold reward, 0.28")
    for point in data["arms"]:
        for run in point["runs"]:
            run["kl"], run["gold_reward"] = 0.0, run["gold_reward"] + 1.0
    assert any("none qualifies for gain per unit of KL" in s for s in findings(data))


def test_findings_skip_missing_arms():
    data = make_data()
    data["arms"] = [p for p in data["arms"] if p["algorithm"] in ("ppo", "grpo")]
    for run in data["arms"][0]["runs"]:
        run["spikes"] = None
    text = " ".join(findings(data))
    assert "SFT" not in text and "DPO" not in text
    assert "No arm point had a loss or KL spike." in text


def test_html(report):
    page = report[1]["report.html"].read_text()
    for name in ("frontier.png", "curves.png", "cost.png"):
        assert f'<img src="{name}"' in page
    assert page.count("<table>") == 2 and "<th>win rate vs SFT</th>" in page
    assert "<td>ppo kl_coef=0.01</td>" in page and "0.7 ± 0.122" in page


def test_gpu_column_when_used(tmp_path):
    data = make_data()
    data["arms"][3]["runs"][0]["gpu_seconds"] = {"policy": 12.5, "reference": 3.0}
    paths = write_report(data, tmp_path)
    header, rows = md_table(paths["report.md"].read_text(), "arm point")
    # one seed of three used 12.5 + 3 GPU-s: mean 5.17, population std 15.5 * sqrt(2) / 3
    assert dict(zip(header, rows[3]))["GPU-s"] == "5.17 ± 7.31"
    with Image.open(paths["cost.png"]) as wide, Image.open(tmp_path / "frontier.png") as one:
        assert wide.width > one.width  # a third panel
