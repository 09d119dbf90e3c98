"""Pipelines: named stages run in order from one YAML file, each an ordinary run whose output
feeds later stages (SFT -> reward model -> PPO/GRPO, SFT -> DPO)::

    run_dir: runs/rlhf
    defaults:              # merged under every stage; a stage's own keys win
      model: {path: runs/base-model}
    stages:
      - name: sft
        algorithm: sft
        data: {train: sft.jsonl}
      - name: rm
        from: sft          # the SFT model initialises the reward model
        algorithm: rm
        data: {train: pairs.jsonl}
      - name: ppo
        from: [sft, rm]    # policy and reference from sft; reward (and critic) from rm
        algorithm: ppo
        data: {train: prompts.jsonl}

What a ``from`` link sets depends on what the named stage trains:

- a policy (sft, dpo, ppo, grpo, rloo, reinforce_pp): ``model.path`` (the policy, and the
  reference as its frozen copy; for an rm stage, the weights it starts from);
- a reward model (rm): ``reward.kind: model`` and ``reward.model_path``, and for ppo also
  ``critic.model_path`` unless the stage names its own.

Stage ``name`` runs in ``<run_dir>/<name>``. Its output is the model dir of its final
checkpoint, ``<run_dir>/<name>/checkpoints/step-<max_steps>/model``: known before it runs, so
every stage's config is built and validated before the first one starts. A stage is done when
that checkpoint is complete; a re-run skips done stages and resumes an interrupted one from its
newest checkpoint. Overrides address one stage by its name (``rm.optim.lr=1e-5``) or, without
a stage name, every stage (``cluster.num_cpus=4``); ``run_dir=...`` moves the whole pipeline.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from orchestrator.config import OFFLINE, RunConfig, deep_copy, parse_yaml, read_yaml
from orchestrator.rounds import DONE as PAIRS_DONE, PAIRS, make_pairs, round_configs
from orchestrator.schema import ConfigError, set_dotted
from orchestrator.storage import MARKER

log = logging.getLogger(__name__)

RESULT = "stage_result.json"
# the held-out metrics worth a column in the end-of-pipeline table, by algorithm
KEY_METRICS = {"sft": ("eval/loss", "eval/perplexity", "eval/reward"),
               "rm": ("eval/accuracy", "eval/gold_spearman"),
               "dpo": ("eval/accuracy", "eval/reward")}
ONLINE_METRICS = ("eval/reward", "eval/gold_reward")


@dataclass
class Stage:
    name: str
    links: list[str]           # the earlier stages it reads from, in the order given
    cfg: RunConfig
    pending: tuple[str, ...]   # config keys naming dirs or files that earlier stages make
    kind: str = "train"        # or "pairs": a round of iterative DPO sampling its preference set

    @property
    def output(self) -> Path:
        """The model dir this stage's final checkpoint holds (a pairs stage: its pairs file)."""
        if self.kind == "pairs":
            return Path(self.cfg.run_dir) / PAIRS
        return final_checkpoint(self.cfg) / "model"

    def done(self) -> bool:
        if self.kind == "pairs":
            return (Path(self.cfg.run_dir) / PAIRS_DONE).is_file()
        return (final_checkpoint(self.cfg) / MARKER).is_file()


def final_checkpoint(cfg: RunConfig) -> Path:
    if cfg.algorithm == "online_dpo" and cfg.rl.rounds:  # iterative DPO run as one: its last round
        n = cfg.rl.rounds
        return (Path(cfg.run_dir) / f"dpo_r{n}" / "checkpoints"
                / f"step-{cfg.train.max_steps // n:07d}")
    return Path(cfg.run_dir) / "checkpoints" / f"step-{cfg.train.max_steps:07d}"


