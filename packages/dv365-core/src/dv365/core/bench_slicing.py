"""``dv365 bench slicing``: multi-slicing throughput on the generated 40K-mean long-history profile.

Generates users with :mod:`dv365.core.synth` (SIMULATED data on the real KuaiRand-Pure catalog), slices
them with the default ``kuairand`` spec at a request time after their last event (whole history visible,
24 h gap applied), and reports events/s per core (the slicer is single-threaded numpy), ms per user,
KJT ids per user and the dedup ratio (id occurrences / unique ids), overall and per id type. The same
batch is also sliced with dedup switched off, to show what dedup costs and saves.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dv365.core.slicing import Slicer, SliceSpec
    from dv365.core.synth import SynthConfig, generate_timelines

    quick = bool(getattr(args, "quick", False))
    users = args.users or (4 if quick else 32)
    mean_events = args.mean_events if not quick else min(args.mean_events, 10_000)
    batch_users = args.batch_users or 8
    cfg = SynthConfig(users=users, mean_events=mean_events, seed=args.seed)
    t0 = time.perf_counter()
    tl = generate_timelines(cfg)
    gen_s = time.perf_counter() - t0
    spec = SliceSpec.load_default("kuairand")
    nodedup = SliceSpec.from_dict({**spec.raw, "id_types": {k: {**v, "dedup": False} for k, v in spec.raw["id_types"].items()}})
    last = np.maximum(
        np.array([tl.explicit.ts[tl.explicit.offsets[i + 1] - 1] if tl.explicit.lengths[i] else 0 for i in range(len(tl))]),
        np.array([tl.implicit.ts[tl.implicit.offsets[i + 1] - 1] if tl.implicit.lengths[i] else 0 for i in range(len(tl))]),
    )
    request = last + spec.gap_s

    from dv365.core.timeline import Timelines, take_rows

    batches = []
    for s in range(0, len(tl), batch_users):
        rows = np.arange(s, min(s + batch_users, len(tl)))
        batches.append((Timelines(tl.user_ids[rows], take_rows(tl.explicit, rows), take_rows(tl.implicit, rows), tl.vocab),
                        request[rows]))

    def timed(sp: SliceSpec) -> tuple[float, list[Any]]:
        slicer = Slicer(sp, tl.vocab)
        slicer.slice(*batches[0])  # warm-up
        out = []
        t = time.perf_counter()
        for b, r in batches:
            out.append(slicer.slice(b, r))
        return time.perf_counter() - t, out

    secs, outs = timed(spec)
    secs_nd, _ = timed(nodedup)
    events = tl.num_events
    ids = sum(int(o.lengths.sum()) for o in outs)
    occ = sum(int(o.raw_counts.sum()) for o in outs)
    per_id: dict[str, list[int]] = {}
    for o in outs:
        lens = o.lengths.reshape(len(o.keys), o.batch_size).sum(1)
        raws = o.raw_counts.reshape(len(o.keys), o.batch_size).sum(1)
        for k, f in enumerate(spec.features):
            acc = per_id.setdefault(f.id_type, [0, 0])
            acc[0] += int(raws[k])
            acc[1] += int(lens[k])
    lengths = tl.lengths()
    return {
        "data": "SIMULATED (dv365 synth on the real KuaiRand-Pure catalog)",
        "users": len(tl), "mean_events_per_user": float(lengths.mean()), "max_events_per_user": int(lengths.max()),
        "features": len(spec.features), "batch_users": batch_users,
        "events_per_s_per_core": events / secs,
        "ms_per_user": secs / len(tl) * 1e3,
        "ms_per_40k_event_user": secs / events * 40_000 * 1e3,
        "target_events_per_s_per_core": 20_000_000,
        "kjt_ids_per_user": ids / len(tl),
        "occurrences_per_user": occ / len(tl),
        "dedup_ratio": occ / max(ids, 1),
        "dedup_ratio_by_id_type": {k: v[0] / max(v[1], 1) for k, v in per_id.items()},
        "no_dedup_events_per_s_per_core": events / secs_nd,
        "generate_seconds": round(gen_s, 3),
    }
