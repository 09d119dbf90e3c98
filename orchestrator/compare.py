"""``rayalign compare CONFIG``: the arms a config lists (SFT alone, offline DPO, PPO or GRPO on a
trained reward model, online DPO, with sweeps), over several seeds and one budget, evaluated
alike, then a report (orchestrator/compare_report.py)::

    run_dir: runs/compare
    seeds: [0, 1, 2]
    budget: {steps: 20}          # or {samples: 2560}: responses each arm's policy trains on
    parallel: 1                  # arms at once (each its own actors); auto: as many as fit
    eval:                        # the same for every arm (orchestrator/compare_eval.py)
      prompts: data/eval.jsonl
      gold: orchestrator.synthetic:reward
    defaults: {...}              # under every stage and arm, as in a pipeline
    stages: [...]                # trained once, before the arms (a pipeline: sft, rm)
    arms:
      - {name: sft, baseline: true, from: sft}         # evaluated as it is
      - {name: dpo, from: sft, algorithm: dpo, sweep: {dpo.beta: [0.05, 0.1]}}
      - {name: ppo, from: [sft, rm], algorithm: ppo, sweep: {rl.kl_coef: [0.01, 0.1]}}

Every (arm, sweep point, seed) is a pipeline stage of its own (``<run_dir>/<arm>_<point>_s<seed>``,
``train.seed`` the seed), so the pipeline's rules hold: validated before anything runs,
interrupted runs resume. An arm run is done when its ``compare_arm.json`` (training and
evaluation figures) exists; a repeated command re-runs nothing that is done. The baseline arm's
model is the reference of every KL and the opponent of every win rate.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.compare_eval import EvalSettings, evaluate_policy, win_rate
from orchestrator.config import deep_copy, read_yaml
from orchestrator.pipelines import (Stage, _cluster, _get, _recorded, build_pipeline,
                                    run_pipeline)
from orchestrator.schema import ConfigError, build, set_dotted

log = logging.getLogger(__name__)

RESULT = "compare_arm.json"
KEYS = {"run_dir", "seeds", "budget", "parallel", "eval", "defaults", "stages", "arms"}
ARM_KEYS = {"name", "from", "baseline", "sweep"}
CURVE_KEY = {"online": "eval/gold_reward", "offline": "eval/reward"}


@dataclass
class ArmRun:
    """One seed of one sweep point of one arm."""
    arm: str
    point: str               # the sweep setting, e.g. "beta=0.1" (the arm's name without one)
    setting: dict            # dotted key -> value of the sweep point
    seed: int
    run_dir: Path
    stage: Stage | None      # None for the baseline (nothing to train)
    model_dir: Path          # what is evaluated

    @property
    def label(self) -> str:
        return self.arm if self.point == self.arm else f"{self.arm} {self.point}"

    def done(self) -> bool:
        return (self.run_dir / RESULT).is_file()


@dataclass
class Comparison:
    root: Path
    shared: list[Stage]
    runs: list[ArmRun]
    baseline: str            # the baseline arm's name
    reference: Path          # its model: KL reference and win-rate opponent
    reward_model: Path | None
    eval: EvalSettings
    budget: dict             # unit, value, text
    parallel: int | str
    seeds: list[int]


# ---- building ----------------------------------------------------------------------------------
def _points(where: str, sweep) -> list[dict]:
    """The sweep's settings (every combination of the listed values), or one empty one."""
    if sweep is None:
        return [{}]
    if not isinstance(sweep, dict) or not sweep or not all(
            isinstance(v, list) and v for v in sweep.values()):
        raise ConfigError(f"{where}: sweep: expected a mapping of config keys to non-empty "
                          f"lists of values, e.g. {{dpo.beta: [0.05, 0.1]}}")
    keys = list(sweep)
    return [dict(zip(keys, values)) for values in itertools.product(*(sweep[k] for k in keys))]


def _point_name(setting: dict) -> str:
    return ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in setting.items())


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def samples_per_step(cfg) -> int:
    """Responses one optimizer step of ``cfg`` trains on: two per pair for DPO, the step's
    samples for online methods, the rows for SFT."""
    if cfg.algorithm == "dpo":
        return 2 * cfg.train.batch_size
    if cfg.online:
        return cfg.rl.prompts_per_step * cfg.rl.group_size
    return cfg.train.batch_size


def _budget(spec, source: str) -> tuple[str, int]:
    if (not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in ("steps", "samples")
            or not isinstance(next(iter(spec.values())), int) or next(iter(spec.values())) < 1):
        raise ConfigError(f"{source}: budget: expected {{steps: N}} or {{samples: N}} (N >= 1)")
    return next(iter(spec.items()))


