"""The transformers rollout backend (actors/rollout_hf.py), in this process without Ray.

Weights come over a real two-rank gloo group: the trainer side sends from a thread, the
engine receives in the test's thread, the same code paths the actors run.
"""
from __future__ import annotations

import socket
import threading

import pytest
import torch

from actors.rollout import RolloutSettings
from actors.rollout_hf import HFRolloutEngine
from actors.weight_sync import WeightSyncError, describe, open_group, send_weights
from orchestrator.config import RunConfig
from orchestrator.schema import ConfigError
from orchestrator.tiny_model import build_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_model(tmp_path_factory.mktemp("hf-rollout") / "model", "tiny", seed=0))


@pytest.fixture(scope="module")
def engine(model_dir):
    torch.set_num_threads(1)
    return HFRolloutEngine(0, 1, RolloutSettings(model_dir, max_model_len=64, backend="hf"))


PROMPTS = [[5, 17, 33, 8], [40, 41], [9, 10, 11, 12, 13, 14]]


def test_samples_line_up_with_prompts_and_carry_their_logprobs(engine):
    out = engine.generate(PROMPTS, dict(n=3, max_new_tokens=8, seed=7))
    assert len(out) == 9
    assert [s.prompt_ids for s in out] == [p for p in PROMPTS for _ in range(3)]
    for s in out:
        assert 1 <= len(s.response_ids) <= 8 and len(s.logprobs) == len(s.response_ids)
        assert s.finish_reason in ("stop", "length")
        if s.finish_reason == "stop":  # EOS ends the response and is kept, as in vLLM
            assert s.response_ids[-1] in engine.eos and not set(s.response_ids[:-1]) & engine.eos
        else:
            assert len(s.response_ids) == 8
    # the sampling log-probs are the model's own (T = 1) log-probs of those tokens
    scored = engine.logprobs([(s.prompt_ids, s.response_ids) for s in out])
    gap = max(abs(a - b) for s, lp in zip(out, scored) for a, b in zip(s.logprobs, lp))
    assert gap < 1e-4


def test_seeded_calls_repeat_and_samples_of_a_prompt_differ(engine):
    a = engine.generate(PROMPTS[:1], dict(n=6, max_new_tokens=8, seed=3, ignore_eos=True))
    b = engine.generate(PROMPTS[:1], dict(n=6, max_new_tokens=8, seed=3, ignore_eos=True))
    c = engine.generate(PROMPTS[:1], dict(n=6, max_new_tokens=8, seed=4, ignore_eos=True))
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    assert [s.response_ids for s in a] != [s.response_ids for s in c]
    assert len({tuple(s.response_ids) for s in a}) > 1
    assert all(len(s.response_ids) == 8 and s.finish_reason == "length" for s in a)
    # another engine of the group, given the same seed, draws other numbers
    other = HFRolloutEngine(1, 2, engine.settings)
    d = other.generate(PROMPTS[:1], dict(n=6, max_new_tokens=8, seed=3, ignore_eos=True))
    assert [s.response_ids for s in a] != [s.response_ids for s in d]


def test_a_call_larger_than_max_num_seqs_is_decoded_in_rounds(model_dir):
    small = HFRolloutEngine(0, 1, RolloutSettings(model_dir, max_model_len=64, backend="hf",
                                                  max_num_seqs=4))
    sp = dict(n=3, max_new_tokens=6, seed=5)
    out = small.generate(PROMPTS, sp)  # 9 sequences: rounds of 4, 4 and 1
    assert [s.prompt_ids for s in out] == [p for p in PROMPTS for _ in range(3)]
    assert [s.response_ids for s in out] == [s.response_ids for s in small.generate(PROMPTS, sp)]
    scored = small.logprobs([(s.prompt_ids, s.response_ids) for s in out])
    assert max(abs(a - b) for s, lp in zip(out, scored) for a, b in zip(s.logprobs, lp)) < 1e-4
    # unseeded calls differ from each other
    free = dict(n=3, max_new_tokens=6, ignore_eos=True)
    assert ([s.response_ids for s in small.generate(PROMPTS, free)]
            != [s.response_ids for s in small.generate(PROMPTS, free)])


