"""MovieLens -> UniTi: the modern CSV layout (ml-latest-small, ml-latest, ml-20m/25m/32m), ml-100k and ml-1m.

MovieLens has ratings and tag applications but no dwell time, so everything becomes *explicit* events:

* a rating -> action by band (``rating >= 4`` ``rate_high``, ``rating <= 2`` ``rate_low``, else ``rate_mid``),
  ``value`` = the rating; and one training request with labels ``label_rating``, ``label_rate_ge4``,
  ``label_rate_5``, ``label_rate_le2``;
* a tag application (modern layout only) -> action ``tag``, ``value`` null.

Every event: ``media_id`` = movieId, ``author_id`` null, ``topic_ids`` = genre ids, ``media_type`` ``movie``,
``surface`` ``web``. Genre ids index :data:`GENRES` (the 20 MovieLens genres, sorted by name), so the
same genre has the same id in every layout; the classic layouts' ``Children's`` and ``unknown`` are read
as ``Children`` and ``(no genres listed)``. A genre outside the 20 gets the next free id. The list is
written to the dataset's ``extra["genres"]``.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dv365.core.catalog import Catalog
from dv365.core.errors import DatasetError
from dv365.core.importers.common import (
    Block,
    ImportSummary,
    block_origin,
    gather_topics,
    iter_csv,
    join_url,
    read_bytes,
    repeated_rows,
    url_exists,
    write_parts,
)
from dv365.core.timeline import dense_id_types
from dv365.core.validation import ValidationPolicy

NO_GENRE = "(no genres listed)"
GENRES: tuple[str, ...] = tuple(
    sorted(
        (
            NO_GENRE,
            "Action",
            "Adventure",
            "Animation",
            "Children",
            "Comedy",
            "Crime",
            "Documentary",
            "Drama",
            "Fantasy",
            "Film-Noir",
            "Horror",
            "IMAX",
            "Musical",
            "Mystery",
            "Romance",
            "Sci-Fi",
            "Thriller",
            "War",
            "Western",
        )
    )
)
GENRE_ALIASES: dict[str, str] = {"Children's": "Children", "unknown": NO_GENRE}
# u.item's 19 genre flag columns, in file order (used when u.genre is absent)
ML100K_GENRES: tuple[str, ...] = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

logger = logging.getLogger(__name__)
# layout -> (ratings file, movies file); detection looks for both
LAYOUT_FILES: dict[str, tuple[str, str]] = {
    "latest": ("ratings.csv", "movies.csv"),
    "100k": ("u.data", "u.item"),
    "1m": ("ratings.dat", "movies.dat"),
}
LABELS: dict[str, str] = {
    "label_rating": "the rating (0.5-5)",
    "label_rate_ge4": "1.0 if rating >= 4",
    "label_rate_5": "1.0 if rating == 5",
    "label_rate_le2": "1.0 if rating <= 2",
}
RATING_SCALE: tuple[float, float] = (0.5, 5.0)  # every MovieLens layout rates on (a part of) this scale
_RATING_COLUMNS = ("user_id", "media_id", "rating", "ts")
_RATING_TYPES = {"user_id": pa.int64(), "media_id": pa.int64(), "rating": pa.float64(), "ts": pa.int64()}


@dataclass
class MovieLensSummary(ImportSummary):
    """:class:`ImportSummary` plus MovieLens input counts.

    Args:
        layout: ``latest``, ``100k`` or ``1m``.
        ratings: rating rows read.
        tags: tag applications read.
        movies: movies in the movies file.
        unknown_movies: distinct rated/tagged movie ids missing from the movies file (imported without genres).
    """

    layout: str = ""
    ratings: int = 0
    tags: int = 0
    movies: int = 0
    unknown_movies: int = 0


# ------------------------------------------------------------------------------------------------------
# layout detection and genres
# ------------------------------------------------------------------------------------------------------
def detect_movielens_layout(src_dir: str) -> str:
    """``"latest"``, ``"100k"`` or ``"1m"`` from the files in ``src_dir``.

    Raises:
        DatasetError: the folder is missing, matches no layout, or matches several.
    """
    if not url_exists(src_dir):
        raise DatasetError(f"{src_dir}: MovieLens folder not found")
    found = [lay for lay, files in LAYOUT_FILES.items() if all(url_exists(join_url(src_dir, f)) for f in files)]
    if len(found) == 1:
        return found[0]
    if found:
        raise DatasetError(
            f"{src_dir}: files of several MovieLens layouts ({', '.join(found)}); choose one with layout= / --layout"
        )
    expected = "; ".join(f"{' + '.join(files)} ({lay})" for lay, files in LAYOUT_FILES.items())
    raise DatasetError(f"{src_dir}: not a MovieLens folder: expected {expected}")


class GenreIds:
    """Stable genre name -> topic id: :data:`GENRES` first (sorted); an unseen genre gets the next id
    (movies are read in movie-id order, so the assignment is deterministic)."""

    def __init__(self) -> None:
        self.names: list[str] = list(GENRES)
        self._ids = {g: i for i, g in enumerate(self.names)}

    def ids(self, raw_names: Sequence[str]) -> list[int]:
        """Sorted distinct ids of the given genre names (classic spellings accepted)."""
        out = set()
        for raw in raw_names:
            name = GENRE_ALIASES.get(raw.strip(), raw.strip())
            if not name:
                continue
            if name not in self._ids:
                self._ids[name] = len(self.names)
                self.names.append(name)
            out.add(self._ids[name])
        return sorted(out)


def _movie_catalog(movies: list[tuple[int, list[str]]], genres: GenreIds) -> Catalog:
    """Movies as a :class:`Catalog` (``video_id`` = movieId, tags = genre ids) for the join."""
    movies = sorted(dict(reversed(movies)).items())  # first row of a duplicated id wins
    topic_lists = [genres.ids(names) for _, names in movies]
    lens = np.array([len(t) for t in topic_lists], dtype=np.int64)
    n = len(movies)
    return Catalog(
        video_id=np.array([m for m, _ in movies], dtype=np.int64),
        author_id=np.full(n, -1, np.int64),
        video_type=np.full(n, "movie", dtype=object),
        duration_s=np.full(n, np.nan, np.float32),
        tag_offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
        tag_values=np.array([g for t in topic_lists for g in t], dtype=np.int64),
    )


# ------------------------------------------------------------------------------------------------------
# per-layout readers: movies as (id, genre names); ratings as tables (user_id, media_id, rating, ts)
# ------------------------------------------------------------------------------------------------------
def _latin1_lines(url: str) -> list[tuple[int, str]]:
    text = read_bytes(url).decode("latin-1")
    lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise DatasetError(f"{url}: no rows (the file is empty)")
    return lines


def _movies_latest(src: str) -> list[tuple[int, list[str]]]:
    url = join_url(src, "movies.csv")
    types = {"movieId": pa.int64(), "genres": pa.string()}
    out: list[tuple[int, list[str]]] = []
    for t in iter_csv(url, ["movieId", "genres"], column_types=types):
        pairs = zip(t.column("movieId").to_pylist(), t.column("genres").to_pylist())
        out.extend((int(m), (g or "").split("|")) for m, g in pairs if m is not None)
    return out


def _movies_1m(src: str) -> list[tuple[int, list[str]]]:
    url = join_url(src, "movies.dat")
    out: list[tuple[int, list[str]]] = []
    for lineno, line in _latin1_lines(url):
        try:
            mid, rest = line.split("::", 1)
            _title, genres = rest.rsplit("::", 1)
            out.append((int(mid), genres.split("|") if genres.strip() else []))
        except ValueError:
            raise DatasetError(f"{url}: line {lineno}: expected MovieID::Title::Genres, got {line!r}") from None
    return out


def _genres_100k(src: str) -> tuple[str, ...]:
    url = join_url(src, "u.genre")
    if not url_exists(url):
        return ML100K_GENRES
    pairs: list[tuple[int, str]] = []
    for lineno, line in _latin1_lines(url):
        name, _, idx = line.rpartition("|")
        if not name or not idx.strip().isdigit():
            raise DatasetError(f"{url}: line {lineno}: expected genre|index, got {line!r}")
        pairs.append((int(idx), name))
    return tuple(name for _, name in sorted(pairs))


def _movies_100k(src: str) -> list[tuple[int, list[str]]]:
    url = join_url(src, "u.item")
    names = _genres_100k(src)
    out: list[tuple[int, list[str]]] = []
    for lineno, line in _latin1_lines(url):
        parts = line.split("|")
        if len(parts) < 1 + len(names) or not parts[0].strip().isdigit():
            raise DatasetError(
                f"{url}: line {lineno}: expected movie id|title|...|{len(names)} genre flags, got {line!r}"
            )
        flags = parts[-len(names) :]
        out.append((int(parts[0]), [g for g, f in zip(names, flags) if f.strip() == "1"]))
    return out


def _ratings(src: str, layout: str) -> Iterator[tuple[pa.Table, str]]:
    """Rating blocks with columns (user_id, media_id, rating, ts), with the name of their file."""
    name = LAYOUT_FILES[layout][0]
    url = join_url(src, name)
    if layout == "latest":
        cols = ["userId", "movieId", "rating", "timestamp"]
        types = dict(zip(cols, _RATING_TYPES.values()))
        blocks: Iterator[pa.Table] = (
            t.rename_columns(list(_RATING_COLUMNS)) for t in iter_csv(url, cols, column_types=types)
        )
    else:  # classic layouts: header-less, unquoted, all numbers
        data = None if layout == "100k" else read_bytes(url).replace(b"::", b"\t")  # 1m: '::' -> tab is safe
        blocks = iter_csv(
            url,
            _RATING_COLUMNS,
            column_types=_RATING_TYPES,
            delimiter="\t",
            column_names=_RATING_COLUMNS,
            quoted=False,
            data=data,
        )
    start = 0
    for t in blocks:
        yield t, block_origin(name, start)
        start += t.num_rows


def _tags(src: str, layout: str) -> Iterator[tuple[pa.Table, str]]:
    """Tag blocks with columns (user_id, media_id, tag, ts), with their origin; only the modern layout has tags."""
    url = join_url(src, "tags.csv")
    if layout != "latest" or not url_exists(url):
        return
    cols = ["userId", "movieId", "tag", "timestamp"]
    types = {c: pa.string() if c == "tag" else pa.int64() for c in cols}
    start = 0
    for t in iter_csv(url, cols, column_types=types, allow_empty=True):  # optional file
        yield t.select(cols).rename_columns(["user_id", "media_id", "tag", "ts"]), block_origin("tags.csv", start)
        start += t.num_rows


# ------------------------------------------------------------------------------------------------------
# UniTi tables
# ------------------------------------------------------------------------------------------------------
def _media_columns(t: pa.Table, movies: Catalog, unknown: set[int]) -> dict[str, pa.Array]:
    """The media fields shared by events and requests; collects movie ids missing from ``movies``."""
    n = t.num_rows
    mids = t.column("media_id").combine_chunks()
    ids = mids.fill_null(-1).to_numpy(zero_copy_only=False)
    rows = movies.index_of(ids)
    unknown.update(np.unique(ids[(rows < 0) & (ids >= 0)]).tolist())
    return {
        "user_id": t.column("user_id"),
        "ts": t.column("ts"),
        "media_id": mids,
        "author_id": pa.nulls(n, pa.int64()),
        "topic_ids": gather_topics(movies, rows),
        "media_type": pa.repeat(pa.scalar("movie"), n),
        "surface": pa.repeat(pa.scalar("web"), n),
    }


def _rating_block(t: pa.Table, name: str, movies: Catalog, unknown: set[int]) -> Block:
    """One block of ratings -> explicit events (rating bands) and their requests (rating labels).

    The rating must lie on :data:`RATING_SCALE` (validated as the event's ``value``; missing, NaN or outside
    is rejected naming it); a rating event that validation drops takes its request with it."""
    rating = t.column("rating").combine_chunks().cast(pa.float64())
    r = rating.fill_null(np.nan).to_numpy(zero_copy_only=False)
    missing = np.isnan(r)
    # a missing rating gets a band too: its record is rejected for its value, not for a missing action
    action = np.where(r >= 4, "rate_high", np.where(r <= 2, "rate_low", "rate_mid")).astype(object)

    def label(x: np.ndarray) -> pa.Array:
        return pa.array(x.astype(np.float32), pa.float32(), mask=missing)

    media = _media_columns(t, movies, unknown)
    explicit = pa.table({**media, "action": pa.array(action, pa.string()), "value": rating.cast(pa.float32())})
    requests = pa.table(
        {
            **media,
            "video_duration": pa.nulls(t.num_rows, pa.float32()),
            "label_rating": label(r),
            "label_rate_ge4": label(r >= 4),
            "label_rate_5": label(r == 5),
            "label_rate_le2": label(r <= 2),
        }
    )
    return Block(
        {"explicit": explicit, "requests": requests},
        {"explicit": name, "requests": f"{name} (requests)"},
        requests_of="explicit",
        value_range=RATING_SCALE,
        duplicates={"explicit": repeated_rows(t)},
    )


def _tag_block(t: pa.Table, origin: str, movies: Catalog, unknown: set[int]) -> Block:
    """One block of tag applications -> explicit ``tag`` events (no value); a row repeating an earlier one
    (same user, movie, tag text and time) is a duplicate."""
    n = t.num_rows
    media = _media_columns(t, movies, unknown)
    events = pa.table({**media, "action": pa.repeat(pa.scalar("tag"), n), "value": pa.nulls(n, pa.float32())})
    return Block({"explicit": events}, {"explicit": origin}, duplicates={"explicit": repeated_rows(t)})


def import_movielens(
    src_dir: str | os.PathLike[str],
    out_url: str | os.PathLike[str],
    *,
    layout: str = "auto",
    num_buckets: int = 16,
    policy: ValidationPolicy = ValidationPolicy(),
    source: str | None = None,
    simulated: bool = False,
    dense_ids: bool | Sequence[str] = False,
    overwrite: bool = False,
) -> MovieLensSummary:
    """Imports a MovieLens folder into a UniTi dataset (explicit events + rating requests).

    Args:
        src_dir: the folder (local path or fsspec URL) holding the MovieLens files.
        out_url: where to write the UniTi dataset (must not hold one already).
        layout: ``"auto"`` (detect from the files), ``"latest"`` (ratings.csv, movies.csv, optional
            tags.csv), ``"100k"`` (u.data, u.item, optional u.genre) or ``"1m"`` (ratings.dat, movies.dat).
        num_buckets: user hash buckets of the dataset.
        policy: validation policy (``on_error="drop"`` drops bad records and counts them).
        source: the dataset's source tag (default ``"movielens:<folder name>"``).
        simulated: mark the dataset SIMULATED (a simulator wrote the input): reports on it say so.
        dense_ids: store these id types (``True``: media, author and topic) as dense table rows, raw ids kept in
            the dataset's id maps (:meth:`TimelineDataset.id_map`).
        overwrite: replace a dataset at ``out_url``; the old one stays until the new one is complete.

    Returns:
        A :class:`MovieLensSummary`; on ml-latest-small: 610 users, 100,836 ratings, 3,683 tags.

    Raises:
        DatasetError: unknown layout, missing file or column, unparsable file (names the file).
        TimelineError: a record the writer's validation rejects (names the file, record, user, field, value).

    Example::

        s = import_movielens("shared/data/movielens-latest-small", "memory://ml")
        s.users, s.ratings, s.tags  # 610, 100836, 3683
    """
    src = str(src_dir).rstrip("/")
    layout = detect_movielens_layout(src) if layout == "auto" else layout
    if layout not in LAYOUT_FILES:
        raise DatasetError(f"unknown MovieLens layout {layout!r}; expected auto, {', '.join(LAYOUT_FILES)}")
    for f in LAYOUT_FILES[layout]:
        if not url_exists(join_url(src, f)):
            raise DatasetError(f"{join_url(src, f)}: file not found (needed by the MovieLens {layout} layout)")
    genres = GenreIds()
    read_movies = {"latest": _movies_latest, "100k": _movies_100k, "1m": _movies_1m}[layout]
    movies = _movie_catalog(read_movies(src), genres)
    logger.info(f"{join_url(src, LAYOUT_FILES[layout][1])}: {len(movies):,} movies, {len(genres.names)} genres")
    counts = {"ratings": 0, "tags": 0}
    unknown: set[int] = set()

    def parts() -> Iterator[Block]:
        for t, name in _ratings(src, layout):
            counts["ratings"] += t.num_rows
            yield _rating_block(t, name, movies, unknown)
        logger.info(f"{join_url(src, LAYOUT_FILES[layout][0])}: {counts['ratings']:,} ratings")
        for t, origin in _tags(src, layout):
            counts["tags"] += t.num_rows
            yield _tag_block(t, origin, movies, unknown)
        if counts["tags"]:
            logger.info(f"{join_url(src, 'tags.csv')}: {counts['tags']:,} tag applications")

    tag = source or f"movielens:{posixpath.basename(src) or src}"
    extra = {
        "importer": "movielens",
        "layout": layout,
        "genres": genres.names,
        "topic_ids": "index into extra.genres",
        "labels": LABELS,
    }
    if "topic" in dense_id_types(dense_ids):
        extra["topic_ids"] = "dense topic id; its raw id (TimelineDataset.id_map('topic')) indexes extra.genres"
    base = write_parts(
        out_url,
        parts(),
        source=tag,
        extra=extra,
        num_buckets=num_buckets,
        policy=policy,
        simulated=simulated,
        dense_ids=dense_ids,
        overwrite=overwrite,
    )
    return MovieLensSummary(
        **base,
        layout=layout,
        ratings=counts["ratings"],
        tags=counts["tags"],
        movies=len(movies),
        unknown_movies=len(unknown),
    )
