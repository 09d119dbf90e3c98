"""A synthetic preference task whose ground truth is a programmatic reward.

Responses are lists of words. Some words are "bright" (reward +1 each), some "dull"
(-1 each), the rest neutral; the reward of a response is (bright - dull) / words, in [-1, 1].
Each preference pair holds two random responses to one prompt, the one with the higher
reward chosen. A policy that learned the preference writes more bright words, which
:func:`reward` measures directly on its samples.

For the classic RLHF pipeline there is also an SFT set (:func:`make_sft`): one response per
prompt that leans towards the preferred style (more bright words than dull ones on average,
with plenty of noise), some of them as two-turn conversations. The ground truth stays out of
the SFT and preference rows' training fields; a pipeline reads it only as its evaluation
reward (``eval.reward_fn: orchestrator.synthetic:reward``), so a trained reward model, not the
ground truth, drives RL.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

BRIGHT = ("sun gold amber honey lemon peach coral ruby flame spark glow shine "
          "dawn summer bloom rose lily maple copper blaze radiant warm bright joy").split()
DULL = ("ash dust fog gray slate iron lead stone mud rust soot gloom "
        "dusk winter frost sleet shadow murk bleak cold dim drab pale void").split()
NEUTRAL = ("river table window paper garden letter market bridge valley pencil "
           "forest carpet island rocket button tunnel ladder mirror basket engine "
           "castle harbor meadow planet signal marble canyon pillow rabbit saddle "
           "kettle lantern wagon violin anchor ribbon cactus feather trumpet zebra").split()
TOPICS = ("the sea", "a city", "the mountains", "a journey", "the kitchen", "a festival",
          "the night sky", "a library", "the harbor", "an old house", "the desert", "a train")
TEMPLATES = ("Describe {t} in a few words.", "List words about {t}.", "Write a short line on {t}.",
             "What comes to mind about {t}?", "Give me words for {t}.")
_BRIGHT, _DULL = frozenset(BRIGHT), frozenset(DULL)


def reward(prompt: str, response: str) -> float:
    """Ground-truth reward of a response: (bright words - dull words) / words, 0 if empty."""
    words = [w.strip(".,!?;:").lower() for w in response.split()]
    if not words:
        return 0.0
    score = sum(w in _BRIGHT for w in words) - sum(w in _DULL for w in words)
    return score / len(words)


def _response(rng: random.Random, min_words: int, max_words: int, bright: float = 0.5,
              dull: float = 0.5, bright_floor: float = 0.0) -> str:
    """Random words: each bright with a chance drawn from [bright_floor, bright_floor +
    bright), else dull with a chance drawn from [0, dull), else neutral."""
    n = rng.randint(min_words, max_words)
    p_bright = bright_floor + rng.random() * bright
    p_dull = rng.random() * dull
    words = []
    for _ in range(n):
        u = rng.random()
        pool = BRIGHT if u < p_bright else DULL if u < p_bright + p_dull else NEUTRAL
        words.append(rng.choice(pool))
    return " ".join(words)


def prompt_text(rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(t=rng.choice(TOPICS))


def make_pairs(n: int, seed: int = 0, min_words: int = 8, max_words: int = 60) -> list[dict]:
    """``n`` rows of {prompt, chosen, rejected, chosen_reward, rejected_reward}."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        prompt = prompt_text(rng)
        a, b = _response(rng, min_words, max_words), _response(rng, min_words, max_words)
        ra, rb = reward(prompt, a), reward(prompt, b)
        if abs(ra - rb) < 1e-9:
            continue
        if ra < rb:
            a, b, ra, rb = b, a, rb, ra
        rows.append({"prompt": prompt, "chosen": a, "rejected": b,
                     "chosen_reward": ra, "rejected_reward": rb})
    return rows


def sft_response(rng: random.Random, min_words: int, max_words: int) -> str:
    """A demonstration: bright words with a chance in [0.2, 0.7), dull ones in [0, 0.25), so
    its reward is about 0.3 on average and varies widely from row to row."""
    return _response(rng, min_words, max_words, bright=0.5, dull=0.25, bright_floor=0.2)


def make_sft(n: int, seed: int = 0, min_words: int = 8, max_words: int = 60,
             conversations: float = 0.1) -> list[dict]:
    """``n`` SFT rows: {prompt, response}, or (a ``conversations`` share of them) {messages}
    holding two user turns, each answered by the assistant."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if rng.random() < conversations:
            msgs = []
            for _turn in range(2):
                msgs += [{"role": "user", "content": prompt_text(rng)},
                         {"role": "assistant", "content": sft_response(rng, min_words, max_words)}]
            rows.append({"messages": msgs})
        else:
            rows.append({"prompt": prompt_text(rng),
                         "response": sft_response(rng, min_words, max_words)})
    return rows


def write_dataset(out_dir: str | Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0,
                  min_words: int = 8, max_words: int = 60, n_sft: int | None = None
                  ) -> dict[str, Path]:
    """Write the synthetic task into ``out_dir``: preference pairs (train.jsonl, eval.jsonl;
    their prompts serve as RL prompts) and SFT rows (sft.jsonl with ``n_sft`` rows, default
    ``n_train``, and sft_eval.jsonl with ``n_eval``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_sft = n_train if n_sft is None else n_sft
    files = (("train", make_pairs, n_train, seed), ("eval", make_pairs, n_eval, seed + 10_000),
             ("sft", make_sft, n_sft, seed + 20_000), ("sft_eval", make_sft, n_eval, seed + 30_000))
    paths = {}
    for name, make, n, s in files:
        path = out / f"{name}.jsonl"
        with path.open("w") as fh:
            for row in make(n, s, min_words, max_words):
                fh.write(json.dumps(row) + "\n")
        paths[name] = path
    return paths


def corpus() -> list[str]:
    """Text a tokenizer for this task should cover well."""
    rng = random.Random(1)
    lines = [" ".join(BRIGHT), " ".join(DULL), " ".join(NEUTRAL)]
    lines += [t.format(t=topic) for t in TEMPLATES for topic in TOPICS]
    lines += [_response(rng, 8, 40) for _ in range(400)]
    return lines
