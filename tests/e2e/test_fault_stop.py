"""Failures are loud, prompt and lossless; a stop request is clean. Each test runs `rayalign
train` as its own process (with its own local Ray), waits for a few steps, then kills, freezes
or signals a process of the run, and checks the exit code, the one-line message (role, rank,
node, pid, cause), the checkpoint written and that a re-run resumes from it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.storage import MARKER

pytestmark = pytest.mark.e2e


class Run:
    """``rayalign train`` on a config dict, as a process of its own."""

    def __init__(self, cfg: dict, tmp_path: Path, name: str = "cfg.yaml"):
        self.cfg, self.path = cfg, tmp_path / name
        self.path.write_text(yaml.safe_dump(cfg))
        self.metrics = Path(cfg["run_dir"]) / "metrics.jsonl"

    def start(self) -> "Run":
        self.log = open(self.path.with_suffix(".log"), "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "train", str(self.path)], stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def steps(self) -> list[dict]:
        if not self.metrics.is_file():
            return []
        rows = []
        for line in self.metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
        return [r for r in rows if r.get("step", 0) > 0 and "timing/step" in r]

    def wait_for_step(self, step: int, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        while not any(r["step"] >= step for r in self.steps()):
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < end, f"no step {step} in {timeout}s\n{self.output()}"
            time.sleep(0.2)

    def finish(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.log.close()

    def output(self) -> str:
        return self.path.with_suffix(".log").read_text()

    def rerun(self) -> tuple[int, str]:
        proc = subprocess.run([sys.executable, "-m", "orchestrator", "train", str(self.path)],
                              capture_output=True, text=True, timeout=600)
        return proc.returncode, proc.stderr + proc.stdout


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def actor_pids(run: Run, name: str) -> list[int]:
    """Pids of the run's Ray workers hosting actor class ``name`` (Ray titles them
    ray::<Class>; the run's embedded Ray descends from its process)."""
    out = subprocess.run(["pgrep", "-f", f"ray::{name}"], capture_output=True, text=True).stdout
    return sorted(pid for pid in map(int, out.split()) if _of_run(pid, run))


def _of_run(pid: int, run: Run) -> bool:
    """Whether process ``pid`` descends from the run's driver."""
    while pid > 1 and pid != run.proc.pid:
        pid = _parent(pid)
    return pid == run.proc.pid


def checkpoint(run_dir, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}"


def newest_checkpoint(run_dir) -> int:
    """The step of the run's newest complete checkpoint."""
    return max(int(p.name.split("-")[1]) for p in (Path(run_dir) / "checkpoints").iterdir()
               if p.name.startswith("step-") and (p / MARKER).exists())


# Runs that are signalled, killed or frozen after a few steps are given enough steps that the
# run cannot finish before the test acts: a tiny step takes 0.2 s, and on a loaded machine the
# test saw step 3 only as the run's step 8 (its last) ended.
STEPS = {"max_steps": 24}


def trained_rows(run: Run) -> list:
    return [r["batch/rows"] for r in sorted(run.steps(), key=lambda r: r["step"])]


def test_sigterm_stops_after_the_step_with_a_checkpoint(assets, tmp_path, grpo_config,
                                                      drawn_rows):
    cfg = grpo_config(tmp_path / "run", train=STEPS)
    run = Run(cfg, tmp_path).start()
    run.wait_for_step(3)
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish(timeout=120) == 0, run.output()
    out = run.output()
    stopped = max(r["step"] for r in run.steps())
    assert f"stopped on SIGTERM after step {stopped}" in out
    assert (checkpoint(cfg["run_dir"], stopped) / MARKER).is_file()
    assert stopped < cfg["train"]["max_steps"]
    code, again = run.rerun()
    assert code == 0, again[-3000:]
    assert f"at step {stopped}" in again  # "resumed from ... at step N"
    # the two processes together trained on exactly the rows an uninterrupted run would have
    assert trained_rows(run) == drawn_rows(cfg)


