"""cluster.yaml: Ray's own validation (the steps `ray up` takes before it contacts AWS) and our
rules (CPU-only head, GPU workers, dashboard on loopback, no port but SSH open). Each rule is
also shown to fail on a broken copy, so a passing run means something."""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

pytestmark = pytest.mark.unit

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"
VENV_RAY = "~/venv/bin/ray"
# the SSH rule Ray itself adds to every group it creates
# (ray.autoscaler._private.aws.config._create_default_ssh_inbound_rules)
RAY_DEFAULT_SSH = {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp",
                   "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}


def load(path: Path = CLUSTER_YAML) -> dict:
    return yaml.safe_load(path.read_text())


def ray_validate(raw: dict) -> dict:
    """What `ray up` does to the file before the provider step: fill in the provider's defaults,
    merge the setup commands, then check the result against Ray's JSON schema and its extra
    rules. Skips only the steps that call AWS (resource detection, bootstrap_config)."""
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def workers(cfg: dict) -> dict:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def problems(cfg: dict) -> list[str]:
    """Our rules for a prepared config; an empty list when all hold."""
    out = []
    head = cfg["available_node_types"][cfg["head_node_type"]]
    if head["resources"].get("GPU", 0) != 0:
        out.append("head offers GPUs")
    if head["resources"].get("CPU") != 0:
        out.append("head offers CPUs to actors")
    if not any(t["resources"].get("GPU", 0) > 0 for t in workers(cfg).values()):
        out.append("no worker type has GPUs")
    for name, t in workers(cfg).items():
        if not 0 <= t["min_workers"] <= t["max_workers"]:
            out.append(f"{name}: min_workers {t['min_workers']} > max_workers {t['max_workers']}")
        if t["max_workers"] > cfg["max_workers"]:
            out.append(f"{name}: max_workers above the cluster's max_workers")
    start = " ".join(cfg["head_start_ray_commands"])
    hosts = re.findall(r"--dashboard-host[= ](\S+)", start)
    if hosts != ["127.0.0.1"]:
        out.append(f"dashboard host {hosts or 'unset (0.0.0.0 in some setups)'}, want 127.0.0.1")
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        if (rule.get("IpProtocol", "").lower(), rule.get("FromPort"), rule.get("ToPort")) != (
                "tcp", 22, 22):
            out.append(f"security group opens {rule}")
        elif rule == RAY_DEFAULT_SSH:
            out.append("security group repeats Ray's own SSH rule (AWS rejects the duplicate)")
    for name, t in cfg["available_node_types"].items():
        if "SecurityGroupIds" in t["node_config"]:
            out.append(f"{name}: own SecurityGroupIds bypass provider.security_group")
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        for word in shlex.split(cmd.replace(";", " ; ")):
            if (word == "ray" or word.endswith("/ray")) and word != VENV_RAY:
                out.append(f"start command runs {word}, not {VENV_RAY}: {cmd!r}")
    return out


# ---- the real file ---------------------------------------------------------------------------
def test_passes_ray_validation():
    cfg = ray_validate(load())
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] in cfg["available_node_types"]


def test_our_rules_hold():
    assert problems(ray_validate(load())) == []


def test_roles_have_train_and_rollout_gpu_types():
    types = workers(load())
    assert {"gpu_train", "gpu_rollout"} <= set(types)
    assert types["gpu_train"]["resources"]["GPU"] > 1  # a multi-GPU node for the trainers


def test_setup_installs_rayalign_gpu_into_the_venv():
    cfg = ray_validate(load())
    assert cfg["file_mounts"].get("~/rayalign") == "."
    for key in ("head_setup_commands", "worker_setup_commands"):  # setup_commands merged in
        cmds = " && ".join(cfg[key])
        assert "python3 -m venv ~/venv" in cmds
        assert '~/venv/bin/pip install -e ".[gpu]"' in cmds
    assert any("boto3" in c for c in cfg["head_setup_commands"])


def test_provider_defaults_do_not_leak_in():
    # Ray merges its AWS defaults key by key; the defaults' head start command binds the
    # dashboard to 0.0.0.0 and must be replaced by ours, not added to
    cfg = ray_validate(load())
    assert "0.0.0.0" not in " ".join(cfg["head_start_ray_commands"])


# ---- broken copies: the checks above can fail ------------------------------------------------
def _write_broken(tmp_path: Path, edit) -> dict:
    raw = load()
    edit(raw)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load(path)


def test_validation_rejects_a_string_worker_count(tmp_path):
    def edit(raw):
        raw["available_node_types"]["gpu_train"]["max_workers"] = "four"
    with pytest.raises(jsonschema.ValidationError, match="'four' is not of type 'integer'"):
        ray_validate(_write_broken(tmp_path, edit))


def test_validation_rejects_an_unknown_key(tmp_path):
    def edit(raw):
        raw["available_node_types"]["gpu_rollout"]["gpus"] = 1
    with pytest.raises(jsonschema.ValidationError, match="gpus"):
        ray_validate(_write_broken(tmp_path, edit))


def test_validation_rejects_min_workers_over_cluster_max(tmp_path):
    def edit(raw):
        raw["available_node_types"]["gpu_train"]["min_workers"] = 4
        raw["available_node_types"]["gpu_rollout"]["min_workers"] = 5
    with pytest.raises(ValueError, match="max_workers"):
        ray_validate(_write_broken(tmp_path, edit))


def _head(raw):
    return raw["available_node_types"][raw["head_node_type"]]


BROKEN = {
    "head GPU": (lambda raw: _head(raw)["resources"].update(GPU=1), "head offers GPUs"),
    "head CPU": (lambda raw: _head(raw)["resources"].pop("CPU"), "head offers CPUs"),
    "no GPUs": (lambda raw: [t["resources"].pop("GPU") for t in workers(raw).values()],
                "no worker type has GPUs"),
    "min > max": (lambda raw: raw["available_node_types"]["gpu_rollout"].update(
        min_workers=3, max_workers=2), "min_workers 3 > max_workers 2"),
    "open dashboard": (lambda raw: raw.update(head_start_ray_commands=[
        c.replace("127.0.0.1", "0.0.0.0") for c in raw["head_start_ray_commands"]]),
        "dashboard host"),
    "port 8265": (lambda raw: raw["provider"]["security_group"]["IpPermissions"].append(
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp",
         "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}), "security group opens"),
    "all ports": (lambda raw: raw["provider"]["security_group"]["IpPermissions"].append(
        {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}), "security group opens"),
    "duplicate ssh": (lambda raw: raw["provider"]["security_group"]["IpPermissions"].append(
        dict(RAY_DEFAULT_SSH)), "repeats Ray's own SSH rule"),
    "own group": (lambda raw: _head(raw)["node_config"].update(SecurityGroupIds=["sg-1"]),
                  "bypass provider.security_group"),
    "system ray": (lambda raw: raw.update(worker_start_ray_commands=[
        c.replace(VENV_RAY, "ray") for c in raw["worker_start_ray_commands"]]),
        "not ~/venv/bin/ray"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_our_rules_catch_a_broken_copy(tmp_path, name):
    edit, message = BROKEN[name]
    cfg = ray_validate(_write_broken(tmp_path, edit))  # still valid for Ray: only our rules fail
    found = problems(cfg)
    assert any(message in p for p in found), found