@dataclass
class StageResult:
    name: str
    algorithm: str
    status: str                # "ran", "resumed" or "skipped"
    steps: int
    model_dir: Path
    wall_s: float | None       # seconds of the invocation that finished the stage
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    usage: dict = field(default_factory=dict)  # per role, of this invocation (TrainResult.usage)

    def metrics(self) -> str:
        if self.algorithm == "pairs":
            a = self.after
            return (f"{a['pairs']} pairs from {a['prompts']} prompts ({a['ties']} ties), reward "
                    f"of samples {a['reward_mean']:.3f}") if a else "-"
        keys = KEY_METRICS.get(self.algorithm, ONLINE_METRICS)
        parts = [f"{k} {self.before[k]:.3f} -> {self.after[k]:.3f}" for k in keys
                 if isinstance(self.before.get(k), (int, float))
                 and isinstance(self.after.get(k), (int, float))]
        return ", ".join(parts) or "-"


@dataclass
class PipelineResult:
    run_dir: Path
    stages: list[StageResult]

    def table(self) -> str:
        """One line per stage: algorithm, status, steps, wall time and key metrics."""
        head = ("stage", "algorithm", "status", "steps", "wall", "held-out metrics, before -> after")
        rows = [(s.name, s.algorithm, s.status, str(s.steps),
                 "-" if s.wall_s is None else f"{s.wall_s:.0f}s", s.metrics()) for s in self.stages]
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head) - 1)]
        lines = [f"pipeline {self.run_dir}: {len(self.stages)} stages "
                 f"(wall: the run that finished each stage)"]
        for r in [head] + rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        return "\n".join(lines)

    def stage(self, name: str) -> StageResult:
        return next(s for s in self.stages if s.name == name)


# ---- building the stages ----------------------------------------------------------------------
def _merge(base: dict, over: dict) -> dict:
    out = deep_copy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = deep_copy(value)
    return out


def _get(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _link(where: str, own: dict, merged: dict, producer: Stage, consumer_algo: str) -> list[str]:
    """Point ``merged`` (a stage's config dict) at ``producer``'s output; the keys it set.
    ``own``: the stage's keys as written (a link may replace defaults, never those)."""
    out = str(producer.output)
    if producer.cfg.algorithm == "rm":
        if consumer_algo in OFFLINE:
            raise ConfigError(f"{where}: from {producer.name!r}: a reward model feeds online RL "
                              f"(reward.model_path, critic.model_path); {consumer_algo} does not "
                              f"use one")
        for key in ("reward.function", "reward.url", "reward.model_path"):
            if _get(own, key) is not None:
                raise ConfigError(f"{where}: from {producer.name!r} sets the reward model; "
                                  f"remove {key}")
        merged.setdefault("reward", {}).update(kind="model", model_path=out, function=None,
                                               url=None)
        keys = ["reward.model_path"]
        if consumer_algo == "ppo" and _get(own, "critic.model_path") is None:
            set_dotted(merged, "critic.model_path", out)
            keys.append("critic.model_path")
        return keys
    if _get(own, "model.path") is not None:
        raise ConfigError(f"{where}: from {producer.name!r} sets model.path; remove the "
                          f"stage's own model.path")
    set_dotted(merged, "model.path", out)
    return ["model.path"]


def _split_overrides(overrides, names: set[str], sections: set[str]
                     ) -> tuple[str | None, dict, list]:
    """(run_dir override, per-stage overrides, overrides for every stage). An override is a
    stage's when a stage name comes first and a config key follows (``dpo.dpo.beta=0.2``:
    stage dpo; ``dpo.beta=0.2``: every stage's dpo section)."""
    run_dir, per_stage, common = None, {n: [] for n in names}, []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: an override must look like key.sub=value or "
                              f"stage.key.sub=value")
        key, raw = item.split("=", 1)
        key, value = key.strip(), parse_yaml(raw)
        head, _, rest = key.partition(".")
        if key == "run_dir":
            run_dir = value
        elif head in names and rest.partition(".")[0] in sections:
            per_stage[head].append((rest, value))
        else:
            common.append((key, value))
    return run_dir, per_stage, common


def load_pipeline(path: str | Path, overrides=()) -> tuple[Path, list[Stage]]:
    """Read a pipeline file, apply overrides, link and validate every stage (nothing runs)."""
    return build_pipeline(read_yaml(path, "pipeline"), overrides, str(path))


