"""Incremental refresh (paper §2.5): a snapshot built on a previous one re-encodes only the users with new
activity (or per the activity-level policy) and carries the others byte for byte; the re-encoded users equal a
full rebuild at the same time, byte for byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dv365.core.snapshot import read_manifest
from dv365.core.timeline import TimelineDataset
from dv365.export.errors import ExportError
from dv365.export.job import ExportConfig, run_export
from dv365.export.plan import SnapshotIndex
from dv365.export.verify import verify_snapshot

DAY = 86_400


def _cfg(checkpoint: str, out: Path, **kw: object) -> ExportConfig:
    base: dict[str, object] = dict(shard_users=8, batch_users=8, progress=False, device="cpu")
    base.update(kw)
    return ExportConfig(checkpoint=checkpoint, out=str(out), **base)  # type: ignore[arg-type]


def _new_events(url: str, since: int, cut: int) -> dict[int, int]:
    """Events per user with since < ts <= cut, counted straight from the dataset's tables."""
    ds = TimelineDataset(url)
    u = np.concatenate([ds.read_table(k).column("user_id").to_numpy() for k in ("explicit", "implicit")])
    t = np.concatenate([ds.read_table(k).column("ts").to_numpy() for k in ("explicit", "implicit")])
    ids, counts = np.unique(u[(t > since) & (t <= cut)], return_counts=True)
    return dict(zip(ids.tolist(), counts.tolist()))


@pytest.fixture(scope="module")
def snapshots(checkpoint: str, last_ts: int, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-inc")
    t1, t2 = last_ts - DAY, last_ts
    run_export(_cfg(checkpoint, root / "s1", as_of=t1))
    run_export(_cfg(checkpoint, root / "s2-full", as_of=t2))
    run_export(_cfg(checkpoint, root / "s2-inc", as_of=t2, previous=str(root / "s1")))
    return {"s1": root / "s1", "full": root / "s2-full", "inc": root / "s2-inc", "root": root}


def test_incremental_equals_rebuild_for_reencoded_and_keeps_carried_bytes(
    snapshots: dict[str, Path], synth_url: str, last_ts: int
) -> None:
    s1, full, inc = (SnapshotIndex(str(snapshots[k])) for k in ("s1", "full", "inc"))
    m = read_manifest(str(snapshots["inc"]))
    active = _new_events(synth_url, last_ts - DAY - DAY, last_ts - DAY)  # new events between the two cuts
    reencoded = np.array(sorted(u for u in inc.user_ids.tolist() if u in active or u not in set(s1.user_ids.tolist())))
    carried = np.setdiff1d(inc.user_ids, reencoded)
    assert len(reencoded) >= 10 and len(carried) >= 5  # the data gives both kinds
    assert np.array_equal(inc.user_ids, full.user_ids)
    assert np.array_equal(inc.payload(reencoded), full.payload(reencoded))  # = the full rebuild
    assert np.array_equal(inc.payload(carried), s1.payload(carried))  # kept their bytes
    assert not np.array_equal(inc.payload(reencoded), s1.payload(reencoded))
    assert m.extra["parent_snapshot_id"] == read_manifest(str(snapshots["s1"])).snapshot_id
    assert m.extra["refresh"] == "active"
    assert (m.extra["users_encoded"], m.extra["users_carried"]) == (len(reencoded), len(carried))
    verify_snapshot(str(snapshots["inc"]))


def test_activity_level_policy(snapshots: dict[str, Path], checkpoint: str, synth_url: str, last_ts: int) -> None:
    out = snapshots["root"] / "s2-activity"
    res = run_export(
        _cfg(checkpoint, out, as_of=last_ts, previous=str(snapshots["s1"]), refresh="activity", min_new_events=4)
    )
    busy = np.array(sorted(u for u, n in _new_events(synth_url, last_ts - 2 * DAY, last_ts - DAY).items() if n >= 4))
    idx, full, s1 = (SnapshotIndex(str(p)) for p in (out, snapshots["full"], snapshots["s1"]))
    light = np.setdiff1d(idx.user_ids, busy)
    assert 0 < len(busy) < len(idx.user_ids) and res.counts["users_encoded"] == len(busy)
    assert np.array_equal(idx.payload(busy), full.payload(busy))
    assert np.array_equal(idx.payload(light), s1.payload(light))


def test_refresh_all_is_a_full_rebuild(snapshots: dict[str, Path], checkpoint: str, last_ts: int) -> None:
    out = snapshots["root"] / "s2-all"
    run_export(_cfg(checkpoint, out, as_of=last_ts, previous=str(snapshots["s1"]), refresh="all"))
    for a, b in zip(
        sorted(out.glob("shard-*.parquet")), sorted(snapshots["full"].glob("shard-*.parquet")), strict=True
    ):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()


def test_previous_of_another_model_or_format_is_refused(
    snapshots: dict[str, Path], checkpoint: str, last_ts: int, tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match="row format .* differs .* use --refresh all"):
        run_export(_cfg(checkpoint, tmp_path / "a", as_of=last_ts, bits=8, previous=str(snapshots["s1"])))
    res = run_export(
        _cfg(checkpoint, tmp_path / "b", as_of=last_ts, bits=8, previous=str(snapshots["s1"]), refresh="all")
    )
    assert res.manifest is not None and res.manifest.row_format.bits == 8
