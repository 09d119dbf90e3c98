"""The rollout role: a vLLM engine inside an actor that samples responses and receives weights.

One replica is one ``vllm.LLM`` (with ``tensor_parallel_size`` workers of its own). By default
(``in_actor``) vLLM's engine core, and at tensor_parallel_size 1 its worker too, run inside the
actor's process; otherwise vLLM spawns them. The weight-transfer engine ``rayalign_gloo``
(``actors/vllm_weight_engine.py``) is registered wherever a worker runs, by naming
``WeightSyncExtension`` as vLLM's worker extension class.

Log-probs come from the engine in two ways: :meth:`RolloutEngine.generate` returns the
log-prob of each sampled token, and :meth:`RolloutEngine.logprobs` scores given response tokens
after a given prompt (one prefill with ``prompt_logprobs``). The second is what the weight-sync
proof compares with the trainer's log-probs of the same tokens.

:class:`EngineBase` holds what every engine kind shares (prompt-length rules, result order,
the completeness check of a sync); ``actors/rollout_hf.py`` is the other kind, transformers'
``generate`` in the actor (``rollout.backend: hf``).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, fields
from typing import Iterator

from actors.group import ALL, SCATTER, Measured, dispatch

log = logging.getLogger(__name__)

Sequence = tuple[list[int], list[int]]  # (prompt ids, response ids)
# added per engine rank to a call's seed; odd and near 2**31.6, because a CPU torch generator
# keeps only a seed's low 32 bits, and so that it does not meet the per-request and per-step
# offsets (j * n, 100003 * step) of other engines or steps in any run shorter than ~26000 steps
SEED_STRIDE = 0x9E3779B1


@dataclass
class RolloutSettings:
    """How to build one engine. Ranges are checked by the config schema
    (``orchestrator/config.py``, section ``rollout``), not here."""
    model_path: str                      # local Hugging Face model dir
    tensor_parallel_size: int = 1        # workers per engine (one chip / CPU socket each)
    max_model_len: int = 1024            # longest prompt + response, in tokens
    dtype: str = "float32"               # engine weights and activations
    seed: int = 0                        # sampling seed (engine rank is added)
    enforce_eager: bool = True           # no graph capture / compilation (fast start)
    gpu_memory_utilization: float = 0.5  # GPU: fraction of device memory for weights + KV cache
    kv_cache_gib: float = 1.0            # CPU: KV-cache size
    cpu_threads_bind: str = "auto"       # CPU: VLLM_CPU_OMP_THREADS_BIND ("auto", "nobind", "0-3")
    in_actor: bool = True                # engine core (and, at tp=1, the worker) in this process
    logprobs_mode: str = "raw_logprobs"  # log-probs of the model's own distribution (T = 1)
    weight_sync: bool = True             # build a weight-transfer engine (trainer => engine)
    weight_backend: str = "rayalign_gloo"  # its backend: ours over gloo (CPU), vLLM's nccl (GPU)
    long_prompt: str = "error"           # a prompt that leaves no room: error, truncate or skip
    backend: str = "vllm"                # vllm, or hf (transformers generate: actors/rollout_hf.py)
    cpus: float = 1.0                    # hf: the role's CPUs, its torch threads (vLLM binds its
                                         # own, cpu_threads_bind)
    max_num_seqs: int | None = None      # sequences decoded at once (None: vLLM's default; hf 256)
    trust_remote_code: bool = False      # run the modelling code the checkpoint ships
    sleep: bool = False                  # GPU: vLLM's sleep mode (KV cache freed between calls)


@dataclass
class Sampling:
    """How to sample. ``max_new_tokens`` bounds each response; ``stop`` ends it at a string."""
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                       # 0: no top-k cut
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None              # sample k of prompt j of engine r's share (vLLM):
                                         # seed + r * SEED_STRIDE + j*n + k (engines draw apart)
    ignore_eos: bool = False             # keep sampling past EOS (benchmarks: fixed lengths)

    @classmethod
    def from_dict(cls, d: dict | Sampling | None) -> Sampling:
        if isinstance(d, Sampling):
            return d
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d or {}) - known)
        if bad:
            raise ValueError(f"sampling: unknown key(s) {', '.join(bad)}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**(d or {}))


@dataclass
class RolloutSample:
    """One sampled response. ``logprobs[i]`` is log p(response_ids[i] | prompt, response[:i])
    under the engine's weights; ``finish_reason`` is "stop" (EOS or a stop string), "length"
    (``max_new_tokens`` or ``max_model_len`` reached) or "skipped" (prompt too long, and the
    engine's ``long_prompt`` is skip)."""
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str


class EngineBase(Measured):
    """What every kind of rollout engine shares: its settings, the prompt-length rules, the
    order of results, and its place in the trainer<->engines weight-sync group."""

    broken: str | None = None  # why the engine serves nothing more (a failed weight update)

    def __init__(self, rank: int, world_size: int, settings: RolloutSettings):
        self.rank, self.world_size, self.settings = rank, world_size, settings

    def _check_usable(self) -> None:
        """Refuse to sample or score with weights that a failed update left half loaded."""
        if self.broken:
            from actors.weight_sync import WeightSyncError
            raise WeightSyncError(f"rollout engine {self.rank}: {self.broken}; it serves no more "
                                  f"calls: replace it (a re-run starts a fresh one)")

    def _mark_broken(self, why: str, exc: Exception) -> None:
        from actors.weight_sync import WeightSyncError
        self.broken = why
        if isinstance(exc, WeightSyncError):
            raise exc
        raise WeightSyncError(f"rollout engine {self.rank}: {why} ({type(exc).__name__}: "
                              f"{exc})") from exc

    @dispatch(ALL)
    def check_update(self, info: dict) -> None:
        """Refuse, before any byte moves, an update this engine could not take whole (the
        engines that count what arrives afterwards have nothing to check here)."""

    def _check_lengths(self, lengths: list[int], what: str, room: int) -> None:
        limit = self.settings.max_model_len
        for i, n in enumerate(lengths):
            if n + room > limit:
                raise ValueError(
                    f"rollout engine {self.rank}: {what} {i} has {n} tokens, but max_model_len is "
                    f"{limit}{' and at least one response token must fit' if room else ''}")

    def _fit_prompts(self, prompts: list[list[int]]) -> tuple[list[list[int]], set[int]]:
        """Apply ``long_prompt`` to prompts that leave no room for a response token."""
        self._check_usable()
        mode, room = self.settings.long_prompt, self.settings.max_model_len - 1
        if mode == "error":
            self._check_lengths([len(p) for p in prompts], "prompt", room=1)
            return prompts, set()
        long = {i for i, p in enumerate(prompts) if len(p) > room}
        if long:
            log.warning("rollout engine %d: %d prompt(s) longer than %d tokens %s", self.rank,
                        len(long), room, "skipped" if mode == "skip" else "cut to their last tokens")
        if mode == "truncate":  # keep the end, where the generation prompt is
            return [p[-room:] if i in long else p for i, p in enumerate(prompts)], set()
        return prompts, long

    def _check_sequences(self, sequences: list[Sequence]) -> None:
        """What :meth:`logprobs` needs: sequences that fit, each with a prompt."""
        self._check_usable()
        self._check_lengths([len(p) + len(r) for p, r in sequences], "sequence", room=0)
        for i, (p, _) in enumerate(sequences):
            if not p:
                raise ValueError(f"rollout engine {self.rank}: sequence {i} has an empty prompt")

    @staticmethod
    def _in_prompt_order(prompts: list[list[int]], skipped: set[int], n: int,
                         outputs: dict[int, list[RolloutSample]]) -> list[RolloutSample]:
        """The n samples of each prompt, prompts in input order; a skipped prompt keeps its
        place with n empty "skipped" samples, so results still line up with the prompts."""
        samples = []
        for i, prompt in enumerate(prompts):
            samples += ([RolloutSample(prompt, [], [], "skipped") for _ in range(n)]
                        if i in skipped else outputs[i])
        return samples

    @dispatch(SCATTER)
    def generate_stream(self, prompts: list[list[int]], sampling: dict | Sampling | None = None,
                        groups: int = 1, positions: list[int] | None = None
                        ) -> Iterator[tuple[list[int], list[RolloutSample]]]:
        """:meth:`generate`, handed back as it finishes (``rollout.stream_groups``): yields
        ``(positions, samples)`` each time ``groups`` more prompts have all ``sampling.n`` of
        their samples (whatever is left at the end), so the driver scores those while the
        engine samples the rest. ``positions`` index ``prompts``, or are taken from the given
        ``positions`` (a call that samples what an earlier one left unanswered; vLLM also
        seeds each prompt by its position, as in that call); ``samples`` holds n per
        position, in that order."""
        sp = Sampling.from_dict(sampling)
        prompts, skipped = self._fit_prompts([list(p) for p in prompts])
        where = list(range(len(prompts))) if positions is None else list(positions)
        if len(where) != len(prompts):
            raise ValueError(f"rollout engine {self.rank}: {len(where)} positions for "
                             f"{len(prompts)} prompts")
        part = [(i, [RolloutSample(prompts[i], [], [], "skipped") for _ in range(sp.n)])
                for i in sorted(skipped)]
        todo = [i for i in range(len(prompts)) if i not in skipped]
        for i, samples in self._finished(prompts, todo, sp, where):
            part.append((i, samples))
            if len(part) >= groups:
                yield [where[i] for i, _ in part], [x for _, got in part for x in got]
                part = []
        if part:
            yield [where[i] for i, _ in part], [x for _, got in part for x in got]

    def _finished(self, prompts: list[list[int]], todo: list[int], sp: Sampling,
                  where: list[int]) -> Iterator[tuple[int, list[RolloutSample]]]:
        """``(i, the n samples of prompts[i])`` for each i of ``todo``, as each finishes;
        ``where[i]`` is prompt i's position in the call it continues (vLLM seeds by it)."""
        raise NotImplementedError(f"{type(self).__name__} does not stream")

    def _check_report(self, rep: dict, worker: int = 0) -> None:
        """Raise :class:`WeightSyncError` if a sync left this engine short of a parameter."""
        from actors.weight_sync import WeightSyncError
        if rep.get("missing") or rep.get("unexpected"):
            raise WeightSyncError(
                f"rollout engine {self.rank} (worker {worker}): weight sync incomplete: "
                f"{len(rep['missing'])} parameter(s) missing: {_short(rep['missing'])}; "
                f"{len(rep['unexpected'])} unknown: {_short(rep['unexpected'])}")

    def _call_seed(self, seed: int) -> int:
        """This engine's seed for a call seeded with ``seed``: the engines of a group get the
        same sampling arguments, and would otherwise draw the same random numbers for
        different prompts."""
        return seed + self.rank * SEED_STRIDE

    def workers(self) -> int:
        """Ranks this engine takes in the weight-sync group (one per worker)."""
        return self.settings.tensor_parallel_size

    def shutdown(self) -> None:
        """Release the engine before the actor dies (nothing to do unless a kind needs it)."""


class RolloutEngine(EngineBase):
    """A vLLM engine as one replica of the rollout role.

    Made with ``ActorGroup("rollout", RolloutEngine, pg, n, cpus, gpus, init_args=(settings,))``.
    """

    def __init__(self, rank: int, world_size: int, settings: RolloutSettings):
        super().__init__(rank, world_size, settings)
        self._streams = 0  # generate_stream calls so far (they name their requests)
        s = settings
        local = s.model_path.startswith(("/", ".", "~"))
        if local and not os.path.isdir(os.path.expanduser(s.model_path)):
            raise RuntimeError(f"rollout engine {rank}: model dir {s.model_path} not found")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", s.cpu_threads_bind)
        if s.in_actor:
            # vLLM would otherwise spawn an engine-core process and a worker process, each
            # importing vLLM again (about 15 s apiece on a small CPU machine)
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        backend = "uni" if s.in_actor and s.tensor_parallel_size == 1 else "mp"
        import vllm

        from actors.vllm_weight_engine import register
        register()  # rayalign_gloo, for a worker in this process (vLLM's spawned ones do it too)
        kwargs = dict(
            model=s.model_path, tensor_parallel_size=s.tensor_parallel_size,
            max_model_len=s.max_model_len, dtype=s.dtype, seed=s.seed + rank,
            enforce_eager=s.enforce_eager, gpu_memory_utilization=s.gpu_memory_utilization,
            logprobs_mode=s.logprobs_mode, distributed_executor_backend=backend,
            trust_remote_code=s.trust_remote_code,
            worker_extension_cls="actors.vllm_weight_engine.WeightSyncExtension")
        if s.max_num_seqs is not None:
            kwargs["max_num_seqs"] = s.max_num_seqs
        if s.weight_sync:
            from actors.weight_sync_nccl import BACKEND as NCCL, VLLM_BACKEND
            kwargs["weight_transfer_config"] = {
                "backend": VLLM_BACKEND if s.weight_backend == NCCL else s.weight_backend}
        if s.sleep:
            kwargs["enable_sleep_mode"] = True
        if not _has_gpu():
            kwargs["kv_cache_memory_bytes"] = int(s.kv_cache_gib * (1 << 30))
        t0 = time.perf_counter()
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as e:
            # with spawned workers vLLM's message only says "see root cause above"
            hint = ("; the worker's own error is in vLLM's log above" if "root cause" in str(e)
                    or "initialization failed" in str(e) else "")
            raise RuntimeError(f"rollout engine {rank}: vLLM could not start on {s.model_path} "
                               f"({type(e).__name__}: {e}){hint}") from e
        log.info("rollout engine %d up in %.1fs (%s, tp=%d)", rank, time.perf_counter() - t0,
                 s.model_path, s.tensor_parallel_size)

    # ---- sampling ---------------------------------------------------------------------------
    @dispatch(SCATTER)
    def generate(self, prompts: list[list[int]],
                 sampling: dict | Sampling | None = None) -> list[RolloutSample]:
        """Sample ``sampling.n`` responses per prompt; samples of a prompt are adjacent."""
        from vllm.inputs import TokensPrompt
        sp = Sampling.from_dict(sampling)
        prompts, skipped = self._fit_prompts([list(p) for p in prompts])
        todo = [i for i in range(len(prompts)) if i not in skipped]
        results = self.llm.generate([TokensPrompt(prompt_token_ids=prompts[i]) for i in todo],
                                    [self._params(sp, i) for i in todo],
                                    use_tqdm=False) if todo else []
        outputs = {i: self._samples(prompts[i], out) for i, out in zip(todo, results)}
        return self._in_prompt_order(prompts, skipped, sp.n, outputs)

    def _params(self, sp: Sampling, position: int, final_only: bool = False):
        """vLLM's sampling parameters for the prompt at ``position`` of a call."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind
        # vLLM seeds the k-th of a request's n samples with seed + k
        return SamplingParams(
            n=sp.n, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
            max_tokens=sp.max_new_tokens, stop=list(sp.stop), logprobs=0,
            detokenize=bool(sp.stop),  # callers decode ids themselves; stop strings need text
            ignore_eos=sp.ignore_eos,
            seed=None if sp.seed is None else self._call_seed(sp.seed) + position * sp.n,
            # a request of n samples comes back once, whole (else one sample at a time)
            **({"output_kind": RequestOutputKind.FINAL_ONLY} if final_only else {}))

    @staticmethod
    def _samples(prompt: list[int], out) -> list[RolloutSample]:
        return [RolloutSample(prompt, list(c.token_ids),
                              [step[t].logprob for t, step in zip(c.token_ids, c.logprobs)],
                              c.finish_reason or "length") for c in out.outputs]

    def _finished(self, prompts, todo, sp, where):
        from vllm.inputs import TokensPrompt
        engine, asked = self.llm.llm_engine, {}
        self._streams += 1
        try:
            for i in todo:  # outputs and aborts name a request by the id given here
                rid = f"stream{self._streams}-{i}"
                engine.add_request(rid, TokensPrompt(prompt_token_ids=prompts[i]),
                                   self._params(sp, where[i], final_only=True))
                asked[rid] = i
            while asked and engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished and out.request_id in asked:
                        i = asked.pop(out.request_id)
                        yield i, self._samples(prompts[i], out)
            if asked:
                raise RuntimeError(f"rollout engine {self.rank}: vLLM ended {len(asked)} "
                                   f"request(s) without an answer")
        finally:
            if asked:  # the caller stopped early, or vLLM failed: free what is still queued
                engine.abort_request(list(asked))

    @dispatch(SCATTER)
    def logprobs(self, sequences: list[Sequence]) -> list[list[float]]:
        """log p(response token | prompt, earlier response tokens) for each (prompt, response)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        self._check_sequences(sequences)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p) + list(r)) for p, r in sequences],
            params, use_tqdm=False)
        result = []
        for (prompt, response), out in zip(sequences, outputs):
            full = list(prompt) + list(response)
            steps = out.prompt_logprobs  # steps[t]: {token: Logprob} for full[t] (None at t = 0)
            result.append([steps[t][full[t]].logprob for t in range(len(prompt), len(full))])
        return result

    # ---- weights ----------------------------------------------------------------------------
    def init_weight_sync(self, master_address: str, master_port: int, rank_offset: int,
                         world_size: int, timeout_s: float = 300.0,
                         bucket_bytes: int | None = None) -> None:
        """Join the trainer<->engines group (every member calls this at the same time)."""
        if self.settings.weight_backend == "nccl":
            from actors.weight_sync_nccl import engine_init_payload
            from actors.weight_sync import DEFAULT_BUCKET_BYTES
            payload = engine_init_payload(master_address, master_port, rank_offset, world_size,
                                          bucket_bytes or DEFAULT_BUCKET_BYTES, timeout_s)
        else:
            payload = dict(master_address=master_address, master_port=master_port,
                           rank_offset=rank_offset, world_size=world_size, timeout_s=timeout_s)
        self.llm.collective_rpc("init_weight_transfer_engine", args=(payload,))

    @dispatch(ALL)
    def check_update(self, info: dict) -> None:
        """Before a sync over vLLM's NCCL engine (which reports nothing back), refuse an update
        that would not cover this engine's checkpoint: with a layer loaded in part, vLLM's
        layerwise reload rebuilds it on memory never written. The gloo path counts what
        arrived instead (``rayalign_sync_report``)."""
        if self.settings.weight_backend != "nccl":
            return
        import json
        from pathlib import Path

        from actors.weight_sync import WeightSyncError, checkpoint_names
        cfg = json.loads((Path(self.settings.model_path) / "config.json").read_text())
        tied = bool(cfg.get("tie_word_embeddings", cfg.get("text_config", {}).get(
            "tie_word_embeddings", False)))
        expected = checkpoint_names(self.settings.model_path, tied)
        if expected is None:
            return
        missing = sorted(expected - set(info["names"]))
        unknown = sorted(set(info["names"]) - expected)
        if missing or unknown:
            raise WeightSyncError(
                f"rollout engine {self.rank}: the update would leave {len(missing)} parameter(s) "
                f"of its checkpoint out: {_short(missing)}; {len(unknown)} it does not know: "
                f"{_short(unknown)} (nothing was sent)")

    @dispatch(ALL)
    def update_weights(self, info: dict) -> dict:
        """Receive one full set of weights (while the trainer sends it) and check it is whole.

        Raises :class:`WeightSyncError` naming the parameters that did not arrive, or that the
        engine's checkpoint does not have (the engine keeps working: what was not sent keeps
        its old weights, and a full sync repairs it); or, when the transfer itself fails, with
        its cause, and the engine is then marked broken and refuses further calls (its
        weights are neither old nor new).
        """
        t0 = time.perf_counter()
        if self.settings.weight_backend == "nccl":  # vLLM's engine reads names, dtypes, shapes
            from actors.weight_sync_nccl import update_payload
            info = update_payload(info)
        self._check_usable()
        self.llm.collective_rpc("start_weight_update")
        try:
            self.llm.collective_rpc("update_weights", args=(info,))
        except Exception as exc:
            # no finish: vLLM would rebuild the half-loaded layers on memory never written
            # (and raise its own error, hiding this one); the engine is done for
            self._mark_broken("weight update failed part way, layers left half loaded", exc)
        self.llm.collective_rpc("finish_weight_update")
        self.llm.reset_prefix_cache()
        reports = self.llm.collective_rpc("rayalign_sync_report")
        for worker, rep in enumerate(reports):  # whole layers left out keep their old weights
            self._check_report(rep, worker)
        seconds = time.perf_counter() - t0
        log.info("rollout engine %d: %d tensors received in %.2fs", self.rank,
                 reports[0].get("received", 0), seconds)
        return {"rank": self.rank, "received": reports[0].get("received", 0),
                "checked": reports[0].get("checked", False), "seconds": seconds}

    def sleep(self) -> None:
        """With ``settings.sleep``: free the KV cache and move the weights off the device
        (vLLM's sleep level 1) until :meth:`wake`; the trainer has the device meanwhile."""
        if self.settings.sleep and not getattr(self, "asleep", False):
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        """Undo :meth:`sleep` (weights back on the device, KV cache allocated again)."""
        if getattr(self, "asleep", False):
            self.llm.wake_up()
            self.asleep = False

    def shutdown(self) -> None:
        """Stop the engine's processes now rather than when the actor dies."""
        engine = getattr(self.llm, "llm_engine", None)
        if engine is not None and hasattr(engine, "engine_core"):
            engine.engine_core.shutdown()


def _short(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "") or "none"


def _has_gpu() -> bool:
    import torch
    return torch.cuda.is_available()
