"""Trainer => rollout-engine weight sync throughput on CPU, against a plain in-memory copy.

Builds a "base" Llama (~100M parameters, float32) with ``orchestrator.tiny_model.build_model``,
starts a local Ray with two actors, and times ``orchestrator.weight_sync.sync_weights``:

* trainer side: a small actor holding the transformers model in float32 and mixing in
  ``actors.weight_sync.WeightSender`` (like the stand-in of ``tests/e2e/test_weight_sync.py``;
  no DeepSpeed, so the parameters are whole and no ZeRO-3 gathers are timed);
* engine side: one ``actors.rollout.RolloutEngine`` (vLLM on CPU, tensor_parallel_size 1, vLLM
  inside the actor) in its own placement group, through ``ActorGroup``.

After ``connect``, one warm-up sync, then ``--syncs`` timed syncs with ``--bucket-mb`` buckets.
Per sync: the driver's wall time of ``sync_weights`` (what a training loop waits for), the
bytes sent (parameters, tied embedding counted once), effective GB/s = bytes / seconds
(1 GB = 1e9 bytes), and the split on each side, from timers this script wraps around the
library's calls (no library file is changed):

* sender: packing parameters into bucket buffers vs. waiting in gloo's broadcast;
* receiver: waiting in gloo's broadcast (includes the sender's packing of that bucket), vLLM's
  ``load_weights`` (layerwise reload: materialize the layer, run the weight loaders, CPU GEMM
  weight packing in ``process_weights_after_loading``, copy back into the kernel tensors),
  ``start_weight_update`` and ``finish_weight_update``.

The floor: the engine's own processing of the weights in a sync (``start_weight_update`` +
``load_weights`` + ``finish_weight_update``, timed as above, waits excluded), which no
transport avoids; the report's ``sync / engine floor`` line is the sync's wall time over it.

The reference is a plain copy of the same bytes in this process (torch, ``--copy-threads``
threads, best of ``--copy-repeats``): one flat buffer copy, and one copy per parameter tensor
into preallocated destinations. The issue's target is sync GB/s >= 0.25 x the flat copy.

To show where the time goes, the script also measures (``--no-profile`` skips it): the raw
gloo broadcast between the two actors (one reused buffer of bucket size: the wire alone), a
bucket-sized copy into a fresh ``torch.empty`` buffer (what each bucket costs on first touch),
one sync each at the ``--also-bucket-mb`` sizes, and one cProfile'd sync on both sides (top
functions by own time).

Run from the repository root (about 1 minute on 2 cores, ~3 GB of memory)::

    .venv/bin/python benchmarks/weight_sync.py
    .venv/bin/python benchmarks/weight_sync.py --syncs 5 --bucket-mb 256 --no-profile

Numbers are noisy when other work shares the CPU; the 1-minute load average is printed.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

from bench_env import REPO, setup_logging  # noqa: E402,F401  (sets the environment first)

import torch

from actors.weight_sync import WeightSender

log = logging.getLogger("weight_sync_bench")

MB = 1 << 20
ENGINE_ENV = {"VLLM_LOGGING_LEVEL": "WARNING"}
MAX_MODEL_LEN = 256


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="base", help="tiny_model size (tiny, small, base)")
    p.add_argument("--syncs", type=int, default=3, help="timed syncs (after one warm-up)")
    p.add_argument("--bucket-mb", type=float, default=16.0, help="bucket size in MiB")
    p.add_argument("--also-bucket-mb", default="64,256",
                   help="comma list of other bucket sizes, one sync each ('' for none)")
    p.add_argument("--transport", choices=("shm", "gloo"), default="shm",
                   help="shm: the bytes through shared memory (the default on one node); gloo: "
                        "over the gloo socket (weight_sync.shared_memory: false)")
    p.add_argument("--kv-cache-gib", type=float, default=0.5, help="engine KV cache")
    p.add_argument("--copy-repeats", type=int, default=5, help="plain-copy repeats (best kept)")
    p.add_argument("--copy-threads", type=int, default=2, help="torch threads for the plain copy")
    p.add_argument("--wire-repeats", type=int, default=5, help="raw broadcasts per wire test")
    p.add_argument("--no-profile", action="store_true",
                   help="skip the wire test, the bucket sweep and the cProfile'd sync")
    p.add_argument("--out", default="runs/bench/weight_sync", help="work dir (model)")
    args = p.parse_args(argv)
    if args.syncs < 1 or args.copy_repeats < 1 or args.wire_repeats < 1:
        p.error("--syncs, --copy-repeats and --wire-repeats must be at least 1")
    if args.bucket_mb <= 0:
        p.error("--bucket-mb must be > 0")
    args.also = [float(x) for x in args.also_bucket_mb.split(",") if x.strip()]
    return args


# ---- trainer side ----------------------------------------------------------------------------
class BenchTrainer(WeightSender):
    """Trainer stand-in: a float32 transformers model; times packing vs. broadcast."""

    def __init__(self, rank: int, world_size: int, model_path: str):
        from transformers import AutoModelForCausalLM

        from actors.runtime import set_threads
        set_threads(1)
        self.rank = rank
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.broadcast_s, self.broadcasts = 0.0, 0

    def weights_module(self):
        return self.model

    def parameter_count(self) -> tuple[int, int]:
        """(parameters, bytes); a tied tensor counts once, as it is sent once."""
        params = list(self.model.parameters())
        return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)

    def open_weight_sync(self, *args, **kwargs) -> None:
        super().open_weight_sync(*args, **kwargs)
        group = self.weight_group
        plain = group.broadcast

        def add(seconds: float) -> None:
            self.broadcast_s += seconds

        def timed(buffer, wait=True):
            t0 = time.perf_counter()
            work = plain(buffer, wait=wait)
            add(time.perf_counter() - t0)
            self.broadcasts += 1
            return _TimedWork(work, add) if work is not None else None
        group.broadcast = timed  # instance attribute: the library's send path calls this

    def send_weights(self, info: dict) -> dict:
        self.broadcast_s, self.broadcasts = 0.0, 0
        t0 = time.perf_counter()
        stats = super().send_weights(info)
        # sync_weights overwrites stats["seconds"] with the driver's time: keep ours apart
        stats["send_s"] = time.perf_counter() - t0
        stats["send_broadcast_s"] = self.broadcast_s
        return stats

    def profiled_send(self, info: dict, top: int) -> tuple[dict, str]:
        import cProfile
        prof = cProfile.Profile()
        stats = prof.runcall(self.send_weights, info)
        return stats, _top_functions(prof, top)

    def wire(self, nbytes: int, repeats: int) -> list[float]:
        """Raw broadcasts of one reused buffer (rank 0 sends)."""
        return _broadcast_loop(self.weight_group, nbytes, repeats)


# ---- engine side (run inside the RolloutEngine actor with __ray_call__) ------------------------
class _TimedWork:
    """A gloo work handle whose wait() adds its seconds to a counter."""

    def __init__(self, work, add):
        self.work, self.add = work, add

    def wait(self):
        t0 = time.perf_counter()
        self.work.wait()
        self.add(time.perf_counter() - t0)


def _broadcast_loop(group, nbytes: int, repeats: int) -> list[float]:
    """Transfers of one reused buffer by the group's own transport (a gloo broadcast, or the
    shared-memory slots: copy in, signal, copy out), past the benchmark's timers."""
    from actors.weight_sync import WeightGroup
    buf = torch.ones(nbytes, dtype=torch.uint8)  # touched: no page faults in the loop
    times = []
    group.begin()
    for _ in range(repeats + 1):  # the first one also waits for the peer to arrive
        t0 = time.perf_counter()
        # the sender's bucket buffer as in a sync (a shared-memory slot: packed in place)
        out = group.send_buffer(0, nbytes) if group.rank == 0 else buf
        WeightGroup.broadcast(group, out)
        times.append(time.perf_counter() - t0)
    group.begin()
    return times[1:]