def test_killed_reward_actor_checkpoints_the_last_step_and_resumes(assets, tmp_path,
                                                                  grpo_config, drawn_rows):
    # without replacements in place (fault.max_restarts 0) a failure ends the run
    cfg = grpo_config(tmp_path / "run", fault={"max_restarts": 0}, train=STEPS)
    run = Run(cfg, tmp_path).start()
    run.wait_for_step(3)
    [pid] = actor_pids(run, "RewardScorer")
    os.kill(pid, signal.SIGKILL)
    code = run.finish(timeout=120)
    out = run.output()
    assert code == 4, out[-3000:]
    line = next(line for line in out.splitlines() if line.startswith("run failed:"))
    assert "role reward rank 0 (node " in line and f"pid {pid}): process died" in line
    done = max(r["step"] for r in run.steps())
    assert f"checkpoint of the last completed step written: {checkpoint(cfg['run_dir'], done)}" \
        in line
    code, again = run.rerun()
    assert code == 0, again[-3000:]
    assert f"at step {done}" in again
    assert trained_rows(run) == drawn_rows(cfg)


@pytest.mark.parametrize("restarts", [0, 1])
def test_frozen_rollout_engine_is_named_by_its_deadline(assets, tmp_path, restarts,
                                                        grpo_config, drawn_rows):
    """Without replacements the run stops with a checkpoint; with one, a new engine takes over
    and the run completes."""
    # frozen mid-sync, the trainer's send waits out the sync group's timeout before it goes on
    cfg = grpo_config(tmp_path / "run", rollout={"deadline_s": 10},
                      fault={"deadline_per_row_s": 0, "max_restarts": restarts},
                      weight_sync={"timeout_s": 15}, train=STEPS)
    run = Run(cfg, tmp_path).start()
    run.wait_for_step(3)
    [pid] = actor_pids(run, "HFRolloutEngine")
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    code = run.finish(timeout=240)
    out = run.output()
    named = "role rollout rank 0 (node "
    if restarts:
        assert code == 0, out[-3000:]
        assert named in out and f"pid {pid}): no answer within 10s" in out
        assert "replacing role rollout in place (1 of 1)" in out
        assert max(r["step"] for r in run.steps()) == cfg["train"]["max_steps"]
        assert trained_rows(run) == drawn_rows(cfg)
        return
    assert code == 4, out[-3000:]
    assert time.monotonic() - t0 < 90  # the 10 s deadline, the checkpoint and the teardown
    line = next(line for line in out.splitlines() if line.startswith("run failed:"))
    assert named in line and f"pid {pid}): no answer within 10s" in line
    # the last step whose update is done: the last logged one, or the next when the engine
    # froze in its weight sync (the ledger has it already)
    done = max(r["step"] for r in run.steps())
    saved = int(line.split("checkpoints/step-")[1][:7])
    assert saved in (done, done + 1) and (checkpoint(cfg["run_dir"], saved) / MARKER).is_file()
    ledger = (Path(cfg["run_dir"]) / "ledger.jsonl").read_text().splitlines()
    assert [json.loads(e)["step"] for e in ledger] == list(range(1, saved + 1))


def test_killed_policy_rank_names_it_and_points_at_the_newest_checkpoint(make_config, tmp_path):
    # without replacements in place (fault.max_restarts 0) a lost rank ends the run
    cfg = make_config("train.max_steps=40", "checkpoint.every=2", "log.progress_bar=false",
                      "eval.reward_fn=null", "fault.max_restarts=0")
    run = Run(cfg.to_dict(), tmp_path).start()
    run.wait_for_step(5)
    pids = actor_pids(run, "PolicyTrainer")
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    code = run.finish(timeout=120)
    assert time.monotonic() - t0 < 30  # seen at once, not at the other rank's gloo timeout
    out = run.output()
    assert code == 4, out[-3000:]
    line = next(line for line in out.splitlines() if line.startswith("run failed:"))
    assert "role policy rank " in line and f"pid {pids[1]}): process died" in line
    newest = newest_checkpoint(cfg.run_dir)
    assert f"resume point: the newest checkpoint, {checkpoint(cfg.run_dir, newest)}" in line


