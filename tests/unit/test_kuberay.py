"""examples/kuberay: the RayCluster and RayJob manifests hold the rules cluster.yaml holds (a
head without GPUs or actors, GPU worker groups that autoscale within their bounds, nothing
reachable from outside the Kubernetes cluster) and the ones KubeRay and rayalign add (string
rayStartParams, the token on every Ray pod, the shared volume, a RayJob whose command is a
valid rayalign run). Each rule is also shown to fail on a broken copy."""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from orchestrator.config import RunConfig

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DIR = ROOT / "examples" / "kuberay"
HEAD_PORTS = {6379, 8265, 10001}
IMAGE_DIR = "/home/ray/rayalign"      # where the Dockerfile puts the repo


def load() -> dict[str, dict]:
    """Every document of the two manifests, by kind."""
    docs = {}
    for name in ("raycluster.yaml", "rayjob.yaml"):
        for doc in yaml.safe_load_all((DIR / name).read_text()):
            assert doc["kind"] not in docs, f"two {doc['kind']} documents"
            docs[doc["kind"]] = doc
    return docs


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def problems(docs: dict) -> list[str]:
    """Our rules; an empty list when all hold."""
    out = []
    cluster, job = docs["RayCluster"], docs["RayJob"]
    spec, name = cluster["spec"], cluster["metadata"]["name"]
    if cluster["apiVersion"] != "ray.io/v1" or job["apiVersion"] != "ray.io/v1":
        out.append("apiVersion is not ray.io/v1")
    if not spec["rayVersion"].startswith("2.60."):
        out.append(f"rayVersion {spec['rayVersion']} is not the 2.60 pyproject.toml pins")
    if spec.get("enableInTreeAutoscaling") is not True:
        out.append("autoscaling is off")
    head = spec["headGroupSpec"]
    groups = spec["workerGroupSpecs"]
    for group, params in [("head", head["rayStartParams"])] + [
            (g["groupName"], g["rayStartParams"]) for g in groups]:
        for key, value in params.items():
            if not isinstance(value, str):
                out.append(f"{group}: rayStartParams.{key} is {value!r}, KubeRay wants a string")
    if head["rayStartParams"].get("num-cpus") != "0":
        out.append("head offers CPUs to actors")
    if head["rayStartParams"].get("num-gpus") != "0" or any(
            gpus(c) for c in containers(head["template"])):
        out.append("head offers GPUs")
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        out.append(f"head service type {head['serviceType']} is reachable from outside")
    if head.get("enableIngress"):
        out.append("head has an Ingress")
    if not any(gpus(c) for g in groups for c in containers(g["template"])):
        out.append("no worker group has GPUs")
    for g in groups:
        if not 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]:
            out.append(f"{g['groupName']}: not minReplicas <= replicas <= maxReplicas")
        for c in containers(g["template"]):
            want = g["rayStartParams"].get("num-gpus")
            if want is not None and int(want) != gpus(c):
                out.append(f"{g['groupName']}: num-gpus {want} but {gpus(c)} GPUs in limits")
            requested = c.get("resources", {}).get("requests", {}).get("nvidia.com/gpu")
            if requested is not None and int(requested) != gpus(c):
                out.append(f"{g['groupName']}: GPU requests differ from limits")
    out += _policy_problems(docs.get("NetworkPolicy"), name)
    # every Ray pod and the submitter: the same image, the token from one secret
    pods = [("head", head["template"])] + [(g["groupName"], g["template"]) for g in groups]
    pods.append(("submitter", job["spec"]["submitterPodTemplate"]))
    images = {c["image"] for _, t in pods for c in containers(t)}
    if len(images) != 1:
        out.append(f"pods use different images: {sorted(images)}")
    for group, t in pods:
        for c in containers(t):
            e = env(c)
            secret = (e.get("RAY_AUTH_TOKEN") or {}).get("secretKeyRef", {}).get("name")
            if e.get("RAY_AUTH_MODE") != "token" or secret != "rayalign-ray-token":
                out.append(f"{group}: no RAY_AUTH_MODE=token with RAY_AUTH_TOKEN from the secret")
    # shared storage on the head and every worker
    claim = docs["PersistentVolumeClaim"]["metadata"]["name"]
    for group, t in pods[:-1]:
        volumes = {v["name"]: v for v in t["spec"].get("volumes", [])}
        shared = [m for c in containers(t) for m in c.get("volumeMounts", [])
                  if m["mountPath"] == "/shared"]
        if not shared or volumes.get(shared[0]["name"], {}).get(
                "persistentVolumeClaim", {}).get("claimName") != claim:
            out.append(f"{group}: the shared volume is not mounted at /shared")
    if "ReadWriteMany" not in docs["PersistentVolumeClaim"]["spec"]["accessModes"]:
        out.append("the shared volume is not ReadWriteMany")
    # the job
    if job["spec"].get("clusterSelector", {}).get("ray.io/cluster") != name:
        out.append(f"the RayJob does not select RayCluster {name}")
    labels = job["spec"]["submitterPodTemplate"].get("metadata", {}).get("labels", {})
    if labels.get("app.kubernetes.io/part-of") != "rayalign-jobs":
        out.append("the submitter pod lacks the label the NetworkPolicy lets in")
    return out