def _transfer_engine(engine):
    """The rayalign_gloo engine of the (in-process, tp=1) vLLM worker of a RolloutEngine."""
    def get(worker):
        return worker.weight_transfer_engine
    return engine.llm.collective_rpc(get)[0]


def _engine_install_timers(engine) -> int:
    """Wrap the receive path's calls with timers (this process only; no file is changed)."""
    from collections import defaultdict

    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        UnquantizedEmbeddingMethod,
    )
    from vllm.model_executor.model_loader.reload import layerwise

    te = _transfer_engine(engine)
    timers = defaultdict(float)
    engine.bench_timers = timers

    def wrap(obj, name, key, setter=setattr):
        plain = getattr(obj, name)

        def add(seconds: float) -> None:
            timers[key] += seconds

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                out = plain(*a, **kw)
            finally:
                add(time.perf_counter() - t0)
            # an asynchronous broadcast: its wait is where the time goes
            return _TimedWork(out, add) if key == "broadcast" and out is not None else out
        setter(obj, name, timed)

    wrap(te.group, "broadcast", "broadcast")
    wrap(te.model, "load_weights", "load_weights", object.__setattr__)
    wrap(te, "start_weight_update", "start")
    wrap(te, "finish_weight_update", "finish")
    # inside load_weights (and, for delayed layers, finish): looked up as module globals
    wrap(layerwise, "_layerwise_process", "layer_process")
    wrap(layerwise, "materialize_layer", "materialize")
    wrap(layerwise, "_copy_and_restore_kernel_tensors", "copy_back")
    # CPU GEMM weight packing (oneDNN); also run by finish for the tied LM head
    wrap(UnquantizedLinearMethod, "process_weights_after_loading", "gemm_prepack")
    wrap(UnquantizedEmbeddingMethod, "process_weights_after_loading", "gemm_prepack")
    return torch.get_num_threads()