def test_streamed_generation_hands_back_each_prompt_when_its_samples_are_done(engine,
                                                                            model_dir):
    """``generate_stream`` yields a prompt's group as soon as its last sample ends (here the
    long prompt, whose room in max_model_len ends it after 4 tokens), and the parts together
    are what ``generate`` returns: the same tokens and log-probs, also when a group is split
    over rounds of ``max_num_seqs``."""
    prompts = [[5, 17, 33, 8], list(range(5, 65)), [40, 41]]  # the second leaves room for 4
    sp = dict(n=3, max_new_tokens=8, seed=5, ignore_eos=True)
    small = HFRolloutEngine(0, 1, RolloutSettings(model_dir, max_model_len=64, backend="hf",
                                                  max_num_seqs=4))
    for eng in (engine, small):
        parts = list(eng.generate_stream(prompts, sp, groups=1))
        got = {p: samples for positions, samples in parts for p in positions}
        streamed = [s for p in sorted(got) for s in got[p]]
        whole = eng.generate(prompts, sp)
        assert [(s.response_ids, s.logprobs, s.finish_reason) for s in streamed] == \
            [(s.response_ids, s.logprobs, s.finish_reason) for s in whole]
        assert all(len(samples) == 3 for samples in got.values())
    # handed back while the others are still sampling: one prefill and 3 of 8 decoding steps
    forwards = []
    hook = engine.model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        stream = engine.generate_stream(prompts, sp, groups=1)
        parts = [next(stream)]
        assert len(forwards) == 4
        parts += list(stream)
        assert len(forwards) == 8
    finally:
        hook.remove()
    assert [positions for positions, _ in parts] == [[1], [0], [2]]
    assert [len(s.response_ids) for s in parts[0][1]] == [4, 4, 4]
    # groups of two, and positions given by the caller (prompts an earlier call left)
    parts = list(engine.generate_stream(prompts[::2], sp, groups=2, positions=[0, 2]))
    assert [positions for positions, _ in parts] == [[0, 2]]
    assert [s.prompt_ids for s in parts[0][1]] == [prompts[0]] * 3 + [prompts[2]] * 3


def test_greedy_is_deterministic_without_a_seed(engine):
    a = engine.generate(PROMPTS, dict(n=1, max_new_tokens=6, temperature=0))
    b = engine.generate(PROMPTS, dict(n=1, max_new_tokens=6, temperature=0))
    assert [s.response_ids for s in a] == [s.response_ids for s in b]


def test_greedy_decoding_equals_transformers_generate(engine):
    """The engine's own decoding loop (a preallocated KV cache, left-padded rows of several
    lengths) picks the tokens ``generate`` picks, EOS included."""
    out = engine.generate(PROMPTS, dict(n=1, max_new_tokens=10, temperature=0))
    for prompt, sample in zip(PROMPTS, out):
        ref = engine.model.generate(input_ids=torch.tensor([prompt]), do_sample=False,
                                    max_new_tokens=10, eos_token_id=sorted(engine.eos),
                                    pad_token_id=engine.pad_id)[0, len(prompt):].tolist()
        end = next((i + 1 for i, t in enumerate(ref) if t in engine.eos), len(ref))
        assert sample.response_ids == ref[:end]


