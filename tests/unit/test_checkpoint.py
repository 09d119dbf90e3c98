"""CheckpointManager (atomic commit, rotation, partial dirs) and MetricsLog (resume truncation)."""
from __future__ import annotations

import json

import pytest

from orchestrator.checkpoint import DRIVER_STATE, MARKER, CheckpointManager, read_driver_state
from orchestrator.metrics import MetricsLog, PhaseTimer

pytestmark = pytest.mark.unit


def save(mgr: CheckpointManager, step: int, state: dict | None = None):
    tmp = mgr.begin(step)
    (tmp / "model.bin").write_bytes(b"weights %d" % step)
    return mgr.commit(tmp, step, state if state is not None else {"step": step})


# ---- CheckpointManager ----------------------------------------------------------------------------
def test_empty_run_has_no_latest(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", keep=2)
    assert mgr.root == tmp_path / "run" / "checkpoints"
    assert mgr.root.is_dir()
    assert mgr.latest() is None
    assert mgr.complete() == []


def test_commit_makes_complete_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    tmp = mgr.begin(5)
    assert tmp.name.startswith(".tmp-step-")
    assert mgr.latest() is None  # not committed yet
    (tmp / "model.bin").write_bytes(b"x")
    final = mgr.commit(tmp, 5, {"step": 5})
    assert final.name == "step-0000005"
    assert not tmp.exists()
    assert (final / MARKER).is_file()
    assert (final / "model.bin").read_bytes() == b"x"
    assert mgr.latest() == final


def test_latest_orders_numerically(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=10)
    for step in (9, 100, 20):
        save(mgr, step)
    assert [p.name for p in mgr.complete()] == ["step-0000009", "step-0000020", "step-0000100"]
    assert mgr.latest().name == "step-0000100"


def test_rotation_keeps_two_newest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (10, 20, 30, 40):
        save(mgr, step)
    remaining = sorted(p.name for p in mgr.root.iterdir())
    assert remaining == ["step-0000030", "step-0000040"]
    assert mgr.latest().name == "step-0000040"


def test_rotation_keep_one(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=1)
    for step in (1, 2, 3):
        save(mgr, step)
    assert [p.name for p in mgr.root.iterdir()] == ["step-0000003"]


def test_recommit_same_step_replaces(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    save(mgr, 7, {"v": 1})
    save(mgr, 7, {"v": 2})
    assert len(mgr.complete()) == 1
    assert read_driver_state(mgr.latest()) == {"v": 2}


def test_partial_dirs_ignored_and_cleared(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=3)
    good = save(mgr, 10)
    # a crash after the rename target was created but before the marker
    no_marker = mgr.root / "step-0000020"
    no_marker.mkdir()
    (no_marker / DRIVER_STATE).write_text("{}")
    # a crash mid-write
    half = mgr.begin(30)
    (half / "model.bin").write_bytes(b"half")
    assert mgr.latest() == good
    assert mgr.complete() == [good]
    mgr.clear_partial()
    assert not half.exists()
    assert good.exists()
    assert mgr.latest() == good


def test_begin_clears_stale_tmp(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    tmp = mgr.begin(3)
    (tmp / "stale").write_text("old")
    tmp2 = mgr.begin(3)
    assert tmp2 == tmp and not (tmp2 / "stale").exists()


def test_driver_state_round_trip(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    state = {"step": 12, "sampler": {"size": 9, "seed": 0, "epoch": 1, "position": 3},
             "rng": [1, 2, 3], "metrics": {"loss": 0.25}, "note": "ü"}
    ckpt = save(mgr, 12, state)
    assert read_driver_state(ckpt) == state
    assert read_driver_state(mgr.latest()) == state


def test_read_driver_state_refuses_incomplete(tmp_path):
    d = tmp_path / "step-0000001"
    d.mkdir()
    (d / DRIVER_STATE).write_text("{}")
    with pytest.raises(FileNotFoundError, match=MARKER):
        read_driver_state(d)


# ---- MetricsLog -----------------------------------------------------------------------------------
def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_one_line_per_log(tmp_path):
    m = MetricsLog(tmp_path, kinds=())
    for step in (1, 2, 3):
        m.log(step, {"loss": 1.0 / step, "lr": 0.1})
    m.close()
    rows = read_lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["loss"] == pytest.approx(0.5)
    assert all("time" in r and r["lr"] == 0.1 for r in rows)


def test_metrics_nan_is_written(tmp_path):
    m = MetricsLog(tmp_path, kinds=())
    m.log(1, {"loss": float("nan")})
    (row,) = read_lines(tmp_path / "metrics.jsonl")
    assert row["loss"] != row["loss"]


def test_metrics_resume_truncates_after_step(tmp_path):
    m = MetricsLog(tmp_path, kinds=())
    for step in range(1, 8):
        m.log(step, {"loss": float(step)})
    m.close()
    m = MetricsLog(tmp_path, kinds=(), resume_step=4)
    assert [r["step"] for r in read_lines(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    m.log(5, {"loss": 50.0})
    rows = read_lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["loss"] == 50.0


def test_metrics_resume_keeps_all_lines_up_to_step(tmp_path):
    m = MetricsLog(tmp_path, kinds=())
    m.log(0, {"eval/accuracy": 0.5})
    m.log(2, {"loss": 1.0})
    m.log(2, {"eval/accuracy": 0.6})
    m.log(3, {"loss": 0.9})
    MetricsLog(tmp_path, kinds=(), resume_step=2)
    assert [r["step"] for r in read_lines(tmp_path / "metrics.jsonl")] == [0, 2, 2]


def test_metrics_resume_tolerates_torn_last_line(tmp_path):
    # a run killed while appending leaves a partial last line; resuming must not crash on it
    m = MetricsLog(tmp_path, kinds=())
    for step in (1, 2, 3):
        m.log(step, {"loss": 1.0})
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 4, "loss": 0.')
    MetricsLog(tmp_path, kinds=(), resume_step=2)
    assert [r["step"] for r in read_lines(tmp_path / "metrics.jsonl")] == [1, 2]


def test_phase_timer():
    t = PhaseTimer()
    with t.phase("a"):
        pass
    with t.phase("a"):
        pass
    with t.phase("b"):
        pass
    out = t.pop()
    assert set(out) == {"timing/a", "timing/b"} and all(v >= 0 for v in out.values())
    assert t.pop() == {}


# ---- a run dir on a URI: checkpoints are staged locally and uploaded marker-last ------------
def _remote_storage(tmp_path):
    from pyarrow import fs as pafs

    from orchestrator.storage import RunStorage
    (tmp_path / "bucket").mkdir(exist_ok=True)
    remote_fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    return RunStorage("sub://bucket/run", staging_root=tmp_path / "staging",
                      filesystem=remote_fs, base_path="run")


def test_remote_run_dir_uploads_rotates_and_resumes_from_the_uri(tmp_path):
    from orchestrator.checkpoint import CheckpointManager, MARKER
    storage = _remote_storage(tmp_path)
    mgr = CheckpointManager("unused", keep=2, storage=storage)
    assert mgr.root == storage.local_dir / "checkpoints"
    for step in (1, 2, 3):
        tmp = mgr.begin(step)
        (tmp / "model").mkdir()
        (tmp / "model" / "weights.bin").write_bytes(bytes([step]) * 100)
        mgr.commit(tmp, step, {"step": step})
    bucket = tmp_path / "bucket" / "run" / "checkpoints"
    assert sorted(p.name for p in bucket.iterdir()) == ["step-0000002", "step-0000003"]
    assert (bucket / "step-0000003" / MARKER).is_file()
    # a fresh machine: nothing staged, the newest checkpoint comes from the URI
    import shutil
    shutil.rmtree(tmp_path / "staging")
    fresh = CheckpointManager("unused", keep=2, storage=_remote_storage(tmp_path))
    latest = fresh.latest()
    assert latest.name == "step-0000003"
    assert (latest / "model" / "weights.bin").read_bytes() == bytes([3]) * 100
    assert fresh.remote(latest)[1] == "checkpoints/step-0000003"


def test_half_uploaded_checkpoint_on_the_uri_is_cleared(tmp_path):
    from orchestrator.checkpoint import CheckpointManager
    storage = _remote_storage(tmp_path)
    mgr = CheckpointManager("unused", keep=2, storage=storage)
    torn = tmp_path / "bucket" / "run" / "checkpoints" / "step-0000009"
    torn.mkdir(parents=True)
    (torn / "driver_state.json").write_text("{}")  # files without the marker
    assert mgr.latest() is None
    mgr.clear_partial()
    assert not torn.exists()


def test_local_run_dir_has_no_remote(tmp_path):
    from orchestrator.checkpoint import CheckpointManager
    mgr = CheckpointManager(tmp_path / "run", keep=1)
    assert mgr.remote(mgr.begin(1)) is None