def _engine_take_timers(engine) -> dict:
    out = dict(engine.bench_timers)
    engine.bench_timers.clear()
    return out


def _engine_profiled_update(engine, info: dict, top: int) -> tuple[dict, str]:
    import cProfile
    prof = cProfile.Profile()
    report = prof.runcall(engine.update_weights, info)
    return report, _top_functions(prof, top)


def _engine_wire(engine, nbytes: int, repeats: int) -> list[float]:
    return _broadcast_loop(_transfer_engine(engine).group, nbytes, repeats)


def _top_functions(prof, top: int) -> str:
    import io
    import pstats
    s = io.StringIO()
    pstats.Stats(prof, stream=s).strip_dirs().sort_stats("tottime").print_stats(top)
    lines = s.getvalue().splitlines()
    start = next((i for i, l in enumerate(lines) if l.lstrip().startswith("ncalls")), 0)
    return "\n".join(lines[start:start + top + 1])


# ---- plain copy --------------------------------------------------------------------------------
def plain_copy(model_path: Path, repeats: int, threads: int, bucket_bytes: int) -> dict:
    """Best-of-N GB/s of copying the model's bytes: one flat buffer, and tensor by tensor."""
    from transformers import AutoModelForCausalLM
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        params = [p.detach() for p in model.parameters()]
        nbytes = sum(p.numel() * p.element_size() for p in params)

        def best(fn) -> float:
            fn()  # warm-up: first touch of destinations
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return min(times)

        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        flat_s = best(lambda: dst.copy_(src))
        dsts = [torch.empty_like(p) for p in params]
        per_s = best(lambda: [d.copy_(p) for d, p in zip(dsts, params)])

        # one bucket's worth: copy into a preallocated buffer vs. a fresh torch.empty (as the
        # library's send and receive paths allocate one per bucket, per sync)
        bsrc = src[:min(bucket_bytes, nbytes)]
        bdst = torch.empty_like(bsrc)
        pre_s = best(lambda: bdst.copy_(bsrc))
        fresh_s = best(lambda: torch.empty(bsrc.numel(), dtype=torch.uint8).copy_(bsrc))
    finally:
        torch.set_num_threads(old_threads)
    return {"bytes": nbytes, "flat_gbps": nbytes / flat_s / 1e9, "flat_s": flat_s,
            "per_param_gbps": nbytes / per_s / 1e9, "per_param_s": per_s,
            "bucket_bytes": bsrc.numel(), "bucket_prealloc_gbps": bsrc.numel() / pre_s / 1e9,
            "bucket_fresh_gbps": bsrc.numel() / fresh_s / 1e9, "threads": threads}


