"""Waiting for capacity on Ray's fake multi-node autoscaling cluster: a run that needs a second
node makes the autoscaler add one and completes; a request it cannot meet fails at
cluster.capacity_timeout_s naming the roles; a cluster without an autoscaler fails at once.

The clusters here are our own ``ray start --head --block`` processes, on free ports with their
own temp dir, so that Ray instances of other tests on this machine are neither joined nor
stopped (``ray.cluster_utils.AutoscalingCluster`` runs ``ray stop --force``, which would end
them all). Teardown ends only the processes of the cluster's own session.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray

from orchestrator import train
from orchestrator.config import ClusterConfig
from orchestrator.placement import (
    PlacementError,
    RoleRequest,
    check_capacity,
    has_autoscaler,
    place,
)

# serial: the fake autoscaler's nodes start as processes on this machine; beside another test
# module (make test's parallel part) a run here once lost its actor while its node came up
pytestmark = [pytest.mark.e2e, pytest.mark.serial]

HEAD_CPUS = 2
WORKER = {"CPU": 2, "object_store_memory": 200 * 1024 ** 2}
BIN = str(Path(sys.executable).parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _fake_multinode_config(gcs_address: str, max_workers: int) -> dict:
    """What ray/autoscaler/_private/fake_multi_node/example.yaml holds (the PyPI wheel lacks it):
    the fake_multinode provider, a head type, one worker type, no commands to run."""
    return {
        "cluster_name": "rayalign-test", "max_workers": max_workers,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {"resources": WORKER, "node_config": {}, "min_workers": 0,
                           "max_workers": max_workers},
        },
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands", "head_start_ray_commands",
                           "worker_start_ray_commands")},
    }


def _session_pids(sid: int) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[3]) == sid:  # state ppid pgrp session
                pids.append(int(d))
    return pids


class LocalCluster:
    """A head started with ``ray start --block`` in a session of its own; with ``autoscaling``
    its monitor runs the fake_multinode provider, which starts worker nodes on this machine."""

    def __init__(self, autoscaling: bool, max_workers: int = 1):
        self.temp_dir = tempfile.mkdtemp(prefix="rayas-")  # short: Ray's socket paths must fit
        port = _free_port()
        self.address = f"{ray._private.services.get_node_ip_address()}:{port}"
        cmd = [f"{BIN}/ray", "start", "--head", "--block", f"--port={port}",
               f"--num-cpus={HEAD_CPUS}", "--object-store-memory=300000000",
               f"--temp-dir={self.temp_dir}", "--include-dashboard=false",
               "--disable-usage-stats"] + [
            f"--{opt}={_free_port()}" for opt in (
                "ray-client-server-port", "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")]
        env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
        env.pop("RAY_ADDRESS", None)
        # Ray turns token auth on for `ray start` where ~/.ray/auth_token exists, but a driver
        # joining by explicit address only with RAY_AUTH_MODE=token: keep this test cluster open
        env["RAY_AUTH_MODE"] = "disabled"
        if autoscaling:
            config = Path(self.temp_dir) / "autoscaling.json"
            config.write_text(json.dumps(_fake_multinode_config(self.address, max_workers)))
            cmd.append(f"--autoscaling-config={config}")
            env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        self.log = open(Path(self.temp_dir) / "ray_start.log", "w")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        ready = Path(self.temp_dir) / "ray_current_cluster"  # written once the head is up
        deadline = time.monotonic() + 180
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.flush()
                out = (Path(self.temp_dir) / "ray_start.log").read_text()
                self.shutdown()
                raise RuntimeError(f"ray start failed: {out[-3000:]}")
            time.sleep(0.5)
        self.start_s = time.monotonic() - t0

    def shutdown(self) -> None:
        """SIGTERM, then SIGKILL, the processes of this cluster's session, and only those."""
        sid = self.proc.pid
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for pid in _session_pids(sid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while _session_pids(sid) and time.monotonic() < deadline:
                self.proc.poll()  # reap the session leader
                time.sleep(0.2)
        self.proc.wait(timeout=5)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        left = _session_pids(sid)
        assert not left, f"ray processes left: {left}"


def _alive_nodes() -> int:
    return sum(1 for n in ray.nodes() if n["Alive"])


def test_cluster_without_autoscaler_fails_at_once():
    cluster = LocalCluster(autoscaling=False)
    try:
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        assert not has_autoscaler()
        t0 = time.monotonic()
        with pytest.raises(PlacementError, match=r"the cluster lacks \{CPU: 1\} for roles policy"):
            check_capacity([RoleRequest("policy", 3, 1, 0)], ClusterConfig())
        assert time.monotonic() - t0 < 2
        print(f"cluster start {cluster.start_s:.0f}s")
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def autoscaling_cluster():
    cluster = LocalCluster(autoscaling=True, max_workers=1)
    try:
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_run_needing_a_second_node_scales_up_and_completes(autoscaling_cluster, make_config,
                                                           caplog):
    assert _alive_nodes() == 1
    assert ray.cluster_resources()["CPU"] == HEAD_CPUS
    assert has_autoscaler()
    # policy 2 x 1 CPU + reference 1 CPU: one CPU more than the head has
    cfg = make_config(f"cluster.address={autoscaling_cluster.address}", "cluster.num_cpus=null",
                      "cluster.capacity_timeout_s=90", "train.max_steps=3",
                      "reference.precompute=false", "eval.reward_fn=null", "eval.max_pairs=16")
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="orchestrator.placement"):
        result = train(cfg)
    took = time.monotonic() - t0
    assert result.steps == 3
    assert _alive_nodes() == 2
    assert ray.cluster_resources()["CPU"] == HEAD_CPUS + WORKER["CPU"]
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for")]
    assert waits and "policy (2 x {CPU: 1}), reference (1 x {CPU: 1}) need {CPU: 3}" in waits[0]
    assert "missing {CPU: 1}" in waits[0]
    assert any(r.getMessage().startswith("the cluster holds the roles") for r in caplog.records)
    print(f"cluster start {autoscaling_cluster.start_s:.0f}s; scale-up and a 3-step DPO run "
          f"{took:.0f}s")
    print("\n".join(r.getMessage() for r in caplog.records))


