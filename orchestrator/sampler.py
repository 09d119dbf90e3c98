"""A seeded, resumable sampler over dataset indices.

Each epoch is a permutation drawn from (seed, epoch); the sampler's whole state is
(epoch, position), saved in checkpoints, so a resumed run draws exactly the indices an
uninterrupted run would have drawn next.
"""
from __future__ import annotations

import random


class ResumableSampler:
    def __init__(self, size: int, seed: int, shuffle: bool = True):
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
        return order

    def next_batch(self, n: int) -> list[int]:
        """The next ``n`` indices; an epoch boundary continues into the next permutation."""
        out = []
        while len(out) < n:
            if self.position == self.size:
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = min(n - len(out), self.size - self.position)
            out += self._order[self.position:self.position + take]
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"size": self.size, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size or state["seed"] != self.seed:
            raise ValueError(f"sampler state is for {state['size']} rows with seed {state['seed']}, "
                             f"this dataset has {self.size} rows with seed {self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)
