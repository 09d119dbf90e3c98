"""RunConfig: YAML loading, dotted overrides, validation messages, the CLI's validate."""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config import RunConfig, schema_lines
from orchestrator.schema import ConfigError

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "dpo-tiny.yaml"


def load(*overrides: str) -> RunConfig:
    return RunConfig.from_yaml(TINY, list(overrides))


def error_for(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(*overrides)
    return str(info.value)


# ---- loading and overrides -----------------------------------------------------------------------
def test_tiny_config_loads():
    cfg = load()
    assert cfg.algorithm == "dpo"
    assert cfg.model.path == "runs/demo/model"
    assert cfg.data.max_length == 128
    assert cfg.policy.actors == 2 and cfg.policy.zero_stage == 2
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.optim.schedule == "cosine"
    assert cfg.train.batch_size == 16 and cfg.train.micro_batch_size == 8
    assert cfg.eval.reward_fn == "orchestrator.synthetic:reward"
    assert cfg.cluster.num_cpus == 3.0
    # unspecified keys keep their defaults
    assert cfg.train.pack is True
    assert cfg.dpo.label_smoothing == 0.0
    assert cfg.per_actor_batch == 8


def test_from_dict_round_trips_through_to_dict():
    cfg = load()
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_override_float_in_decimal_notation():
    assert load("optim.lr=1.0e-6").optim.lr == pytest.approx(1e-6)


def test_override_float_in_plain_exponent_notation():
    # The CLI's own help text gives `optim.lr=1e-6` as the example override. PyYAML (YAML 1.1)
    # reads "1e-6" as a string, so this must still be accepted as the number 1e-6.
    assert load("optim.lr=1e-6").optim.lr == pytest.approx(1e-6)


def test_override_bool_and_int():
    cfg = load("train.pack=false", "train.max_steps=7", "dpo.loss=ipo")
    assert cfg.train.pack is False
    assert cfg.train.max_steps == 7
    assert cfg.dpo.loss == "ipo"


def test_override_does_not_mutate_input_dict():
    data = yaml.safe_load(TINY.read_text())
    before = json.dumps(data, sort_keys=True)
    RunConfig.from_dict(data, ["optim.lr=0.5", "train.pack=false"])
    assert json.dumps(data, sort_keys=True) == before


def test_override_without_equals_sign():
    assert "optim.lr" in error_for("optim.lr")


# ---- unknown keys ---------------------------------------------------------------------------------
def test_unknown_top_level_key():
    msg = error_for("optimizer=3")
    assert msg.startswith("optimizer:")
    assert "unknown key" in msg


def test_unknown_nested_key_names_dotted_key():
    msg = error_for("optim.lrr=0.1")
    assert "optim.lrr" in msg
    assert "unknown key" in msg
    assert "lr" in msg.split("known keys here:")[1]


def test_unknown_key_in_yaml_file(tmp_path):
    data = yaml.safe_load(TINY.read_text())
    data["train"]["batchsize"] = 4
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"train\.batchsize"):
        RunConfig.from_yaml(path)


# ---- wrong types ----------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("train.batch_size=abc", "train.batch_size"),
    ("policy.zero_stage=1.5", "policy.zero_stage"),
    ("train.pack=3", "train.pack"),
    ("optim.lr=fast", "optim.lr"),
    ("model.path=5", "model.path"),
    ("train.seed=true", "train.seed"),
    ("optim=3", "optim"),
])
def test_wrong_type_names_key(override, key):
    msg = error_for(override)
    assert msg.startswith(key + ":"), msg
    assert "expected" in msg


# ---- out of range ---------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key, allowed", [
    ("optim.lr=-1", "optim.lr", "> 0"),
    ("optim.lr=2.0", "optim.lr", "<= 1"),
    ("policy.zero_stage=4", "policy.zero_stage", "<= 3"),
    ("policy.zero_stage=-1", "policy.zero_stage", ">= 0"),
    ("dpo.loss=foo", "dpo.loss", "'sigmoid'"),
    ("dpo.beta=0", "dpo.beta", "> 0"),
    ("train.batch_size=0", "train.batch_size", ">= 1"),
    ("data.max_length=4", "data.max_length", ">= 8"),
])
def test_out_of_range_names_key_and_range(override, key, allowed):
    msg = error_for(override)
    assert msg.startswith(key + ":"), msg
    assert "allowed" in msg
    assert allowed in msg


def test_choice_error_lists_all_choices():
    msg = error_for("dpo.loss=foo")
    for name in ("sigmoid", "ipo", "cdpo", "hinge"):
        assert name in msg
    assert "'foo'" in msg


# ---- cross-field rules ----------------------------------------------------------------------------
def test_batch_size_must_split_over_policy_actors():
    msg = error_for("train.batch_size=15")  # tiny config has policy.actors=2
    assert "train.batch_size" in msg
    assert "policy.actors" in msg


def test_micro_batch_must_divide_per_actor_batch():
    msg = error_for("train.batch_size=12", "policy.actors=1", "train.micro_batch_size=5")
    assert "train.micro_batch_size" in msg


def test_micro_batch_larger_than_per_actor_batch_is_fine():
    cfg = load("train.batch_size=4", "train.micro_batch_size=8")
    assert cfg.per_actor_batch == 2


def test_cdpo_needs_label_smoothing():
    msg = error_for("dpo.loss=cdpo")
    assert "dpo.label_smoothing" in msg
    assert "cdpo" in msg
    cfg = load("dpo.loss=cdpo", "dpo.label_smoothing=0.1")
    assert cfg.dpo.label_smoothing == pytest.approx(0.1)


