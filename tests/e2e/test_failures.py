"""Bad input and impossible placements stop the run early, with a message that names the culprit."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml

from orchestrator import train
from orchestrator.placement import PlacementError

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("overrides, expected", [
    (("policy.cpus=64",), "role 'policy': one replica needs {CPU: 64} but no node has CPU >= 64"),
    (("policy.cpus=1.5", "cluster.num_cpus=3"), "the cluster lacks {CPU: 1} for roles policy (2 x {CPU: 1.5})"),
])
def test_placement_that_cannot_fit_fails_fast(make_config, overrides, expected):
    cfg = make_config(*overrides)
    t0 = time.monotonic()
    with pytest.raises(PlacementError) as err:
        train(cfg)
    assert time.monotonic() - t0 < 60
    assert expected in str(err.value)


def _write_config(tmp_path, make_config, train_file):
    cfg = make_config(f"data.train={train_file}")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def test_cli_bad_row_stops_before_any_actor(make_config, assets, tmp_path):
    lines = open(assets["train"]).read().splitlines()[:20]
    bad = json.loads(lines[6])
    bad["rejected"] = ""
    lines[6] = json.dumps(bad)
    train_file = tmp_path / "bad.jsonl"
    train_file.write_text("\n".join(lines) + "\n")
    path = _write_config(tmp_path, make_config, train_file)
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "train", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert f"{train_file}: row 7: field 'rejected': empty response" in proc.stderr
    assert "roles up" not in proc.stderr  # no actor was started

    # with on_bad_row=skip the run goes on and reports the skipped row at the end
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "train", str(path),
                           "data.on_bad_row=skip", "train.max_steps=2", "eval.reward_fn=null",
                           "policy.actors=1", "policy.zero_stage=0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "19 rows kept, 1 skipped (1 empty)" in proc.stderr


def test_cli_validate_names_the_key(tmp_path, make_config, assets):
    path = _write_config(tmp_path, make_config, assets["train"])
    ok = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(path)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(path),
                          "policy.zero_stage=5"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["config error: policy.zero_stage: got 5, allowed: >= 0 and <= 3"]
