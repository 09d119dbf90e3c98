"""The rollout role on a transformers model instead of vLLM (``rollout.backend: hf``).

Same calls, same results as :class:`actors.rollout.RolloutEngine`: n samples per prompt with
the log-prob of each sampled token under the model's own distribution (temperature 1, before
top-k/top-p), finish reasons, ``logprobs`` of given sequences, and weights received over the
same gloo group and bucket wire as the vLLM engines (``actors/weight_sync.py``).

Why it exists: on a CPU with a small model, vLLM's scheduler and bookkeeping cost more per
decoding step than the model does, and plain batched decoding is faster (transformers'
``generate`` is what TRL does without vLLM; the loop here, :meth:`HFRolloutEngine._decode`,
does less around each step). It has no paged KV cache, no continuous batching and no tensor
parallelism: for GPUs and real model sizes, use vLLM.

Differences a caller can see:

- ``Sampling.seed`` seeds one torch generator for the whole call, so a seeded call repeats
  itself, but its samples are not those a vLLM engine gives for the same seed. Unseeded calls
  draw their seeds from ``rollout.seed`` + the engine's rank.
- At most ``max_num_seqs`` (default 256) sequences are decoded together; the rest of a call
  waits for the next round.
- Responses of one call are decoded together, left-padded to the longest prompt; each stops
  at EOS (kept, as vLLM keeps it), at a stop string (its tokens kept), or at
  ``max_new_tokens`` / ``max_model_len``.
"""
from __future__ import annotations

import logging
import time
from typing import Iterator

import torch

from actors.group import ALL, SCATTER, dispatch
from actors.rollout import EngineBase, RolloutSample, RolloutSettings, Sampling, Sequence

log = logging.getLogger(__name__)


