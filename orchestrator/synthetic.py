"""A synthetic preference task whose ground truth is a programmatic reward.

Responses are lists of words. Some words are "bright" (reward +1 each), some "dull"
(-1 each), the rest neutral; the reward of a response is (bright - dull) / words, in [-1, 1].
Each preference pair holds two random responses to one prompt, the one with the higher
reward chosen. A policy that learned the preference writes more bright words, which
:func:`reward` measures directly on its samples.
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


def _response(rng: random.Random, min_words: int, max_words: int) -> str:
    n = rng.randint(min_words, max_words)
    p_bright = rng.random() * 0.5
    p_dull = rng.random() * 0.5
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


def write_dataset(out_dir: str | Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0,
                  min_words: int = 8, max_words: int = 60) -> dict[str, Path]:
    """Write train.jsonl and eval.jsonl of the synthetic task into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, n, s in (("train", n_train, seed), ("eval", n_eval, seed + 10_000)):
        path = out / f"{name}.jsonl"
        with path.open("w") as fh:
            for row in make_pairs(n, s, min_words, max_words):
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