def test_label_smoothing_only_for_cdpo():
    assert "dpo.label_smoothing" in error_for("dpo.label_smoothing=0.1")


def test_label_smoothing_range():
    msg = error_for("dpo.loss=cdpo", "dpo.label_smoothing=0.5")
    assert msg.startswith("dpo.label_smoothing:") and "< 0.5" in msg


def test_reward_fn_must_be_module_colon_function():
    assert "eval.reward_fn" in error_for("eval.reward_fn=orchestrator.synthetic.reward")


# ---- missing sections -----------------------------------------------------------------------------
def test_missing_model_section():
    data = yaml.safe_load(TINY.read_text())
    del data["model"]
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(data)
    assert str(info.value).startswith("model:")
    assert "required" in str(info.value)


def test_missing_required_nested_key():
    data = yaml.safe_load(TINY.read_text())
    del data["data"]["train"]
    with pytest.raises(ConfigError, match=r"^data\.train: required"):
        RunConfig.from_dict(data)


def test_config_file_not_found(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        RunConfig.from_yaml(tmp_path / "nope.yaml")


def test_config_file_not_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RunConfig.from_yaml(path)


# ---- schema_lines ---------------------------------------------------------------------------------
def _leaf_keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f.metadata.get("key") or f.name  # the YAML name (reference.from)
        key = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_keys(hints[f.name], key)
        else:
            yield key


def test_schema_lines_cover_every_key():
    lines = schema_lines()
    described = [line.split(" = ", 1)[0] for line in lines]
    keys = list(_leaf_keys(RunConfig))
    assert sorted(described) == sorted(keys)
    assert len(described) == len(set(described))
    for name in ("model.path", "optim.lr", "dpo.label_smoothing", "cluster.placement_timeout_s",
                 "policy.zero_stage", "policy.actors", "reference.precompute"):
        assert name in described


def test_schema_lines_show_defaults_ranges_and_help():
    by_key = {line.split(" = ", 1)[0]: line for line in schema_lines()}
    assert by_key["policy.zero_stage"].startswith("policy.zero_stage = 2 (>= 0 and <= 3): ")
    assert "required" in by_key["model.path"]
    assert "one of 'sigmoid'" in by_key["dpo.loss"]
    for line in schema_lines():
        assert line.split(": ", 1)[1].strip(), f"no help text: {line}"


# ---- CLI validate ---------------------------------------------------------------------------------
def test_cli_validate_bad_value_one_line(capsys):
    rc = main(["validate", str(TINY), "optim.lr=-1"])
    assert rc == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "optim.lr" in lines[0]


def _tiny_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    row = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
    train = tmp_path / "train.jsonl"
    train.write_text(row)
    ev = tmp_path / "eval.jsonl"
    ev.write_text(row)
    return model, train, ev


def test_cli_validate_ok(tmp_path, capsys):
    model, train, ev = _tiny_files(tmp_path)
    rc = main(["validate", str(TINY), f"model.path={model}", f"data.train={train}",
               f"data.eval={ev}", f"run_dir={tmp_path / 'run'}"])
    assert rc == 0
    assert capsys.readouterr().err.count("config error") == 0


def test_cli_validate_missing_data_file(tmp_path, capsys):
    model, train, _ = _tiny_files(tmp_path)
    rc = main(["validate", str(TINY), f"model.path={model}", f"data.train={train}",
               f"data.eval={tmp_path / 'missing.jsonl'}"])
    assert rc == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "data.eval" in lines[0]


def test_cli_validate_model_dir_without_config_json(tmp_path, capsys):
    _, train, ev = _tiny_files(tmp_path)
    empty = tmp_path / "empty_model"
    empty.mkdir()
    rc = main(["validate", str(TINY), f"model.path={empty}", f"data.train={train}",
               f"data.eval={ev}"])
    assert rc == 2
    assert "model.path" in capsys.readouterr().err


def test_cli_schema(capsys):
    assert main(["schema"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == schema_lines()


def test_public_train_stays_a_function_after_a_run_imports_the_loops():
    # the module behind train() must not share its name: importing it would replace the
    # package attribute, and a second `from orchestrator import train` would get a module
    import importlib

    import orchestrator
    importlib.import_module("orchestrator.run")
    from orchestrator import train
    assert callable(train) and train is orchestrator.train and not isinstance(train, type(orchestrator))


# ---- sft and reward-model runs ----------------------------------------------------------------
def test_offline_algorithms_and_their_roles():
    assert load("algorithm=sft").roles() == ["policy"]
    assert load("algorithm=rm").roles() == ["policy"]
    assert load().roles() == ["policy", "reference"]
    assert not load("algorithm=sft").online and not load("algorithm=rm").online


def test_new_keys_and_their_ranges():
    cfg = load("algorithm=rm", "data.on_bad_row=truncate", "rm_loss.center_coef=0.01",
               "data.margin_key=margin", "dpo.ipo_average=false")
    assert cfg.data.on_bad_row == "truncate" and cfg.rm_loss.center_coef == 0.01
    assert cfg.data.margin_key == "margin" and cfg.dpo.ipo_average is False
    assert "allowed: >= 0" in error_for("rm_loss.center_coef=-1")
    assert "'error', 'skip', 'truncate'" in error_for("data.on_bad_row=drop")
    # the cdpo rules belong to dpo runs only
    load("algorithm=sft", "dpo.loss=cdpo")
