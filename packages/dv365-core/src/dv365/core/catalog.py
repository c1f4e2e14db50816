"""Item catalogs and where the shipped data lives.

:func:`load_kuairand_catalog` reads the REAL KuaiRand-Pure item catalog (``video_features_basic_pure.csv``):
7,583 videos with authors, types, durations and tags. The long-history generator draws its item universe
from it and the KuaiRand log importer joins logs with it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from dv365.core.errors import DatasetError

KUAIRAND_VIDEO_FILE = "video_features_basic_pure.csv"


DATA_DIR_ENV = "DV365_DATA_DIR"
_HOW_TO_PASS = (
    f"set {DATA_DIR_ENV} to the shipped data folder (the one holding kuairand-pure-catalog/ and "
    "movielens-latest-small/), or pass the data explicitly: --catalog DIR (dv365 import kuairand, dv365 synth; the "
    "folder holding video_features_basic_pure.csv) or the MovieLens folder's path"
)


def installed_location() -> Path:
    """The folder of the installed ``dv365.core`` package (``importlib.resources``; an editable install's is
    inside the repository, so the shipped data beside the repository is found from it)."""
    return Path(str(resources.files("dv365.core")))


def find_data_dir(env: str | None, starts: Sequence[Path]) -> Path:
    """The shipped data folder: ``env`` (the value of ``$DV365_DATA_DIR``) if given, which must be a folder;
    else the first ``shared/data`` holding a ``README.md`` next to or above one of ``starts``, in order, then
    ``<sys.prefix>/share/dv365/data``.

    Raises:
        DatasetError: ``env`` is not a folder, or no data folder is found; the message names
            ``DV365_DATA_DIR`` and ``--catalog``.
    """
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise DatasetError(f"{DATA_DIR_ENV}={env}: not a folder; {_HOW_TO_PASS}")
        return p
    for start in starts:
        for d in [start, *start.parents]:
            for cand in (d / "shared" / "data", d.parent / "shared" / "data"):
                if (cand / "README.md").is_file():
                    return cand
    prefix = Path(sys.prefix) / "share" / "dv365" / "data"
    if (prefix / "README.md").is_file():
        return prefix
    looked = ", ".join(str(s) for s in starts)
    raise DatasetError(
        f"shipped data folder not found ({DATA_DIR_ENV} is not set; no shared/data next to or above {looked}, "
        f"none in {prefix}): {_HOW_TO_PASS}"
    )


def default_data_dir() -> Path:
    """The shipped data folder: ``$DV365_DATA_DIR``, else the first ``shared/data`` found next to or above the
    current directory, then next to or above the installed location of ``dv365.core`` (the project layout puts
    it beside the repository), then ``<sys.prefix>/share/dv365/data`` (:func:`find_data_dir`).

    Raises:
        DatasetError: not found, or ``$DV365_DATA_DIR`` is not a folder; the message says how to pass the data
            (``DV365_DATA_DIR``, ``--catalog``).
    """
    return find_data_dir(os.environ.get(DATA_DIR_ENV), [Path.cwd().resolve(), installed_location().resolve()])


@dataclass(frozen=True)
class Catalog:
    """Item attributes, one row per item (``video_id`` ascending).

    ``tag_offsets``/``tag_values`` are CSR topic ids per item; ``duration_s`` is NaN where missing;
    ``video_type`` is the catalog's string type (``NORMAL``, ``AD``...).
    """

    video_id: np.ndarray  # [I] int64
    author_id: np.ndarray  # [I] int64
    video_type: np.ndarray  # [I] object (str)
    duration_s: np.ndarray  # [I] float32, NaN = missing
    tag_offsets: np.ndarray  # [I+1] int64
    tag_values: np.ndarray  # [T] int64

    def __len__(self) -> int:
        return len(self.video_id)

    def index_of(self, video_ids: np.ndarray) -> np.ndarray:
        """Row of each video id; -1 where the id is not in the catalog."""
        ids = np.asarray(video_ids, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.video_id, ids), 0, max(len(self.video_id) - 1, 0))
        found = (len(self.video_id) > 0) & (self.video_id[pos] == ids)
        return np.where(found, pos, -1)

    def topic_lists(self, rows: np.ndarray) -> pa.ListArray:
        """Topic-id lists of the given catalog rows, as an Arrow list array."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = self.tag_offsets[rows], self.tag_offsets[rows + 1]
        lens = ends - starts
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        from dv365.core.timeline import _ranges

        idx = _ranges(starts, lens)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(self.tag_values[idx], pa.int64()))


def load_kuairand_catalog(path: str | os.PathLike[str] | None = None) -> Catalog:
    """Loads ``video_features_basic_pure.csv`` from a folder (default: the shipped KuaiRand-Pure catalog)."""
    folder = Path(path) if path is not None else default_data_dir() / "kuairand-pure-catalog"
    f = folder / KUAIRAND_VIDEO_FILE if folder.is_dir() else folder
    if not f.exists():
        raise DatasetError(
            f"KuaiRand catalog not found: {f} (pass --catalog DIR, the folder holding {KUAIRAND_VIDEO_FILE})"
        )
    t = pacsv.read_csv(
        f, convert_options=pacsv.ConvertOptions(column_types={"tag": pa.string(), "video_type": pa.string()})
    )
    need = {"video_id", "author_id", "video_type", "video_duration", "tag"}
    missing = need - set(t.column_names)
    if missing:
        raise DatasetError(f"{f}: not a KuaiRand video catalog, missing columns {sorted(missing)}")
    order = np.argsort(t.column("video_id").to_numpy())
    t = t.take(pa.array(order))
    tags_raw = t.column("tag").to_pylist()
    lists = [[int(x) for x in s.split(",") if x.strip().lstrip("-").isdigit()] if s else [] for s in tags_raw]
    lens = np.array([len(x) for x in lists], dtype=np.int64)
    dur = t.column("video_duration").to_numpy(zero_copy_only=False).astype(np.float64) / 1000.0  # ms -> s
    return Catalog(
        video_id=t.column("video_id").to_numpy().astype(np.int64),
        author_id=t.column("author_id").to_numpy().astype(np.int64),
        video_type=np.asarray(t.column("video_type").to_pylist(), dtype=object),
        duration_s=dur.astype(np.float32),
        tag_offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
        tag_values=np.array([x for xs in lists for x in xs], dtype=np.int64),
    )
