"""Progress bars for the driver's long waits: shown on a terminal when ``log.progress_bar`` is
on, quiet otherwise (CI, Ray job logs, files), where the log lines tell the progress."""
from __future__ import annotations

import sys

from tqdm import tqdm


def shown(cfg) -> bool:
    return bool(cfg.log.progress_bar) and sys.stderr.isatty()


def bar(cfg, total: int, desc: str, unit: str, initial: int = 0) -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not shown(cfg),
                dynamic_ncols=True)


def pad_to_multiple(items: list, n: int) -> list:
    """Repeat the last item so every replica gets as many (ZeRO-3 needs equal forwards)."""
    extra = (-len(items)) % n
    return items + [items[-1]] * extra


def run_in_chunks(cfg, group, method: str, items: list, desc: str, unit: str,
                  per_replica: int = 256) -> list:
    """``group.run(method, items)`` (a SCATTER call) in pieces of ``per_replica`` rows per
    replica, with a progress bar; the results in order. Each piece is padded to a multiple of
    the replicas (:func:`pad_to_multiple`) and the padding's results dropped."""
    out, size = [], per_replica * len(group)
    with bar(cfg, len(items), desc, unit) as progress:
        for start in range(0, len(items), size):
            part = items[start:start + size]
            out += group.run(method, pad_to_multiple(part, len(group)))[:len(part)]
            progress.update(len(part))
    return out