def test_async_run_killed_and_resumed_trains_every_row_once(assets, tmp_path, grpo_config,
                                                          drawn_rows):
    """The driver of an async run (a batch always generated ahead) killed with its Ray: the
    re-run resumes from the newest checkpoint, draws the batch that was in flight again, and
    the ledger holds each step's rows once, as an uninterrupted run draws them."""
    cfg = grpo_config(tmp_path / "run", rl={"async_rollout": True},
                      checkpoint={"every": 2}, train=STEPS)
    run = Run(cfg, tmp_path).start()
    run.wait_for_step(5)
    os.killpg(run.proc.pid, signal.SIGKILL)
    run.finish(timeout=60)
    newest = newest_checkpoint(cfg["run_dir"])
    assert newest >= 4
    code, again = run.rerun()
    assert code == 0, again[-3000:]
    assert f"at step {newest}" in again
    ledger = [json.loads(line) for line in
              (Path(cfg["run_dir"]) / "ledger.jsonl").read_text().splitlines()]
    assert [e["step"] for e in ledger] == list(range(1, cfg["train"]["max_steps"] + 1))
    assert [e["rows"] for e in ledger] == drawn_rows(cfg)
    assert all(e["samples_per_row"] == cfg["rl"]["group_size"] for e in ledger)


def gcs_of(run: Run) -> tuple[str, str]:
    """(GCS address, node id) of the run's embedded Ray, read from its gcs_server's command
    line and the port file it writes into the session dir (the process descends from the
    driver)."""
    out = subprocess.run(["pgrep", "-f", "gcs/gcs_server"], capture_output=True, text=True).stdout
    for pid in map(int, out.split()):
        if _of_run(pid, run):
            args = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
            flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
            node = flags["node-id"]
            port = (Path(flags["session-dir"]) / f"gcs_server_port_{node}").read_text().strip()
            return f"{flags['node-ip-address']}:{port}", node
    raise AssertionError("the run's gcs_server was not found")


def test_preemption_file_stops_after_the_step(make_config, tmp_path):
    notice = tmp_path / "preempted"
    cfg = make_config("train.max_steps=40", "log.progress_bar=false", "eval.reward_fn=null",
                      f"fault.preempt_file={notice}")
    run = Run(cfg.to_dict(), tmp_path).start()
    run.wait_for_step(2)
    notice.touch()
    assert run.finish(timeout=120) == 0, run.output()
    stopped = max(r["step"] for r in run.steps())
    assert f"stopped on preemption notice {notice} after step {stopped}" in run.output()
    assert stopped < 40 and (checkpoint(cfg.run_dir, stopped) / MARKER).is_file()


def test_ray_draining_the_trainers_node_stops_after_the_step(make_config, tmp_path):
    # what Ray's autoscaler does before it preempts a node, here with Ray's own command
    # 400 steps (each stops well before): 40 can end before `ray drain-node` has started
    cfg = make_config("train.max_steps=400", "log.progress_bar=false", "eval.reward_fn=null")
    run = Run(cfg.to_dict(), tmp_path).start()
    run.wait_for_step(2)
    address, node = gcs_of(run)
    ray_cli = Path(sys.executable).with_name("ray")
    drain = subprocess.run(
        [str(ray_cli), "drain-node", "--address", address, "--node-id", node,
         "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot preemption",
         "--deadline-remaining-seconds", "600"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "RAY_AUTH_MODE": "token"})
    assert drain.returncode == 0, drain.stderr[-2000:]
    assert run.finish(timeout=120) == 0, run.output()
    out = run.output()
    stopped = max(r["step"] for r in run.steps())
    assert f"stopped on node {node} is being drained (deadline in " in out, out[-3000:]
    assert stopped < 400 and (checkpoint(cfg.run_dir, stopped) / MARKER).is_file()
