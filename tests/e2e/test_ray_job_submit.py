"""`ray job submit` onto a Ray head started apart from the test, as on a real cluster.

A tiny DPO job and a tiny GRPO job (rollout engine, reward, reference, policy) run side by side
on a 4-CPU head: each entrypoint must join that cluster (the ``RAY_ADDRESS`` Ray sets for a
job) rather than start its own Ray, and end SUCCEEDED with its metrics and a complete
checkpoint. A job with a bad config must end FAILED, and the helper must say so with the job's
logs.

The head is ``ray start --head --block`` from this venv, in a temp dir of its own, with its own
ports and auth token. It is stopped by SIGTERM to that one ``ray start`` process (its node then
stops the GCS, raylet, dashboard and workers it started), and whatever of its process tree is
left is killed by pid. Never ``ray stop``: that kills every Ray process on the machine,
including other tests' embedded instances.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from orchestrator.checkpoint import read_driver_state
from orchestrator.synthetic import write_dataset
from orchestrator.tiny_model import build_model

pytestmark = pytest.mark.e2e
log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
STEPS = 3
JOB_TIMEOUT_S = 300
# Never uploaded with the working dir; .gitignore lists most of them too, but Ray reads it only
# while RAY_RUNTIME_ENV_IGNORE_GITIGNORE is unset
EXCLUDES = [".git", ".venv", "runs", "**/__pycache__", ".pytest_cache", ".ruff_cache"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """One single-node Ray cluster of our own, and its job server."""

    def __init__(self, num_cpus: int):
        # a short path: Ray's unix sockets live under it (107-byte limit)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))
        self.dashboard_port = _free_port()
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        token = secrets.token_hex(32)
        self.headers = {"Authorization": f"Bearer {token}"}
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_RUNTIME_ENV_IGNORE_GITIGNORE")}
        # the job's `python` must be this venv's; token auth explicit, not read from ~/.ray
        env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN=token,
                   # how long `ray job stop` waits after its SIGTERM before a SIGKILL (Ray's
                   # default, 3 s, may be shorter than a step and its checkpoint)
                   RAY_JOB_STOP_WAIT_TIME_S="60")
        self.env = env
        self.log = self.temp_dir / "ray-start.log"
        # Ray resolves 127.0.0.1 to the machine's routable address for the GCS and node; the
        # dashboard (job server) does listen on loopback only
        self.gcs_port = _free_port()
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
               "--node-ip-address", "127.0.0.1", "--port", str(self.gcs_port),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
               "--ray-client-server-port", str(_free_port()),
               "--dashboard-agent-listen-port", str(_free_port()),
               "--num-cpus", str(num_cpus), "--temp-dir", str(self.temp_dir)]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"ray start exited {self.proc.returncode}:\n"
                                     f"{self._log_tail()}")
            try:
                req = urllib.request.Request(f"{self.url}/api/version", headers=self.headers)
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        log.info("Ray head up, job server at %s", self.url)
                        return
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(f"Ray job server not up at {self.url} after {timeout_s}s:\n"
                             f"{self._log_tail()}")

    def _log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def client(self):
        from ray.job_submission import JobSubmissionClient
        return JobSubmissionClient(self.url, headers=self.headers)

    def submit(self, name: str, *entrypoint: str) -> tuple[str, subprocess.Popen]:
        """Start ``ray job submit --no-wait`` (the CLI a user runs); returns the submission id
        and the CLI process, to be checked with :meth:`submitted`."""
        job_id = f"{name}-{uuid.uuid4().hex[:8]}"
        cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", self.url,
               "--submission-id", job_id, "--working-dir", str(REPO),
               "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--no-wait",
               "--", *entrypoint]
        return job_id, subprocess.Popen(cmd, env=self.env, cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)

    @staticmethod
    def submitted(job_id: str, cli: subprocess.Popen) -> None:
        out, _ = cli.communicate(timeout=120)
        assert cli.returncode == 0, f"ray job submit {job_id} exited {cli.returncode}:\n{out}"

    def wait_for(self, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
        """Wait until the job ends; raise AssertionError with its logs unless it SUCCEEDED."""
        from ray.job_submission import JobStatus
        client = self.client()
        deadline = time.monotonic() + timeout_s
        status = client.get_job_status(job_id)
        while not status.is_terminal() and time.monotonic() < deadline:
            time.sleep(2)
            status = client.get_job_status(job_id)
        log.info("job %s: %s", job_id, status.value)
        if status == JobStatus.SUCCEEDED:
            return
        if status.is_terminal():
            what = f"ended {status.value}"
        else:
            what = f"still {status.value} after {timeout_s}s"
            client.stop_job(job_id)
        info = client.get_job_info(job_id)
        raise AssertionError(f"job {job_id} {what} ({info.message}); `ray job logs {job_id}`:\n"
                             f"{client.get_job_logs(job_id)[-6000:]}")

    def stop(self) -> None:
        """Stop this head only: SIGTERM to its ``ray start``, then kill what is left of it."""
        try:
            head = psutil.Process(self.proc.pid)
            procs = [head, *head.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        marker = str(self.temp_dir)  # on the command lines of this head's daemons (not workers)
        for p in psutil.process_iter(["cmdline"]):
            if p not in procs and any(marker in a for a in (p.info["cmdline"] or [])):
                procs.append(p)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=30)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        self.proc.wait(timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def ray_head():
    """A started (not yet ready: see :meth:`RayHead.wait_ready`) head, always stopped."""
    try:  # without these the dashboard starts in minimal mode: no job server, no error
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"the Ray job server needs the packages of ray[default]: {exc}")
    head = RayHead(num_cpus=4)
    try:
        yield head
    finally:
        head.stop()


def _write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _configs(tmp_path: Path) -> dict[str, Path]:
    """A DPO and a GRPO config of 2 CPUs each, so both jobs fit the 4-CPU head at once."""
    model = build_model(tmp_path / "model", "tiny", seed=0)
    data = write_dataset(tmp_path / "data", n_train=200, n_eval=16, seed=0, min_words=4,
                         max_words=16)
    common = {"model": {"path": str(model)}, "train": {"max_steps": STEPS, "seed": 0},
              "checkpoint": {"resume": "never"},
              "log": {"progress_bar": False, "trackers": []}}
    dpo = {"algorithm": "dpo", "run_dir": str(tmp_path / "dpo"), **common,
           "data": {"train": str(data["train"]), "max_length": 96},
           "policy": {"actors": 1, "cpus": 1, "zero_stage": 2},
           "reference": {"actors": 1, "cpus": 1, "precompute": True},
           "optim": {"lr": 2e-3},
           "train": {**common["train"], "batch_size": 16, "micro_batch_size": 8},
           # what a laptop run asks for; a job joining a cluster must not pass it to ray.init
           "cluster": {"num_cpus": 3}}
    grpo = {"algorithm": "grpo", "run_dir": str(tmp_path / "grpo"), **common,
            "data": {"train": str(data["train"])},
            "policy": {"actors": 1, "cpus": 0.5, "zero_stage": 0},
            "reference": {"actors": 1, "cpus": 0.25},
            "reward": {"actors": 1, "cpus": 0.25, "kind": "function",
                       "function": "orchestrator.synthetic:reward"},
            "rollout": {"actors": 1, "cpus": 1, "kv_cache_gib": 0.25, "max_model_len": 256},
            "rl": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 8,
                   "async_rollout": True},  # the async path too: sampling overlaps training
            "optim": {"lr": 2e-3},
            "train": {**common["train"], "batch_size": 16, "micro_batch_size": 16},
            "cluster": {"num_cpus": 3}}
    return {"dpo": _write_config(tmp_path / "dpo.yaml", dpo),
            "grpo": _write_config(tmp_path / "grpo.yaml", grpo)}


def _check_run(run_dir: Path, step_key: str) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if step_key in r] == list(range(1, STEPS + 1))
    ckpt = run_dir / "checkpoints" / f"step-{STEPS:07d}"
    assert read_driver_state(ckpt)["step"] == STEPS  # raises unless the checkpoint is complete
    for part in ("model/config.json", "model/model.safetensors", "model/tokenizer.json"):
        assert (ckpt / part).is_file(), part
    assert any((ckpt / "deepspeed").iterdir()) and any((ckpt / "rng").iterdir())


def test_dpo_and_grpo_jobs_run_on_a_separate_head(ray_head, tmp_path):
    configs = _configs(tmp_path)  # while the head starts
    ray_head.wait_ready()
    train = ["python", "-m", "orchestrator", "train"]
    clis = {"dpo": ray_head.submit("dpo", *train, str(configs["dpo"])),
            "grpo": ray_head.submit("grpo", *train, str(configs["grpo"])),
            # fails in validation, before any actor starts: exit 2
            "bad": ray_head.submit("bad", *train, str(configs["dpo"]), "policy.zero_stage=5")}
    for job_id, cli in clis.values():
        ray_head.submitted(job_id, cli)

    with pytest.raises(AssertionError, match=r"ended FAILED(.|\n)*config error: policy.zero_stage"):
        ray_head.wait_for(clis["bad"][0])
    for name in ("dpo", "grpo"):
        ray_head.wait_for(clis[name][0])
        # the entrypoint joined the head instead of starting a Ray of its own
        assert "joining the Ray cluster at" in ray_head.client().get_job_logs(clis[name][0])
    _check_run(tmp_path / "dpo", "loss")
    _check_run(tmp_path / "grpo", "reward/mean")


def test_ray_job_stop_checkpoints_the_step_and_a_resubmit_continues(ray_head, tmp_path):
    """`ray job stop` sends SIGTERM to the entrypoint: the run finishes its step, checkpoints
    and exits 0 (the head gives it RAY_JOB_STOP_WAIT_TIME_S before a SIGKILL); Ray reports the
    job STOPPED, since a stop was asked for. Submitted again, the job continues from that step,
    and the two jobs together trained on exactly the prompt rows of an uninterrupted run."""
    from ray.job_submission import JobStatus

    from orchestrator.sampler import ResumableSampler
    cfg = yaml.safe_load(_configs(tmp_path)["grpo"].read_text())
    cfg["train"]["max_steps"] = 40
    cfg["rl"]["async_rollout"] = False
    cfg["rollout"]["backend"] = "hf"
    cfg["checkpoint"]["resume"] = "auto"  # the second job continues the first
    path = _write_config(tmp_path / "long.yaml", cfg)
    ray_head.wait_ready()
    train = ["python", "-m", "orchestrator", "train", str(path)]
    job_id, cli = ray_head.submit("stopped", *train)
    ray_head.submitted(job_id, cli)
    metrics = tmp_path / "grpo" / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (metrics.is_file() and '"step": 3,' in metrics.read_text()):
        assert time.monotonic() < deadline, ray_head.client().get_job_logs(job_id)[-4000:]
        time.sleep(0.5)
    client = ray_head.client()
    client.stop_job(job_id)
    while not client.get_job_status(job_id).is_terminal():
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.STOPPED, logs[-4000:]
    stopped = [line for line in logs.splitlines() if "stopped on SIGTERM after step" in line]
    assert stopped, logs[-4000:]
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    assert 3 <= step < 40
    ckpt = tmp_path / "grpo" / "checkpoints" / f"step-{step:07d}"
    assert read_driver_state(ckpt)["step"] == step

    job_id, cli = ray_head.submit("resumed", *train)
    ray_head.submitted(job_id, cli)
    ray_head.wait_for(job_id)
    assert f"at step {step}" in ray_head.client().get_job_logs(job_id)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    trained = [r["batch/rows"] for r in sorted((r for r in rows if "batch/rows" in r),
                                                key=lambda r: r["step"])]
    sampler = ResumableSampler(200, 0)
    assert trained == [[i + 1 for i in sampler.next_batch(4)] for _ in range(40)]


def test_a_driver_that_cannot_join_says_why_in_one_line(ray_head, tmp_path):
    """`rayalign train` pointed at a head with token auth but given no token, or at an address
    where nothing listens: exit 3 and one line saying which, instead of a traceback or a
    minutes-long retry."""
    config = _configs(tmp_path)["dpo"]
    ray_head.wait_ready()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(tmp_path / "home"), RAY_ADDRESS="")  # no ~/.ray/auth_token either
    for address, said in ((f"127.0.0.1:{ray_head.gcs_port}", "RAY_AUTH_TOKEN"),
                          (f"127.0.0.1:{_free_port()}", "nothing answers there")):
        t0 = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "orchestrator", "train", str(config),
                              f"cluster.address={address}"], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=180)
        assert run.returncode == 3, run.stderr[-3000:]
        [line] = [x for x in run.stderr.splitlines() if x.startswith("ClusterError:")]
        assert f"cluster.address {address}" in line and said in line, line
        assert "Traceback" not in run.stderr
        assert time.monotonic() - t0 < 120