def load_comparison(path: str | Path, overrides=()) -> Comparison:
    """Read, expand and validate a comparison (nothing runs)."""
    return build_comparison(read_yaml(path, "comparison"), overrides, str(path))


def build_comparison(spec: dict, overrides=(), source: str = "comparison") -> Comparison:
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: expected a mapping with seeds, budget, eval and arms")
    unknown = set(spec) - KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; a comparison "
                          f"has {', '.join(sorted(KEYS))}")
    seeds = spec.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{source}: seeds: expected a list of integers, e.g. [0, 1, 2]")
    unit, value = _budget(spec.get("budget"), source)
    arms = spec.get("arms")
    if not isinstance(arms, list) or not arms:
        raise ConfigError(f"{source}: arms: expected a list of arms")
    eval_raw = deep_copy(spec.get("eval") or {})
    curve_points = eval_raw.pop("curve_points", 4)
    reward_stage = eval_raw.pop("reward_model", None)
    settings = build(EvalSettings, eval_raw, "eval")
    if not Path(settings.prompts).is_file():
        raise ConfigError(f"{source}: eval.prompts: file {settings.prompts} not found")
    parallel = spec.get("parallel", 1)
    if parallel != "auto" and (not isinstance(parallel, int) or parallel < 1):
        raise ConfigError(f"{source}: parallel: expected a count >= 1 or auto")

    def expand(steps_of) -> tuple[list[dict], list[tuple]]:
        raw_stages, meta = list(deep_copy(spec.get("stages") or [])), []
        for i, arm in enumerate(arms):
            name = arm.get("name") if isinstance(arm, dict) else None
            if not isinstance(name, str) or not name.isidentifier():
                raise ConfigError(f"{source}: arms[{i}]: needs a 'name' (letters, digits, _)")
            if arm.get("baseline"):
                for seed in seeds:
                    meta.append((name, name, {}, seed, None))
                continue
            own = {k: deep_copy(v) for k, v in arm.items() if k not in ARM_KEYS}
            for setting in _points(f"{source}: arms[{i}] ({name})", arm.get("sweep")):
                point = _point_name(setting) or name
                for seed in seeds:
                    stage_name = f"{name}_{_slug(point)}_s{seed}" if setting else f"{name}_s{seed}"
                    raw = {"name": stage_name, "from": arm.get("from"), **deep_copy(own)}
                    for key, v in setting.items():
                        set_dotted(raw, key, v)
                    set_dotted(raw, "train.seed", seed)
                    steps = steps_of(stage_name)
                    set_dotted(raw, "train.max_steps", steps)
                    if _get(raw, "eval.every") is None:
                        set_dotted(raw, "eval.every", max(1, steps // max(1, curve_points)))
                    raw_stages.append(raw)
                    meta.append((name, point, setting, seed, stage_name))
        return raw_stages, meta

    def pipeline(steps_of):
        raw_stages, meta = expand(steps_of)
        root, stages = build_pipeline({k: spec[k] for k in ("run_dir", "defaults") if k in spec}
                                      | {"stages": raw_stages}, overrides, source, rounds=False)
        return root, {s.name: s for s in stages}, meta

    if unit == "steps":
        root, stages, meta = pipeline(lambda _: value)
    else:  # steps from each arm's own samples per step: build once to know them
        _, probe, _ = pipeline(lambda _: 1)
        steps = {n: max(1, math.ceil(value / samples_per_step(s.cfg))) for n, s in probe.items()}
        root, stages, meta = pipeline(lambda n: steps[n])
    arm_stage_names = {m[4] for m in meta if m[4]}
    shared = [s for n, s in stages.items() if n not in arm_stage_names]
    base = [a for a in arms if a.get("baseline")]
    if len(base) != 1:
        raise ConfigError(f"{source}: arms: exactly one arm needs 'baseline: true' (the model the "
                          f"others start from; KL reference and win-rate opponent), found "
                          f"{len(base)}")
    reference = _baseline_model(base[0], spec, stages, source)
    runs = [ArmRun(arm, point, setting, seed,
                   root / (stage_name or f"{arm}_s{seed}"), stages.get(stage_name),
                   stages[stage_name].output if stage_name else reference)
            for arm, point, setting, seed, stage_name in meta]
    rm_stages = [s for s in shared if s.cfg.algorithm == "rm"]
    if reward_stage is not None and reward_stage not in {s.name for s in rm_stages}:
        raise ConfigError(f"{source}: eval.reward_model: {reward_stage!r} is not an rm stage "
                          f"(rm stages: {', '.join(s.name for s in rm_stages) or 'none'})")
    rm = next((s.output for s in rm_stages if reward_stage in (None, s.name)), None)
    if reward_stage is None and len(rm_stages) > 1:
        raise ConfigError(f"{source}: eval.reward_model: name the rm stage whose model scores "
                          f"the proxy reward ({', '.join(s.name for s in rm_stages)})")
    text = (f"each arm trains {value} optimizer steps" if unit == "steps" else
            f"each arm trains on {value} sampled or dataset responses (steps: "
            + ", ".join(sorted({f'{r.arm} {r.stage.cfg.train.max_steps}' for r in runs
                                if r.stage})) + ")")
    return Comparison(root, shared, runs, base[0]["name"], reference, rm, settings,
                      {"unit": unit, "value": value, "text": text}, parallel, seeds)


def _baseline_model(arm: dict, spec: dict, stages: dict, source: str) -> Path:
    link = arm.get("from")
    if isinstance(link, list):
        link = link[0] if len(link) == 1 else None
    if link is not None:
        if link not in stages:
            raise ConfigError(f"{source}: arms ({arm['name']}): from {link!r}: no stage has "
                              f"that name")
        return stages[link].output
    path = _get(arm, "model.path") or _get(spec.get("defaults") or {}, "model.path")
    if not path:
        raise ConfigError(f"{source}: arms ({arm['name']}): the baseline needs 'from: <stage>' "
                          f"or model.path")
    return Path(path)


# ---- running -------------------------------------------------------------------------------------
def _arm_job(run: ArmRun, comp: Comparison) -> dict:
    """Train (unless the baseline) and evaluate one arm run; its figures, also in RESULT."""
    from orchestrator.run import train
    out = {"arm": run.arm, "point": run.point, "seed": run.seed, "setting": run.setting,
           "started": time.time()}
    if run.stage is not None:
        cfg = run.stage.cfg  # one log line per arm run on the driver, not a bar's every update
        cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, progress_bar=False))
        t0 = time.perf_counter()
        result = train(cfg)
        out.update(wall_s=time.perf_counter() - t0, steps=result.steps, usage=result.usage,
                   algorithm=run.stage.cfg.algorithm, models_held=models_held(run.stage.cfg))
    else:
        out.update(wall_s=0.0, steps=0, usage={}, algorithm="sft", models_held=1)
    t0 = time.perf_counter()
    ev = evaluate_policy(str(run.model_dir), str(comp.reference),
                         str(comp.reward_model) if comp.reward_model else None, comp.eval,
                         seed=run.seed)
    out.update(eval=ev, eval_s=time.perf_counter() - t0, finished=time.time())
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / RESULT).write_text(json.dumps(out, indent=1))
    return out


