"""``dv365 bench slicing``: multi-slicing throughput on the generated 40K-mean long-history profile.

Generates users with :mod:`dv365.core.synth` (SIMULATED data on the real KuaiRand-Pure catalog), slices
them with the default ``kuairand`` spec at a request time after their last event (whole history visible,
24 h gap applied), and reports events/s per core for each slicer backend (both are single-threaded:
``numpy``, and ``numba`` when installed), ms per user, KJT ids per user and the dedup ratio (id
occurrences / unique ids), overall and per id type. The same batches are also sliced with dedup
switched off, to show what dedup costs and saves.

Timing: CPU seconds of this process (``time.process_time``; the slicer is single-threaded, so this is
time on one core and is not inflated when other processes share the machine), best of ``--repeats``
passes over all batches, after one warm-up batch. The numba kernels' first call per process (compiling
them, or loading them from numba's on-disk cache) is measured separately as ``jit_compile_seconds``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np


def _first_call(slicer: Any, batch: tuple[Any, np.ndarray]) -> tuple[float, bool | None]:
    """Seconds of the numba backend's first call on a 1-user batch, and whether numba's cache served it."""
    from dv365.core.slicing.numba_backend import slice_source
    from dv365.core.timeline import Timelines, take_rows

    tl, req = batch
    one = Timelines(
        tl.user_ids[:1], take_rows(tl.explicit, np.arange(1)), take_rows(tl.implicit, np.arange(1)), tl.vocab
    )
    t = time.perf_counter()
    slicer.slice(one, req[:1])
    secs = time.perf_counter() - t
    stats = slice_source.stats
    hit = bool(sum(stats.cache_hits.values())) and not sum(stats.cache_misses.values())
    return secs, hit


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dv365.core.slicing import Slicer, SliceSpec, resolve_backend
    from dv365.core.synth import SynthConfig, generate_timelines
    from dv365.core.timeline import Timelines, take_rows

    quick = bool(getattr(args, "quick", False))
    users = args.users or (4 if quick else 32)
    mean_events = args.mean_events if not quick else min(args.mean_events, 10_000)
    batch_users = args.batch_users or 8
    repeats = 1 if quick else 3
    cfg = SynthConfig(users=users, mean_events=mean_events, seed=args.seed)
    t0 = time.perf_counter()
    tl = generate_timelines(cfg)
    gen_s = time.perf_counter() - t0
    spec = SliceSpec.load_default("kuairand")
    nodedup = SliceSpec.from_dict(
        {**spec.raw, "id_types": {k: {**v, "dedup": False} for k, v in spec.raw["id_types"].items()}}
    )
    last = np.maximum(
        np.array(
            [tl.explicit.ts[tl.explicit.offsets[i + 1] - 1] if tl.explicit.lengths[i] else 0 for i in range(len(tl))]
        ),
        np.array(
            [tl.implicit.ts[tl.implicit.offsets[i + 1] - 1] if tl.implicit.lengths[i] else 0 for i in range(len(tl))]
        ),
    )
    request = last + spec.gap_s

    batches = []
    for s in range(0, len(tl), batch_users):
        rows = np.arange(s, min(s + batch_users, len(tl)))
        batches.append(
            (
                Timelines(tl.user_ids[rows], take_rows(tl.explicit, rows), take_rows(tl.implicit, rows), tl.vocab),
                request[rows],
            )
        )

    backend = "numpy"  # the reference backend; numba is measured too when installed
    numba_ok = resolve_backend("auto") == "numba"
    jit: dict[str, Any] = {"jit_compile_seconds": None, "jit_cache_hit": None}
    if numba_ok:
        jit["jit_compile_seconds"], jit["jit_cache_hit"] = _first_call(
            Slicer(spec, tl.vocab, backend="numba"), batches[0]
        )

    def timed(sp: SliceSpec, be: str) -> tuple[float, list[Any]]:
        slicer = Slicer(sp, tl.vocab, backend=be)
        slicer.slice(*batches[0])  # warm-up
        best, out = float("inf"), []
        for _ in range(repeats):
            c = time.process_time()
            out = [slicer.slice(b, r) for b, r in batches]
            best = min(best, time.process_time() - c)
        return best, out

    events = tl.num_events
    per_backend: dict[str, float] = {}
    outs: dict[str, list[Any]] = {}
    for be in ["numpy", "numba"] if numba_ok else ["numpy"]:
        secs, outs[be] = timed(spec, be)
        per_backend[be] = events / secs
    secs_nd, _ = timed(nodedup, backend)
    out = outs[backend]
    agree = (
        all(
            np.array_equal(a.lengths, b.lengths)
            and np.array_equal(a.raw_counts, b.raw_counts)
            and np.array_equal(np.sort(a.values), np.sort(b.values))
            for a, b in zip(outs["numpy"], outs["numba"])
        )
        if "numba" in outs
        else None
    )
    ids = sum(int(o.lengths.sum()) for o in out)
    occ = sum(int(o.raw_counts.sum()) for o in out)
    per_id: dict[str, list[int]] = {}
    for o in out:
        lens = o.lengths.reshape(len(o.keys), o.batch_size).sum(1)
        raws = o.raw_counts.reshape(len(o.keys), o.batch_size).sum(1)
        for k, f in enumerate(spec.features):
            acc = per_id.setdefault(f.id_type, [0, 0])
            acc[0] += int(raws[k])
            acc[1] += int(lens[k])
    lengths = tl.lengths()
    secs = events / per_backend[backend]
    return {
        "data": "SIMULATED (dv365 synth on the real KuaiRand-Pure catalog)",
        "users": len(tl),
        "mean_events_per_user": float(lengths.mean()),
        "max_events_per_user": int(lengths.max()),
        "features": len(spec.features),
        "batch_users": batch_users,
        "backend": backend,
        "events_per_s_per_core": per_backend[backend],
        "ms_per_user": secs / len(tl) * 1e3,
        "ms_per_40k_event_user": secs / events * 40_000 * 1e3,
        "target_events_per_s_per_core": 20_000_000,
        "numpy_events_per_s_per_core": per_backend["numpy"],
        "numba_events_per_s_per_core": per_backend.get("numba"),
        "numba_speedup": per_backend["numba"] / per_backend["numpy"] if "numba" in per_backend else None,
        **jit,
        "numba_agrees_with_numpy": agree,
        "timing": f"CPU seconds (time.process_time), best of {repeats} passes, single-threaded",
        "kjt_ids_per_user": ids / len(tl),
        "occurrences_per_user": occ / len(tl),
        "dedup_ratio": occ / max(ids, 1),
        "dedup_ratio_by_id_type": {k: v[0] / max(v[1], 1) for k, v in per_id.items()},
        "no_dedup_events_per_s_per_core": events / secs_nd,
        "generate_seconds": round(gen_s, 3),
    }