def build_pipeline(spec: dict, overrides=(), source: str = "pipeline",
                   rounds: bool = True) -> tuple[Path, list[Stage]]:
    """The pipeline's run dir and its stages, each a validated RunConfig linked to the stages
    it reads from (see the module docstring). ``rounds``: an iterative-DPO stage becomes its
    rounds' stages; without, it stays one stage that ``train`` runs round by round."""
    names = _stage_names(spec, source)
    sections = {f.name for f in dataclasses.fields(RunConfig)}
    run_dir, per_stage, common = _split_overrides(overrides, set(names), sections)
    defaults = deep_copy(spec.get("defaults") or {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{source}: defaults: expected a mapping of config keys")
    for key, value in common:  # as if written under defaults
        set_dotted(defaults, key, value)
    root = str(run_dir or spec.get("run_dir") or "runs/pipeline")
    if "://" in root:
        raise ConfigError(f"run_dir: {root}: a pipeline's stages read each other's model dirs, "
                          f"so its run_dir is a local path (shared storage on a cluster)")
    stages: dict[str, Stage] = {}   # every stage, iterative-DPO rounds each one
    links: dict[str, Stage] = {}    # what ``from: <name>`` reads: a stage, or its last round
    for i, raw in enumerate(spec["stages"]):
        where = f"{source}: stages[{i}] ({raw['name']})"
        stage = _stage(where, raw, per_stage[raw["name"]], defaults, Path(root), links)
        for s in expand_rounds(stage, Path(root)) if rounds else [stage]:
            if s.name in stages or s.name in names and s.name != stage.name:
                raise ConfigError(f"{where}: its round stage {s.name!r} has the name of "
                                  f"another stage; rename one")
            stages[s.name] = s
        links[stage.name] = s
    for stage in stages.values():
        try:
            stage.cfg.check_paths(stage.pending)
        except ConfigError as exc:
            raise ConfigError(f"{source}: stage {stage.name}: {exc}") from None
    return Path(root), list(stages.values())


def expand_rounds(stage: Stage, root: Path) -> list[Stage]:
    """An iterative-DPO stage (online_dpo with rl.rounds) as its rounds' stages
    (orchestrator/rounds.py); any other stage as it is."""
    if stage.cfg.algorithm != "online_dpo" or not stage.cfg.rl.rounds:
        return [stage]
    out = []
    for j, (name, kind, cfg) in enumerate(round_configs(stage.cfg, root, stage.name)):
        pending = set(stage.pending if j < 2 else ("model.path",))
        out.append(Stage(name, stage.links, cfg,
                         tuple(sorted(pending | ({"data.train"} if kind == "train" else set()))),
                         kind))
    return out


def _stage_names(spec, source: str) -> list[str]:
    """The stages' names, checked: present, identifiers, unique."""
    if not isinstance(spec, dict) or not isinstance(spec.get("stages"), list) or not spec["stages"]:
        raise ConfigError(f"{source}: a pipeline needs a non-empty 'stages' list")
    unknown = set(spec) - {"run_dir", "defaults", "stages"}
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; a pipeline has "
                          f"run_dir, defaults and stages")
    names: list[str] = []
    for i, raw in enumerate(spec["stages"]):
        name = raw.get("name") if isinstance(raw, dict) else None
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{source}: stages[{i}]: needs a 'name' (letters, digits, _)")
        if name in names:
            raise ConfigError(f"{source}: stages[{i}]: name {name!r} is taken by another stage")
        names.append(name)
    return names


def _stage(where: str, raw: dict, overrides: list, defaults: dict, root: Path,
           earlier: dict[str, Stage]) -> Stage:
    """One stage: its keys over the defaults, its overrides, its links, validated."""
    own = deep_copy({k: v for k, v in raw.items() if k not in ("name", "from")})
    for key, value in overrides:  # as if written in the stage
        set_dotted(own, key, value)
    if "run_dir" in own:
        raise ConfigError(f"{where}: run_dir is set by the pipeline ({root}/{raw['name']}); "
                          f"remove it")
    links = raw.get("from") or []
    links = [links] if isinstance(links, str) else links
    if not isinstance(links, list) or not all(isinstance(n, str) for n in links):
        raise ConfigError(f"{where}: from: expected a stage name or a list of them")
    merged = _merge(defaults, own)
    merged["run_dir"] = str(root / raw["name"])
    pending: list[str] = []
    for link in links:
        if link not in earlier:
            raise ConfigError(f"{where}: from {link!r}: no earlier stage has that name "
                              f"(earlier: {', '.join(earlier) or 'none'})")
        pending += _link(where, own, merged, earlier[link], merged.get("algorithm", "dpo"))
    if [earlier[n].cfg.algorithm != "rm" for n in links].count(True) > 1:
        raise ConfigError(f"{where}: from {links}: more than one stage gives the policy")
    try:
        cfg = RunConfig.from_dict(merged)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return Stage(raw["name"], links, cfg, tuple(pending))


# ---- running ------------------------------------------------------------------------------------
def _recorded(stage: Stage) -> StageResult:
    """What a done stage recorded; the before/after evaluations from its metrics.jsonl when
    the stage's own record was not written (a stop right after the final checkpoint)."""
    if stage.kind == "pairs":
        return StageResult(stage.name, "pairs", "skipped", 0, stage.output, None, {},
                           json.loads((Path(stage.cfg.run_dir) / PAIRS_DONE).read_text()))
    record = Path(stage.cfg.run_dir) / RESULT
    if record.is_file():
        data = json.loads(record.read_text())
        return StageResult(stage.name, stage.cfg.algorithm, "skipped", data["steps"],
                           Path(data["model_dir"]), data.get("wall_s"), data["before"],
                           data["after"])
    before, after = {}, {}
    metrics = Path(stage.cfg.run_dir) / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        row = json.loads(line)
        if row.get("step") == 0 and not before:
            before = row
        after.update({k[len("final/"):]: v for k, v in row.items() if k.startswith("final/")})
    return StageResult(stage.name, stage.cfg.algorithm, "skipped", stage.cfg.train.max_steps,
                       stage.output, None, before, after)


def _cluster(stages: list[Stage]):
    """One embedded Ray for the whole pipeline, as large as the largest stage asks."""
    clusters = [s.cfg.cluster for s in stages]
    cpus = [c.num_cpus for c in clusters]
    return replace(clusters[0], num_cpus=None if None in cpus else max(cpus))


def run_pipeline(root: Path, stages: list[Stage]) -> PipelineResult:
    """Run the stages in order: skip done ones, resume an interrupted one, report."""
    import ray

    from orchestrator.roles import connect
    from orchestrator.run import train
    results = []
    started = connect(_cluster(stages))
    try:
        for i, stage in enumerate(stages, 1):
            if stage.done():
                results.append(_recorded(stage))
                log.info("stage %d/%d %s (%s): done before, skipped (%s)", i, len(stages),
                         stage.name, stage.cfg.algorithm, stage.output)
                continue
            log.info("stage %d/%d %s (%s) in %s%s", i, len(stages), stage.name,
                     stage.cfg.algorithm, stage.cfg.run_dir,
                     "".join(f"; from {n}" for n in stage.links))
            t0 = time.perf_counter()
            if stage.kind == "pairs":
                record = make_pairs(stage.cfg)
                usage = record.pop("usage")
                results.append(StageResult(stage.name, "pairs", "ran", 0, stage.output,
                                           time.perf_counter() - t0, {}, record, usage))
                continue
            out = train(stage.cfg)
            wall = time.perf_counter() - t0
            res = StageResult(stage.name, stage.cfg.algorithm,
                              "resumed" if out.resumed_from else "ran", out.steps, out.model_dir,
                              wall, out.before, out.after, out.usage)
            (Path(stage.cfg.run_dir) / RESULT).write_text(json.dumps(
                {"steps": res.steps, "model_dir": str(res.model_dir), "wall_s": wall,
                 "before": _plain(res.before), "after": _plain(res.after)}, indent=1))
            results.append(res)
    finally:
        if started:
            ray.shutdown()
    result = PipelineResult(root, results)
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.txt").write_text(result.table() + "\n")
    log.info("%s", result.table())
    return result


def _plain(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}


def pipeline(path: str | Path, overrides=()) -> PipelineResult:
    """Load, validate and run the pipeline in ``path`` (the ``rayalign pipeline`` command)."""
    return run_pipeline(*load_pipeline(path, overrides))