class HFRolloutEngine(EngineBase):
    """A transformers causal LM as one replica of the rollout role (CPU)."""

    synced = False  # see around()

    def __init__(self, rank: int, world_size: int, settings: RolloutSettings):
        super().__init__(rank, world_size, settings)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from actors.runtime import DTYPES, attention, set_threads
        s = settings
        set_threads(s.cpus)
        t0 = time.perf_counter()
        try:
            # varlen: transformers' sdpa, but a decoding step's attention is two matrix
            # products (actors/packed_attention.py _attend_one), about twice as fast on a CPU
            model = AutoModelForCausalLM.from_pretrained(
                s.model_path, dtype=DTYPES[s.dtype], attn_implementation=attention("varlen"),
                trust_remote_code=s.trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(s.model_path,
                                                      trust_remote_code=s.trust_remote_code)
        except Exception as e:
            raise RuntimeError(f"rollout engine {rank}: transformers could not load "
                               f"{s.model_path} ({type(e).__name__}: {e})") from e
        model.eval().requires_grad_(False)
        torch.manual_seed(s.seed + rank)  # unseeded calls draw their seeds from here
        self._adopt(model, tokenizer)
        log.info("rollout engine %d up in %.1fs (%s, transformers, %d threads)", rank,
                 time.perf_counter() - t0, s.model_path, torch.get_num_threads())

    @classmethod
    def around(cls, model, tokenizer, rank: int, world_size: int, settings: RolloutSettings,
               synced: bool = False):
        """An engine that samples with ``model`` as it is (the hybrid engine: the policy
        trainer's own module, actors/policy_trainer.py ``generate``); no copy, no load.
        ``synced``: the model's forward is a collective of several ranks (ZeRO-3), which
        decode in lockstep, each with at least one row."""
        engine = cls.__new__(cls)
        EngineBase.__init__(engine, rank, world_size, settings)
        engine._adopt(model, tokenizer)
        engine.synced = synced
        return engine

    def _adopt(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos = set([eos] if isinstance(eos, int) else (eos or []))
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos, default=0)
        self.group = None
        # every parameter the model holds must arrive in a sync (a tied head comes once), by
        # the name the trainer sends: the checkpoint's
        from actors.weight_sync import checkpoint_namer
        saved = checkpoint_namer(self.model)
        self.params = {saved(n): p for n, p in self.model.named_parameters()}

    # ---- sampling ---------------------------------------------------------------------------
    @dispatch(SCATTER)
    def generate(self, prompts: list[list[int]],
                 sampling: dict | Sampling | None = None) -> list[RolloutSample]:
        """Sample ``sampling.n`` responses per prompt; samples of a prompt are adjacent."""
        sp = Sampling.from_dict(sampling)
        prompts, skipped = self._fit_prompts([list(p) for p in prompts])
        todo = [i for i in range(len(prompts)) if i not in skipped]
        outputs = dict(self._finished(prompts, todo, sp, todo))  # the stream, drained
        if self.synced and not (todo and sp.n):  # its peers' forwards wait for this rank's
            self._sample([[self.pad_id]], sp, self._generator(sp))
        return self._in_prompt_order(prompts, skipped, sp.n, outputs)

    def _finished(self, prompts, todo, sp, where):
        rows = [k for k in todo for _ in range(sp.n)]  # the prompt of each row
        generator = self._generator(sp)
        chunk = self.settings.max_num_seqs or 256  # bounds the KV cache of one round
        got: dict[int, dict[int, RolloutSample]] = {}
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            for done in self._sampled([prompts[k] for k in part], sp, generator):
                for j, sample in done:
                    k = part[j]
                    got.setdefault(k, {})[start + j] = sample
                    if len(got[k]) == sp.n:
                        mine = got.pop(k)
                        yield k, [mine[r] for r in sorted(mine)]

    def _generator(self, sp: Sampling) -> torch.Generator:
        """The random numbers of one call: seeded calls repeat, unseeded ones differ."""
        generator = torch.Generator()
        if sp.seed is None:
            generator.manual_seed(int(torch.randint(0, 2**62, ())))
        else:
            generator.manual_seed(self._call_seed(sp.seed))
        return generator

    def _sample(self, rows: list[list[int]], sp: Sampling,
                generator: torch.Generator) -> list[RolloutSample]:
        """One sample per row (rows left-padded into one batch), in row order."""
        done = dict(pair for part in self._sampled(rows, sp, generator) for pair in part)
        return [done[i] for i in range(len(rows))]

    @torch.no_grad()
    def _sampled(self, rows: list[list[int]], sp: Sampling, generator: torch.Generator
                 ) -> Iterator[list[tuple[int, RolloutSample]]]:
        """Sample one response per row, yielding ``(row, sample)`` pairs as rows finish."""
        limit = self.settings.max_model_len
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's next token is at column width
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        caps = torch.tensor([min(sp.max_new_tokens, limit - len(r)) for r in rows])
        device = next(self.model.parameters()).device  # the trainer's, in the hybrid engine
        ids, mask = ids.to(device), mask.to(device)
        told = torch.zeros(len(rows), dtype=torch.bool)

        def finished(new, picked, done) -> list[tuple[int, RolloutSample]]:
            out = []
            for i in (done & ~told).nonzero().flatten().tolist():
                tokens = new[i, :caps[i]].tolist()
                end, reason = self._end(tokens, sp)
                out.append((i, RolloutSample(rows[i], tokens[:end], picked[i, :end].tolist(),
                                             reason)))
            told.logical_or_(done)
            return out

        # both samplers draw from torch's global generator: lend it this call's state (kept
        # between the parts handed out: the caller draws no random numbers of its own)
        saved = torch.random.get_rng_state()
        torch.random.set_rng_state(generator.get_state())
        try:
            if self.synced:
                new, picked = self._generate(ids, mask, int(caps.max()), sp)
                yield finished(new, picked, torch.ones(len(rows), dtype=torch.bool))
                return
            steps = self._decode(ids, mask, int(caps.max()), sp)
            for t, live, new, picked in steps:
                done = ~live.cpu() | (caps <= t + 1)
                if (done & ~told).any():
                    yield finished(new.cpu(), picked.cpu(), done)
        finally:
            generator.set_state(torch.random.get_rng_state())
            torch.random.set_rng_state(saved)

    def _decode(self, ids: torch.Tensor, mask: torch.Tensor, steps: int, sp: Sampling
                ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Sample up to ``steps`` tokens after each left-padded row. After each step t it
        yields ``(t, live, tokens, log-probs)``: which rows are still sampling, and the
        tokens and the raw log-prob of each so far, [rows, steps] (a row that stopped is
        final: after its EOS or stop string its tokens are padding).

        transformers' ``generate`` does the same with more around each step: a KV cache
        grown by concatenation (every layer's keys and values copied again each step), and
        sampling by ``multinomial``, which draws one exponential per vocabulary entry and row
        where one uniform per row is enough. Here the cache is allocated once and each step
        attends over its filled part only (actors/decode_cache.py), rows that repeat a prompt
        share one prefill, and each token is drawn by inverse CDF (its cumulative
        probabilities searched for one uniform draw): the same distribution, from the same
        global generator. At the benchmark's size this takes a third less time than
        ``generate`` (benchmarks/rl_step.py, README).
        """
        from actors.decode_cache import decode_cache
        model, rows, width = self.model, ids.shape[0], ids.shape[1]
        device = ids.device
        cache = decode_cache(model, width + steps)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        cache_position = torch.arange(width, device=device)
        tokens = torch.full((rows, steps), self.pad_id, dtype=torch.long, device=device)
        picked = torch.zeros(rows, steps, device=device)
        live = torch.ones(rows, dtype=torch.bool, device=device)
        eos = (None if sp.ignore_eos or not self.eos
               else torch.tensor(sorted(self.eos), device=device))
        # a prompt repeated over rows (a group's n samples) is prefilled once, and the cache
        # then widened to one row per sample
        _, row_of = torch.unique(torch.cat([ids, mask], 1), dim=0, return_inverse=True)
        firsts = torch.full((int(row_of.max()) + 1,), rows, device=device).scatter_reduce_(
            0, row_of, torch.arange(rows, device=device), "amin")
        shared = len(firsts) < rows
        pick = firsts if shared else slice(None)
        logits = model(input_ids=ids[pick], attention_mask=mask[pick], position_ids=position[pick],
                       past_key_values=cache, cache_position=cache_position, use_cache=True,
                       logits_to_keep=1).logits[:, -1].float()
        if shared:
            cache.batch_select_indices(row_of)
            logits = logits[row_of]
        for t in range(steps):
            nxt = torch.where(live, self._draw(logits, sp), self.pad_id)
            tokens[:, t] = nxt
            # the log-prob under the raw (untempered, unfiltered) distribution
            picked[:, t] = torch.log_softmax(logits, -1).gather(-1, nxt[:, None]).squeeze(-1)
            if eos is not None:
                live &= ~torch.isin(nxt, eos)
            if sp.stop:
                for i in live.nonzero().flatten().tolist():
                    text = self.tokenizer.decode(tokens[i, :t + 1].tolist())
                    live[i] = not any(s in text for s in sp.stop)
            yield t, live, tokens, picked
            if t == steps - 1 or not live.any():
                break
            position, cache_position = position[:, -1:] + 1, cache_position[-1:] + 1
            mask = torch.cat([mask, mask.new_ones(rows, 1)], 1)
            logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=position,
                           past_key_values=cache, cache_position=cache_position,
                           use_cache=True, logits_to_keep=1).logits[:, -1].float()

    @staticmethod
    def _draw(logits: torch.Tensor, sp: Sampling) -> torch.Tensor:
        """One token per row: the most likely at temperature 0; else sampled after the
        temperature, the top-k cut and the top-p cut, in that order (transformers' order)."""
        if sp.temperature == 0:
            return logits.argmax(-1)
        scores = logits / sp.temperature if sp.temperature != 1 else logits
        if sp.top_k:
            kth = scores.topk(min(sp.top_k, scores.shape[-1])).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, -1)
        if sp.top_p < 1:  # keep the most likely tokens until their mass reaches top_p
            ranked, order = probs.sort(-1, descending=True)
            ranked = ranked.masked_fill(ranked.cumsum(-1) - ranked >= sp.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, ranked)
        cdf = probs.cumsum(-1)
        # drawn on the CPU, from the generator the call lends (see _sample)
        draw = torch.rand(cdf.shape[0], 1).to(cdf.device) * cdf[:, -1:]
        return torch.searchsorted(cdf, draw).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, steps: int,
                  sp: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_decode` by transformers' ``generate``, for ranks of a ZeRO-3 trainer,
        whose forwards are collectives: ``synced_gpus`` keeps them in lockstep until every
        rank's rows are done."""
        from transformers import GenerationConfig
        greedy = sp.temperature == 0
        config = GenerationConfig(
            do_sample=not greedy, temperature=None if greedy else sp.temperature,
            top_p=None if greedy else sp.top_p, top_k=None if greedy else sp.top_k,
            max_new_tokens=steps, eos_token_id=None if sp.ignore_eos else sorted(self.eos),
            pad_token_id=self.pad_id, output_logits=True, return_dict_in_generate=True,
            stop_strings=list(sp.stop) or None)
        out = self.model.generate(input_ids=ids, attention_mask=mask,
                                  generation_config=config,
                                  tokenizer=self.tokenizer if sp.stop else None,
                                  synced_gpus=True)
        new = out.sequences[:, ids.shape[1]:].cpu()
        # log p of each sampled token under the raw (untempered, unfiltered) distribution
        picked = torch.stack([torch.log_softmax(step.float(), dim=-1)
                              .gather(-1, new[:, t:t + 1]).squeeze(-1)
                              for t, step in enumerate(out.logits)], dim=1).cpu()
        return new, picked

    def _end(self, tokens: list[int], sp: Sampling) -> tuple[int, str]:
        """Where a sampled row ends and why: its first EOS (kept), the token that completes a
        stop string, or its last token (what follows a finished row is padding)."""
        end, reason = len(tokens), "length"
        if not sp.ignore_eos:
            first = next((j for j, t in enumerate(tokens) if t in self.eos), None)
            if first is not None:
                end, reason = first + 1, "stop"
        if sp.stop and any(s in self.tokenizer.decode(tokens[:end]) for s in sp.stop):
            lo, hi = 1, end  # the shortest prefix whose text holds a stop string
            while lo < hi:
                mid = (lo + hi) // 2
                text = self.tokenizer.decode(tokens[:mid])
                lo, hi = (lo, mid) if any(s in text for s in sp.stop) else (mid + 1, hi)
            end, reason = lo, "stop"
        return end, reason

    @dispatch(SCATTER)
    def logprobs(self, sequences: list[Sequence]) -> list[list[float]]:
        """log p(response token | prompt, earlier response tokens) for each (prompt, response)."""
        from actors.logprobs import response_logprobs
        self._check_sequences(sequences)
        return response_logprobs(self.model, [(list(p), list(r)) for p, r in sequences],
                                 micro_batch=32, pack=True, pad_id=self.pad_id)

    # ---- weights ----------------------------------------------------------------------------
    def workers(self) -> int:
        return 1

    def init_weight_sync(self, master_address: str, master_port: int, rank_offset: int,
                         world_size: int, timeout_s: float = 300.0,
                         bucket_bytes: int | None = None) -> None:
        """Join the trainer<->engines group (every member calls this at the same time)."""
        from actors.weight_sync import open_group
        self.group = open_group(master_address, master_port, rank_offset, world_size, timeout_s)

    @dispatch(ALL)
    def update_weights(self, info: dict) -> dict:
        """Receive one full set of weights (while the trainer sends it) into the model's own
        parameters; raises :class:`WeightSyncError` naming any that did not arrive."""
        from actors.weight_sync import SyncTally, UpdateInfo, receive_buckets
        self._check_usable()
        tally = SyncTally(set(self.params))
        try:
            with torch.no_grad():
                for batch in receive_buckets(self.group, UpdateInfo(**info), tally):
                    for name, tensor in batch:
                        self.params[name].copy_(tensor)
        except Exception as exc:  # a bucket may have stopped half copied: sample with neither
            self._mark_broken("weight update failed part way, parameters half copied", exc)
        report = tally.report()
        self._check_report(report)  # parameters not sent keep their old values
        log.info("rollout engine %d: %d tensors received in %.2fs", self.rank,
                 report["received"], report["seconds"])
        return {"rank": self.rank, "received": report["received"], "checked": True,
                "seconds": report["seconds"]}