def _policy_problems(policy: dict | None, cluster: str) -> list[str]:
    """The head's ports are open to this cluster's pods and the job submitters only."""
    if policy is None:
        return ["no NetworkPolicy guards the head"]
    out = []
    spec = policy["spec"]
    if spec["podSelector"].get("matchLabels") != {"ray.io/cluster": cluster,
                                                  "ray.io/node-type": "head"}:
        out.append("the NetworkPolicy does not select the head pod")
    if "Ingress" not in spec.get("policyTypes", []):
        out.append("the NetworkPolicy does not restrict ingress")
    for rule in spec.get("ingress", []):
        sources = rule.get("from")
        if not sources:
            out.append("the NetworkPolicy lets every source in")
        for src in sources or []:
            if "ipBlock" in src or "namespaceSelector" in src:
                out.append(f"the NetworkPolicy lets in {src}")
            elif not src.get("podSelector", {}).get("matchLabels"):
                out.append("the NetworkPolicy lets in every pod")
        ports = {p["port"] for p in rule.get("ports", [])}
        if not rule.get("ports") or ports - HEAD_PORTS:
            out.append(f"the NetworkPolicy opens ports {sorted(ports) or 'all'}")
    return out


def entrypoint_config(job: dict) -> RunConfig:
    """The RayJob's rayalign command as a run config (validated as `rayalign train` would)."""
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:4] == ["python", "-m", "orchestrator", "train"], words
    preset, overrides = words[4], words[5:]
    assert preset.startswith(IMAGE_DIR + "/"), preset
    return RunConfig.from_yaml(ROOT / preset[len(IMAGE_DIR) + 1:], overrides)


# ---- the real files --------------------------------------------------------------------------
def test_our_rules_hold():
    assert problems(load()) == []


def test_the_job_runs_a_valid_config_on_shared_storage():
    cfg = entrypoint_config(load()["RayJob"])
    assert cfg.run_dir.startswith("/shared/")
    assert cfg.model.path.startswith("/shared/") and cfg.data.train.startswith("/shared/")
    assert cfg.policy.gpus >= 1 and cfg.rollout.gpus >= 1


def test_the_job_gets_its_env_from_a_runtime_env():
    runtime_env = yaml.safe_load(load()["RayJob"]["spec"]["runtimeEnvYAML"])
    assert set(runtime_env) == {"env_vars"}          # the code is in the image
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())


def test_dockerfile_uses_the_pinned_ray_and_the_repo_dir():
    text = (DIR / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)", text, re.M)
    assert base and base.group(1).startswith(load()["RayCluster"]["spec"]["rayVersion"])
    assert f"WORKDIR {IMAGE_DIR}" in text and 'pip install --no-cache-dir -e ".[gpu]"' in text


# ---- broken copies: the rules above can fail -------------------------------------------------
def _head(d):
    return d["RayCluster"]["spec"]["headGroupSpec"]


def _group(d, i=0):
    return d["RayCluster"]["spec"]["workerGroupSpecs"][i]


def _container(template):
    return template["spec"]["containers"][0]


BROKEN = {
    "head GPU": (lambda d: _container(_head(d)["template"])["resources"]["limits"].update(
        {"nvidia.com/gpu": "1"}), "head offers GPUs"),
    "head CPUs": (lambda d: _head(d)["rayStartParams"].pop("num-cpus"), "head offers CPUs"),
    "int param": (lambda d: _group(d)["rayStartParams"].update({"num-gpus": 4}), "wants a string"),
    "load balancer": (lambda d: _head(d).update(serviceType="LoadBalancer"), "reachable from"),
    "ingress": (lambda d: _head(d).update(enableIngress=True), "has an Ingress"),
    "no GPUs": (lambda d: [_container(g["template"])["resources"]["limits"].pop("nvidia.com/gpu")
                           for g in d["RayCluster"]["spec"]["workerGroupSpecs"]],
                "no worker group has GPUs"),
    "min > max": (lambda d: _group(d, 1).update(minReplicas=5), "not minReplicas <= replicas"),
    "gpu mismatch": (lambda d: _group(d)["rayStartParams"].update({"num-gpus": "2"}),
                     "num-gpus 2 but 4 GPUs"),
    "no autoscaler": (lambda d: d["RayCluster"]["spec"].update(enableInTreeAutoscaling=False),
                      "autoscaling is off"),
    "no policy": (lambda d: d.pop("NetworkPolicy"), "no NetworkPolicy"),
    "open policy": (lambda d: d["NetworkPolicy"]["spec"]["ingress"][0].pop("from"),
                    "every source"),
    "ip block": (lambda d: d["NetworkPolicy"]["spec"]["ingress"][0]["from"].append(
        {"ipBlock": {"cidr": "0.0.0.0/0"}}), "lets in {'ipBlock'"),
    "extra port": (lambda d: d["NetworkPolicy"]["spec"]["ingress"][0]["ports"].append(
        {"port": 22, "protocol": "TCP"}), "opens ports"),
    "no token": (lambda d: _container(_group(d, 1)["template"]).update(env=[]),
                 "gpu-rollout: no RAY_AUTH_MODE"),
    "submitter token": (lambda d: _container(d["RayJob"]["spec"]["submitterPodTemplate"]).pop(
        "env"), "submitter: no RAY_AUTH_MODE"),
    "other image": (lambda d: _container(_group(d)["template"]).update(image="ray:latest"),
                    "different images"),
    "no shared": (lambda d: _container(_group(d)["template"]).update(volumeMounts=[]),
                  "gpu-train: the shared volume"),
    "wrong cluster": (lambda d: d["RayJob"]["spec"]["clusterSelector"].update(
        {"ray.io/cluster": "other"}), "does not select RayCluster"),
    "old ray": (lambda d: d["RayCluster"]["spec"].update(rayVersion="2.9.0"), "rayVersion"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_our_rules_catch_a_broken_copy(name):
    docs = copy.deepcopy(load())
    edit, message = BROKEN[name]
    edit(docs)
    found = problems(docs)
    assert any(message in p for p in found), found