def test_draws_follow_the_tempered_and_cut_distribution():
    """One draw per row by inverse CDF: token frequencies over many rows match the softmax
    after temperature; top-k and top-p leave only the tokens transformers' warpers leave."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from actors.rollout import Sampling
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    rows = 40000
    for sp in (Sampling(temperature=1.0), Sampling(temperature=0.5), Sampling(top_k=3),
               Sampling(top_p=0.6), Sampling(temperature=0.7, top_k=5, top_p=0.8)):
        scores = logits / sp.temperature
        if sp.top_k:
            scores = TopKLogitsWarper(sp.top_k)(None, scores)
        if sp.top_p < 1:
            scores = TopPLogitsWarper(sp.top_p)(None, scores)
        want = torch.softmax(scores, -1)[0]
        drawn = HFRolloutEngine._draw(logits.expand(rows, -1), sp)
        seen = torch.bincount(drawn, minlength=12).float() / rows
        assert set(drawn.tolist()) <= set(want.nonzero().flatten().tolist()), sp  # cut
        assert set((want > 1e-3).nonzero().flatten().tolist()) <= set(drawn.tolist()), sp
        assert torch.allclose(seen, want, atol=0.01), (sp, seen, want)
    assert HFRolloutEngine._draw(logits, Sampling(temperature=0)).item() == logits.argmax().item()


def test_stop_string_ends_the_response_at_the_token_that_completes_it(engine):
    out = engine.generate(PROMPTS, dict(n=4, max_new_tokens=24, seed=1, ignore_eos=True))
    # pick a string the unconstrained samples produce, then stop on it
    text = engine.tokenizer.decode(out[0].response_ids)
    stop = text[len(text) // 2:len(text) // 2 + 1]
    # the same call with the stop string: the same draws, up to where the string is complete
    cut = engine.generate(PROMPTS, dict(n=4, max_new_tokens=24, seed=1, ignore_eos=True,
                                        stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert stop in engine.tokenizer.decode(cut.response_ids)
    assert stop not in engine.tokenizer.decode(cut.response_ids[:-1])
    assert cut.response_ids == out[0].response_ids[:len(cut.response_ids)]


def test_long_prompts_follow_the_long_prompt_setting(model_dir):
    long_prompt = list(range(5, 5 + 70))
    skip = HFRolloutEngine(0, 1, RolloutSettings(model_dir, max_model_len=64, backend="hf",
                                                 long_prompt="skip"))
    out = skip.generate([PROMPTS[0], long_prompt], dict(n=2, max_new_tokens=4))
    assert [s.finish_reason for s in out[2:]] == ["skipped", "skipped"]
    assert all(s.response_ids for s in out[:2])
    error = HFRolloutEngine(0, 1, RolloutSettings(model_dir, max_model_len=64, backend="hf"))
    with pytest.raises(ValueError, match="rollout engine 0: prompt 1 has 70 tokens"):
        error.generate([PROMPTS[0], long_prompt], dict(n=1))
    # a response never runs past max_model_len
    near = error.generate([list(range(5, 5 + 60))], dict(n=1, max_new_tokens=16,
                                                         ignore_eos=True))[0]
    assert len(near.response_ids) == 4 and near.finish_reason == "length"


def test_engine_that_cannot_load_names_its_rank_and_path(tmp_path):
    with pytest.raises(RuntimeError, match=r"rollout engine 2: transformers could not load .*nowhere"):
        HFRolloutEngine(2, 3, RolloutSettings(str(tmp_path / "nowhere"), backend="hf"))


def _sync(engine, module, exclude=(), shared_memory=True):
    """Send ``module``'s parameters to ``engine`` over a fresh two-rank group (the bytes
    through shared memory, or with ``shared_memory=False`` over the gloo socket)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    info = describe(module, bucket_bytes=64 << 10, exclude=exclude)
    sender: dict = {}

    def trainer():
        group = open_group("127.0.0.1", port, 0, 2, timeout_s=30, shared_memory=shared_memory)
        sender["stats"] = send_weights(module.named_parameters(), info, group)

    thread = threading.Thread(target=trainer)
    thread.start()
    try:
        engine.init_weight_sync("127.0.0.1", port, 1, 2, timeout_s=30)
        return engine.update_weights(info.payload())
    finally:
        thread.join(timeout=60)
        assert sender["stats"]["transport"] == ("shm" if shared_memory else "gloo"), sender


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "gloo"])
def test_weights_sent_reach_the_engine_and_a_skipped_one_is_named(model_dir, shared_memory):
    from transformers import AutoModelForCausalLM
    engine = HFRolloutEngine(0, 1, RolloutSettings(model_dir, max_model_len=64, backend="hf"))
    trained = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seqs = [(p, [7, 8, 9, 10]) for p in PROMPTS]
    want = [torch.log_softmax(trained(torch.tensor([p + r])).logits[0, len(p) - 1:-1], -1)
            .gather(-1, torch.tensor(r)[:, None]).squeeze(-1).tolist() for p, r in seqs]
    stale = engine.logprobs(seqs)
    assert max(abs(a - b) for x, y in zip(want, stale) for a, b in zip(x, y)) > 1e-2

    report = _sync(engine, trained, shared_memory=shared_memory)
    assert report["received"] == len(dict(trained.named_parameters()))
    synced = engine.logprobs(seqs)
    assert max(abs(a - b) for x, y in zip(want, synced) for a, b in zip(x, y)) < 1e-4

    # leave out one layer's MLP: the engine names what it did not get
    with pytest.raises(WeightSyncError, match=r"missing: model\.layers\.1\.mlp"):
        _sync(engine, trained, exclude=("model.layers.1.mlp.",), shared_memory=shared_memory)


@pytest.mark.parametrize("overrides, key", [
    (["rollout.backend=hf", "rollout.gpus=1", "policy.gpus=1"], "rollout.gpus"),
    (["rollout.backend=hf", "rollout.tensor_parallel_size=2"], "rollout.tensor_parallel_size"),
])
def test_config_refuses_what_the_hf_backend_cannot_do(overrides, key):
    base = {"algorithm": "grpo", "run_dir": "/tmp/x", "model": {"path": "m"},
            "data": {"train": "t.jsonl"}, "reward": {"function": "m:f"},
            "rl": {"prompts_per_step": 2, "group_size": 2}, "train": {"batch_size": 4}}
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_dict(base, overrides)


def test_rows_of_one_prompt_share_its_prefill(engine):
    """A prompt sampled n times goes through the model once and its cache is widened to the n
    rows (actors/decode_cache.py): greedy rows equal the prompt decoded alone, with the same
    log-probs, and sampled rows carry their own tokens' log-probs."""
    from actors.decode_cache import FilledLayer, decode_cache
    assert all(isinstance(layer, FilledLayer)
               for layer in decode_cache(engine.model, 8).layers)
    greedy = dict(max_new_tokens=8, temperature=0, ignore_eos=True)
    alone = engine.generate(PROMPTS, dict(n=1, **greedy))
    shared = engine.generate(PROMPTS, dict(n=3, **greedy))
    for i, s in enumerate(shared):
        ref = alone[i // 3]
        assert s.response_ids == ref.response_ids
        assert max(abs(a - b) for a, b in zip(s.logprobs, ref.logprobs)) < 1e-5
    sampled = engine.generate(PROMPTS, dict(n=4, max_new_tokens=8, seed=2, ignore_eos=True))
    assert len({tuple(s.response_ids) for s in sampled[:4]}) > 1
    scored = engine.logprobs([(s.prompt_ids, s.response_ids) for s in sampled])
    assert max(abs(a - b) for s, lp in zip(sampled, scored) for a, b in zip(s.logprobs, lp)) < 1e-4