def test_request_beyond_the_autoscaler_times_out_naming_roles(autoscaling_cluster):
    # bring the cluster to its largest (after the test above it is already): head + 1 worker
    check_capacity([RoleRequest("warm-up", 3, 1, 0)], ClusterConfig(capacity_timeout_s=90))
    assert ray.cluster_resources()["CPU"] == HEAD_CPUS + WORKER["CPU"]
    cluster = ClusterConfig(capacity_timeout_s=3)
    t0 = time.monotonic()
    with pytest.raises(PlacementError) as err:
        check_capacity([RoleRequest("policy", 4, 1, 0), RoleRequest("reference", 1, 1, 0)],
                       cluster)
    assert 3 <= time.monotonic() - t0 < 15
    assert str(err.value).startswith(
        "waited 3s (cluster.capacity_timeout_s) for the autoscaler to add nodes, but roles "
        "policy (4 x {CPU: 1}), reference (1 x {CPU: 1}) need {CPU: 5}; the cluster has {CPU: 4} "
        "on 2 node(s): missing {CPU: 1}")
    # one replica larger than any node type
    with pytest.raises(PlacementError, match=r"no node holds one 'reward' replica \(CPU >= 8\)"):
        check_capacity([RoleRequest("reward", 1, 8, 0)], cluster)
    # a placement group that stays pending is given cluster.capacity_timeout_s, not just
    # cluster.placement_timeout_s, and is removed when it times out
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match=r"not ready after 3s \(cluster.capacity_timeout_s\)"):
        place(RoleRequest("reward", 1, 8, 0), 1, cluster)
    assert 3 <= time.monotonic() - t0 < 15
    assert not [pg for pg in ray.util.placement_group_table().values()
                if pg["state"] not in ("REMOVED", "CREATED")]
    assert _alive_nodes() == 2