def models_held(cfg) -> int:
    """Model copies the arm's roles hold: policy, reference, critic, a reward model, and the
    rollout engines' copy of the policy."""
    return sum(1 for r in cfg.roles() if r != "reward" or cfg.reward.kind == "model")


def _parallel(comp: Comparison) -> int:
    if comp.parallel != "auto":
        return comp.parallel
    import ray
    cpus = ray.cluster_resources().get("CPU", 1)
    need = max((sum(getattr(r.stage.cfg, role).cpus * getattr(r.stage.cfg, role).actors
                    for role in r.stage.cfg.roles()) for r in comp.runs if r.stage), default=1)
    return max(1, int(cpus // need))


def run_comparison(comp: Comparison) -> dict:
    """Train the shared stages, then every arm run not done (``parallel`` at once, each a Ray
    task holding its own actors), then write the report; the report's paths by name."""
    import ray

    from orchestrator.compare_report import write_report
    from orchestrator.roles import connect
    started = connect(_cluster(comp.shared + [r.stage for r in comp.runs if r.stage]))
    try:
        if comp.shared:
            run_pipeline(comp.root, comp.shared)
        todo, at_once = [r for r in comp.runs if not r.done()], _parallel(comp)
        log.info("compare %s: %d arm runs, %d done before, %d to run, %d at a time", comp.root,
                 len(comp.runs), len(comp.runs) - len(todo), len(todo), at_once)
        job = ray.remote(num_cpus=0, max_retries=0)(_arm_job)
        pending: dict = {}
        while todo or pending:
            while todo and len(pending) < at_once:
                run = todo.pop(0)
                log.info("arm %s seed %d in %s", run.label, run.seed, run.run_dir)
                pending[job.remote(run, comp)] = run
            ready, _ = ray.wait(list(pending), num_returns=1)
            run = pending.pop(ready[0])
            ray.get(ready[0])  # raises the arm's error, naming it below
            log.info("arm %s seed %d done", run.label, run.seed)
    finally:
        if started:
            ray.shutdown()
    return write_report(report_data(comp), comp.root / "report")


# ---- the report's figures ------------------------------------------------------------------------
def spike_steps(rows: list[tuple[int, float]], window: int = 10, z: float = 6.0) -> list[int]:
    """Steps whose value jumps above the median of the ``window`` steps before it by more
    than ``z`` robust standard deviations (1.4826 x the median absolute deviation, at least 5%
    of the median's size); the first five steps have too little history to judge."""
    out = []
    for i in range(5, len(rows)):
        prev = sorted(v for _, v in rows[max(0, i - window):i])
        med = prev[len(prev) // 2]
        mad = sorted(abs(v - med) for v in prev)[len(prev) // 2] * 1.4826
        if rows[i][1] > med + z * max(mad, 0.05 * abs(med), 1e-6):
            out.append(rows[i][0])
    return out


def _metric_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _run_figures(run: ArmRun, res: dict, baseline_gold: list[float] | None, unit: str) -> dict:
    ev, usage = res["eval"], res.get("usage") or {}
    rows = _metric_rows(run.run_dir)
    online = run.stage is not None and run.stage.cfg.online
    key = CURVE_KEY["online" if online else "offline"]
    # x: optimizer steps, or with a budget in samples the responses trained on so far
    per = (samples_per_step(run.stage.cfg) if run.stage is not None and unit == "samples"
           else 1)
    curve = [[r["step"] * per, r[key]] for r in rows if isinstance(r.get(key), (int, float))]
    curve += [[r["step"] * per, r[f"final/{key}"]] for r in rows if f"final/{key}" in r]
    steps = [r for r in rows if "loss" in r and r.get("step", 0) > 0]
    gold = ev.get("gold_per_prompt")
    return {
        "seed": run.seed, "gold_reward": ev.get("gold_reward"),
        "proxy_reward": ev.get("proxy_reward"), "kl": ev["kl"],
        "win_rate": win_rate(gold, baseline_gold) if gold and baseline_gold else None,
        "wall_s": res["wall_s"],
        "cpu_seconds": {role: u["cpus"] * u["actors"] * u["seconds"] for role, u in usage.items()},
        "gpu_seconds": {role: u["gpus"] * u["actors"] * u["seconds"] for role, u in usage.items()},
        "peak_rss_mib": {role: u["peak_rss_mib"] for role, u in usage.items()
                         if u.get("peak_rss_mib") is not None},
        "spikes": {m: spike_steps([(r["step"], r[m]) for r in steps if m in r])
                   for m in ("loss", "kl")},
        "curve": curve if run.stage is not None else [],
    }


def report_data(comp: Comparison) -> dict:
    """The figures of every arm run, grouped by sweep point in the config's order."""
    results = {(r.arm, r.point, r.seed): json.loads((r.run_dir / RESULT).read_text())
               for r in comp.runs}
    base = {r.seed: results[(r.arm, r.point, r.seed)]["eval"].get("gold_per_prompt")
            for r in comp.runs if r.arm == comp.baseline}
    points: dict[tuple, dict] = {}
    for run in comp.runs:
        res = results[(run.arm, run.point, run.seed)]
        point = points.setdefault((run.arm, run.point), {
            "arm": run.arm, "point": run.point, "label": run.label,
            "algorithm": res["algorithm"], "setting": run.setting,
            "models_held": res["models_held"],
            "steps": run.stage.cfg.train.max_steps if run.stage else 0, "runs": []})
        point["runs"].append(_run_figures(run, res, base.get(run.seed), comp.budget["unit"]))
    ev = dataclasses.asdict(comp.eval)
    budget = dict(comp.budget)
    shared = [(s.name, _recorded(s).wall_s) for s in comp.shared]  # done: they ran first
    if shared:
        budget["text"] += (". Shared stages, trained once before the arms and not counted in "
                           "their costs: " + ", ".join(f"{n} {w:.0f} s" if w is not None else n
                                                       for n, w in shared))
    return {"title": f"rayalign compare: {comp.root}", "budget": budget,
            "eval": {"prompts": ev["num_prompts"], "samples_per_prompt": ev["samples_per_prompt"],
                     "temperature": ev["temperature"], "max_new_tokens": ev["max_new_tokens"],
                     "seed": "the run's seed", "file": ev["prompts"]},
            "seeds": comp.seeds, "arms": list(points.values())}


def compare(path: str | Path, overrides=()) -> dict:
    """Load, validate and run a comparison (the ``rayalign compare`` command)."""
    return run_comparison(load_comparison(path, overrides))

