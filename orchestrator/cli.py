"""The ``rayalign`` command line: train, pipeline, compare, validate, generate, scale, schema,
tiny-model, synthetic-data."""
from __future__ import annotations

import argparse
import logging
import sys

from orchestrator.schema import ConfigError

log = logging.getLogger("rayalign")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayalign", description="Align language models on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("train", "run training from a YAML config"),
                       ("pipeline", "run a pipeline's stages in order (SFT -> RM -> PPO, ...); "
                                    "a re-run skips done stages and resumes an interrupted one"),
                       ("compare", "run the arms of a comparison (SFT, DPO, PPO, GRPO, online "
                                   "DPO; sweeps, seeds) and write a report with plots; a re-run "
                                   "runs only what is not done"),
                       ("validate", "check a run, pipeline or comparison config and exit (0 "
                                    "when valid)")):
        c = sub.add_parser(name, help=text)
        c.add_argument("config", help="YAML config file, e.g. configs/dpo-tiny.yaml or "
                                      "configs/rlhf-tiny.yaml (a pipeline)")
        c.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-6; in a "
                                                    "pipeline, stage.key=value for one stage")
    sub.add_parser("schema", help="list every config key with its default, range and meaning")
    sc = sub.add_parser("scale", help="change the number of rollout engines of a running online "
                        "run (from its next step on)")
    sc.add_argument("run_dir", help="the run's run_dir (local path, as the driver sees it)")
    sc.add_argument("--rollout", type=int, required=True, help="rollout engines wanted (>= 1)")
    t = sub.add_parser("tiny-model", help="write a small random model (Llama, or --arch) and a BPE "
                       "tokenizer, no hub needed")
    t.add_argument("dir")
    t.add_argument("--size", default="tiny", choices=("tiny", "small", "medium", "base"))
    t.add_argument("--arch", default="llama",
                   choices=("llama", "qwen2", "mistral", "gemma", "gpt_neox"),
                   help="model family (its own config and modules; our BPE tokenizer)")
    t.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("synthetic-data", help="write the synthetic task: preference pairs "
                       "(train/eval.jsonl) and SFT rows (sft/sft_eval.jsonl)")
    d.add_argument("dir")
    d.add_argument("--train", type=int, default=2000, help="training pairs")
    d.add_argument("--eval", type=int, default=200, help="held-out pairs (and held-out SFT rows)")
    d.add_argument("--sft", type=int, default=None, help="SFT rows (default: as many as --train)")
    d.add_argument("--min-words", type=int, default=8)
    d.add_argument("--max-words", type=int, default=60)
    d.add_argument("--seed", type=int, default=0)
    g = sub.add_parser("generate", help="sample from a model or checkpoint dir with the rollout group "
                       "(vLLM engines, or rollout.backend=hf)")
    g.add_argument("model", help="Hugging Face model dir, or a checkpoint dir holding model/")
    g.add_argument("prompts", help="prompt file (.jsonl, .parquet or .arrow) with a 'prompt' column")
    g.add_argument("--out", required=True, help="JSONL file to write the samples to")
    g.add_argument("--n", type=int, default=1, help="samples per prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--reward-fn", default=None, help="module:function to score each sample")
    g.epilog = ("Engine and cluster settings follow as KEY=VALUE, e.g. rollout.actors=2 "
                "rollout.max_model_len=512 cluster.num_cpus=4 (see `rayalign schema`).")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "generate":
        args.settings = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from orchestrator.session import RunStopped
    try:
        return _run(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except RunStopped as stop:  # asked to stop, and stopped cleanly: a success
        log.warning("%s", stop)
        return 0
    except Exception as exc:  # data, placement and role errors are for the user, one line each
        from actors.group import RoleFailure
        from orchestrator.data import DataError
        from orchestrator.placement import PlacementError
        from orchestrator.roles import ClusterError
        from orchestrator.session import RunFailed
        if isinstance(exc, (DataError, PlacementError, ClusterError)):
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
            return 3
        if isinstance(exc, (RunFailed, RoleFailure)):
            print(f"run failed: {exc}", file=sys.stderr)
            return 4
        raise


def _kind(path: str) -> str:
    """What a config file holds: "comparison" (arms), "pipeline" (stages) or "run"."""
    from pathlib import Path

    from orchestrator.config import parse_yaml
    try:
        spec = parse_yaml(Path(path).read_text())
    except Exception:  # unreadable files get their error from the loader that follows
        return "run"
    if isinstance(spec, dict) and "arms" in spec:
        return "comparison"
    return "pipeline" if isinstance(spec, dict) and "stages" in spec else "run"


def _run(args) -> int:
    if args.command == "scale":
        from orchestrator.elastic import scale
        try:
            path = scale(args.run_dir, args.rollout)
        except ValueError as exc:
            raise ConfigError(f"--rollout: {exc}") from None
        log.info("%s: %d rollout engine(s) asked for; the run applies it as its next step starts",
                 path, args.rollout)
        return 0
    kind = _kind(args.config) if args.command == "validate" else None
    if args.command == "compare" or kind == "comparison":
        from orchestrator.compare import load_comparison, run_comparison
        comp = load_comparison(args.config, args.overrides)
        if args.command == "validate":
            log.info("%s: valid comparison: %d shared stages, %d arm runs", args.config,
                     len(comp.shared), len(comp.runs))
            return 0
        trained = [r.stage for r in comp.runs if r.stage] + comp.shared
        logging.getLogger().setLevel(trained[0].cfg.log.level if trained else "INFO")
        paths = run_comparison(comp)
        log.info("report: %s", paths["report.md"])
        return 0
    if args.command == "pipeline" or kind == "pipeline":
        from orchestrator.pipelines import load_pipeline, run_pipeline
        root, stages = load_pipeline(args.config, args.overrides)
        if args.command == "validate":
            log.info("%s: valid pipeline of %d stages (%s)", args.config, len(stages),
                     " -> ".join(s.name for s in stages))
            return 0
        logging.getLogger().setLevel(stages[0].cfg.log.level)
        run_pipeline(root, stages)
        return 0
    if args.command in ("train", "validate"):
        from orchestrator.config import RunConfig
        cfg = RunConfig.from_yaml(args.config, args.overrides)
        cfg.check_paths()
        if args.command == "validate":
            log.info("%s: valid", args.config)
            return 0
        logging.getLogger().setLevel(cfg.log.level)
        from orchestrator.run import train
        train(cfg)
        return 0
    if args.command == "generate":
        from orchestrator.config import ClusterConfig, RolloutConfig, parse_yaml
        from orchestrator.generate import generate
        from orchestrator.schema import build
        sections: dict = {"rollout": {}, "cluster": {}}
        for item in args.settings:
            key, _, raw = item.partition("=")
            section, _, name = key.partition(".")
            if section not in sections or not name or not raw:
                raise ConfigError(f"{item}: expected rollout.KEY=VALUE or cluster.KEY=VALUE")
            sections[section][name] = parse_yaml(raw)
        sampling = dict(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, top_k=args.top_k, stop=tuple(args.stop), seed=args.seed)
        generate(args.model, args.prompts, args.out, sampling,
                 build(RolloutConfig, sections["rollout"], "rollout"),
                 build(ClusterConfig, sections["cluster"], "cluster"), args.reward_fn)
        return 0
    if args.command == "schema":
        from orchestrator.config import schema_lines
        sys.stdout.write("\n".join(schema_lines()) + "\n")
        return 0
    if args.command == "tiny-model":
        from orchestrator.tiny_model import build_model
        build_model(args.dir, args.size, args.seed, arch=args.arch)
        return 0
    if args.command == "synthetic-data":
        from orchestrator.synthetic import write_dataset
        paths = write_dataset(args.dir, args.train, args.eval, args.seed, args.min_words,
                              args.max_words, args.sft)
        log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
        return 0
    return 1