# ---- the run -----------------------------------------------------------------------------------
def one_sync(trainer, engines, bucket_bytes: int) -> dict:
    import ray

    from orchestrator.weight_sync import sync_weights
    stats = sync_weights(trainer, engines, bucket_bytes=bucket_bytes)
    recv = ray.get(engines.actors[0].__ray_call__.remote(_engine_take_timers))
    stats["recv"] = recv
    stats["gbps"] = stats["bytes"] / stats["seconds"] / 1e9
    return stats


def run(args) -> dict:
    import ray

    from actors.group import ActorGroup
    from actors.rollout import RolloutEngine, RolloutSettings
    from orchestrator.placement import RoleRequest, place
    from orchestrator.tiny_model import build_model
    from orchestrator.weight_sync import connect

    out = Path(args.out)
    t0 = time.perf_counter()
    model_dir = build_model(out / "model", args.size, seed=0, max_positions=1024)
    log.info("built %s model in %.1fs", args.size, time.perf_counter() - t0)
    bucket_bytes = int(args.bucket_mb * MB)

    log.info("plain copy (threads %d, best of %d)", args.copy_threads, args.copy_repeats)
    copy = plain_copy(model_dir, args.copy_repeats, args.copy_threads, bucket_bytes)
    log.info("plain copy: flat %.2f GB/s, per parameter %.2f GB/s", copy["flat_gbps"],
             copy["per_param_gbps"])

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    res: dict = {"copy": copy, "load_start": os.getloadavg()}
    try:
        settings = RolloutSettings(str(model_dir), max_model_len=MAX_MODEL_LEN,
                                   kv_cache_gib=args.kv_cache_gib, seed=0)
        engines = ActorGroup("rollout", RolloutEngine, place(RoleRequest("rollout", 1, 1, 0), 60),
                             1, 1, 0, init_args=(settings,), env=ENGINE_ENV)
        trainer = ActorGroup("policy", BenchTrainer, place(RoleRequest("policy", 1, 1, 0), 60),
                             1, 1, 0, init_args=(str(model_dir),))
        t0 = time.perf_counter()
        # waits for the engine to be up
        connect(trainer, engines, timeout_s=300, shared_memory=args.transport == "shm")
        log.info("engine up and group connected in %.1fs", time.perf_counter() - t0)
        n_params, n_bytes = ray.get(trainer.actors[0].parameter_count.remote())
        res["params"], res["param_bytes"] = n_params, n_bytes
        res["engine_threads"] = ray.get(
            engines.actors[0].__ray_call__.remote(_engine_install_timers))
        log.info("model: %d parameters (%.1f MB float32); engine torch threads %d", n_params,
                 n_bytes / 1e6, res["engine_threads"])

        warm = one_sync(trainer, engines, bucket_bytes)
        log.info("warm-up sync: %.3fs, %d buckets, over %s", warm["seconds"], warm["buckets"],
                 warm["transport"])
        if warm["transport"] != args.transport:
            raise SystemExit(f"--transport {args.transport}: the group uses {warm['transport']}")
        res["warmup"] = warm
        res["syncs"] = []
        for i in range(args.syncs):
            s = one_sync(trainer, engines, bucket_bytes)
            log.info("sync %d: %.3fs, %.2f GB/s (send %.3fs, engine %.3fs)", i + 1, s["seconds"],
                     s["gbps"], s["send_s"], s["engines"][0]["seconds"])
            res["syncs"].append(s)
        res["load_syncs"] = os.getloadavg()

        if not args.no_profile:
            res["sweep"] = []
            for mb in args.also:
                s = one_sync(trainer, engines, int(mb * MB))
                s["bucket_mb"] = mb
                log.info("sync with %g MiB buckets: %.3fs, %.2f GB/s, %d buckets", mb,
                         s["seconds"], s["gbps"], s["buckets"])
                res["sweep"].append(s)
            e, t = engines.actors[0], trainer.actors[0]
            recv = e.__ray_call__.remote(_engine_wire, bucket_bytes, args.wire_repeats)
            send = t.wire.remote(bucket_bytes, args.wire_repeats)
            res["wire"] = {"recv": ray.get(recv), "send": ray.get(send), "bytes": bucket_bytes}
            log.info("raw %s transfer of %d MiB: best %.2f GB/s", args.transport,
                     bucket_bytes // MB, bucket_bytes / min(res["wire"]["recv"]) / 1e9)
            info = ray.get(t.weight_update_info.remote(bucket_bytes, ()))
            recv = e.__ray_call__.remote(_engine_profiled_update, info, 18)
            send = t.profiled_send.remote(info, 12)
            res["profile"] = {"recv": ray.get(recv), "send": ray.get(send)}
            ray.get(e.__ray_call__.remote(_engine_take_timers))
        ray.get([a.shutdown.remote() for a in engines.actors])
    finally:
        ray.shutdown()
    res["load_end"] = os.getloadavg()
    return res


# ---- report ------------------------------------------------------------------------------------
def _split(s: dict) -> str:
    r = s["recv"]
    return (f"send: pack {s['send_s'] - s['send_broadcast_s']:.3f} + broadcast "
            f"{s['send_broadcast_s']:.3f}; recv: start {r.get('start', 0):.3f}, broadcast wait "
            f"{r.get('broadcast', 0):.3f}, load_weights {r.get('load_weights', 0):.3f} "
            f"(layer processing {r.get('layer_process', 0):.3f}: materialize "
            f"{r.get('materialize', 0):.3f}, GEMM prepack {r.get('gemm_prepack', 0):.3f}, copy "
            f"back {r.get('copy_back', 0):.3f}), finish {r.get('finish', 0):.3f}")


def _floor(sync: dict) -> float:
    """Seconds the engine spent processing the weights of a sync itself (not waiting)."""
    r = sync["recv"]
    return r.get("start", 0) + r.get("load_weights", 0) + r.get("finish", 0)


def _over_floor(sync: dict) -> float:
    return sync["seconds"] / _floor(sync)


def report(args, res: dict) -> str:
    import ray
    import vllm

    copy, syncs = res["copy"], res["syncs"]
    best = max(s["gbps"] for s in syncs)
    med = statistics.median(s["gbps"] for s in syncs)
    lines = [
        "",
        (f"## Weight sync, {args.size} Llama: {res['params']:,} parameters, "
         f"{res['param_bytes'] / 1e6:.1f} MB float32 (tied embedding sent once)"),
        "",
        ("| sync | seconds | bytes | GB/s | sender: pack / broadcast s | engine: bcast wait / "
         "load_weights / finish s | buckets |"),
        "|---|---:|---:|---:|---|---|---:|",
    ]
    for i, s in enumerate([res["warmup"]] + syncs):
        r = s["recv"]
        lines.append(
            f"| {'warm-up' if i == 0 else i} | {s['seconds']:.3f} | {s['bytes']:,} | "
            f"{s['gbps']:.3f} | {s['send_s'] - s['send_broadcast_s']:.3f} / "
            f"{s['send_broadcast_s']:.3f} | {r.get('broadcast', 0):.3f} / "
            f"{r.get('load_weights', 0):.3f} / {r.get('finish', 0):.3f} | {s['buckets']} |")
    lines += [
        "",
        "| reference (same bytes, this process) | GB/s |",
        "|---|---:|",
        (f"| plain copy, one flat buffer ({copy['threads']} threads, best of {args.copy_repeats}) "
         f"| {copy['flat_gbps']:.2f} |"),
        (f"| plain copy, tensor by tensor into preallocated tensors | "
         f"{copy['per_param_gbps']:.2f} |"),
        (f"| one {copy['bucket_bytes'] // MB} MiB bucket into a preallocated buffer | "
         f"{copy['bucket_prealloc_gbps']:.2f} |"),
        (f"| one {copy['bucket_bytes'] // MB} MiB bucket into a fresh torch.empty buffer | "
         f"{copy['bucket_fresh_gbps']:.2f} |"),
        "",
        (f"**sync / engine floor: {statistics.median(_over_floor(s) for s in syncs):.2f}** "
         f"(median of {len(syncs)} syncs; floor = the engine's own processing of the same "
         f"weights: start_weight_update + load_weights + finish_weight_update, "
         f"{statistics.median(_floor(s) for s in syncs):.3f} s; no transport avoids it)."),
        "",
        (f"**sync / flat copy: {med / copy['flat_gbps']:.3f} (median of {len(syncs)} syncs; best "
         f"{best / copy['flat_gbps']:.3f}); target >= 0.25.** sync / per-tensor copy: "
         f"{med / copy['per_param_gbps']:.3f}."),
        "",
        (f"Median sync: {statistics.median(s['seconds'] for s in syncs):.3f} s at "
         f"{args.bucket_mb:g} MiB buckets. Time split of the last timed sync: "
         f"{_split(syncs[-1])}."),
    ]
    if "sweep" in res:
        lines += ["", "| bucket MiB | buckets | seconds | GB/s | engine load_weights s |",
                  "|---:|---:|---:|---:|---:|"]
        for s in res["sweep"]:
            lines.append(f"| {s['bucket_mb']:g} | {s['buckets']} | {s['seconds']:.3f} | "
                         f"{s['gbps']:.3f} | {s['recv'].get('load_weights', 0):.3f} |")
    if "wire" in res:
        w = res["wire"]
        raw = w["bytes"] / statistics.median(w["recv"]) / 1e9
        lines += ["", (f"Raw {args.transport} transfer trainer -> engine (the transport alone), "
                       f"one reused {w['bytes'] // MB} MiB buffer, {len(w['recv'])} repeats: "
                       f"best {w['bytes'] / min(w['recv']) / 1e9:.2f} GB/s, median {raw:.2f} "
                       f"GB/s (receiver side); the transport alone would move the model in "
                       f"{res['param_bytes'] / (w['bytes'] / min(w['recv'])):.3f} s."), "",
                  (f"**transport / flat copy: {raw / copy['flat_gbps']:.2f}** (median raw "
                   f"transfer over the plain copy of one flat buffer; target >= 0.5 for "
                   f"engines on the trainer's node).")]
    if "profile" in res:
        (rep, recv_top), (_, send_top) = res["profile"]["recv"], res["profile"]["send"]
        lines += ["", (f"cProfile of one more sync, engine side (update_weights "
                       f"{rep['seconds']:.3f} s under the profiler), by own time:"), "```",
                  recv_top, "```", "Sender side (send_weights), by own time:", "```", send_top,
                  "```"]
    la = (res["load_start"], res["load_syncs"], res["load_end"])
    lines += [
        "",
        (f"Settings: transport {args.transport}; bucket {args.bucket_mb:g} MiB; trainer actor "
         f"1 CPU (torch threads 1), "
         f"engine actor 1 CPU (vLLM {vllm.__version__}, tp 1, in actor, torch threads "
         f"{res['engine_threads']}, KV cache {args.kv_cache_gib:g} GiB); Ray {ray.__version__}, "
         f"torch {torch.__version__}; {os.cpu_count()} CPUs. Seconds are the driver's wall time "
         f"of sync_weights (metadata call, send and receive, completeness check)."),
        (f"1-minute load average: before the syncs {la[0][0]:.2f}, after the timed syncs "
         f"{la[1][0]:.2f}, at the end {la[2][0]:.2f} (2 cores; above ~2 means other work "
         f"shared the CPU)."),
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging()
    log.info("load average %s; pytest processes running: %s", os.getloadavg(),
             _pytest_count())
    res = run(args)
    print(report(args, res), flush=True)


def _pytest_count() -> int:
    """Other pytest runs on the machine (they make the figures noisy)."""
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                if b"pytest" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    n += 1
            except OSError:
                pass
    return n


if __name__ == "__main__":
    main()
