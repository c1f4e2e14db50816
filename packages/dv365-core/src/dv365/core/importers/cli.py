"""``dv365 import``: MovieLens folders, KuaiRand logs and any CSV/Parquet table -> a UniTi dataset.

Each sub-command prints one progress line per file read and a final one-line summary; errors are
dv365 exceptions that :func:`dv365.core.cli.main` prints (exit code 1). Importer modules (pyarrow...)
are imported inside the handlers so ``dv365 --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

_RAW = argparse.RawDescriptionHelpFormatter

IMPORT_HELP = """\
Convert a data set into a UniTi dataset (paper §2.1): explicit events (like, follow, rating bands, ...),
implicit events (impressions with dwell time) and training requests with label_* columns, written as
user-bucketed Parquet under --out (a local folder or an fsspec URL such as memory://x or s3://bucket/x).
Every record is validated: --on-error raise (default) stops at the first bad record naming the file,
record, user, field and value; --on-error drop drops bad records and counts them in the summary.
See docs/importers.md for how each layout maps to UniTi fields.
"""

MOVIELENS_HELP = """\
Import a MovieLens folder. Layouts (auto-detected from the files present):
  latest  ratings.csv + movies.csv [+ tags.csv]   (ml-latest-small, ml-latest, ml-20m/25m/32m)
  100k    u.data + u.item [+ u.genre]             (ml-100k; latin-1)
  1m      ratings.dat + movies.dat [+ users.dat]  (ml-1m; '::'-separated, latin-1; users.dat is not used)
Mapping: each rating -> an explicit event, action rate_high (>= 4) / rate_mid / rate_low (<= 2), value =
the rating, plus one request labelled label_rating, label_rate_ge4, label_rate_5, label_rate_le2; each tag
-> action 'tag'. media_id = movieId, topic_ids = genre ids (the sorted 20 MovieLens genres, stored in the
dataset's extra.genres), media_type movie, surface web, no author, no dwell time.
"""

MOVIELENS_EPILOG = """\
example:
  dv365 import movielens shared/data/movielens-latest-small --out data/ml-small
"""

KUAIRAND_HELP = """\
Import KuaiRand interaction logs (log_*.csv of KuaiRand-Pure/1K/27K), joined with the video catalog
(video_features_basic*.csv: author, tags, type, duration). Per log row: one implicit event (ts =
time_ms // 1000, dwell_time = play_time_ms / 1000, video_duration = duration_ms / 1000 or the catalog's,
surface from tab), one explicit event per positive flag (is_like -> like, is_follow -> follow, is_comment
-> comment, is_forward -> forward, is_hate -> hate, long_view -> long_view, is_profile_enter ->
profile_enter) and one request labelled label_click, label_like, label_follow, label_comment,
label_forward, label_hate, label_long_view, label_profile_enter, label_watch_time (seconds). Videos
missing from the catalog are kept (no author, no topics) and counted. Logs are streamed: multi-GB files
are fine.
Default tab -> surface: 0 feed, 1 reels, 2 explore, 3 profile, 4 search, 5 stories, other tabs 'other'
(a convention: KuaiRand does not name its tabs); change it with --tab-map.
"""

KUAIRAND_EPILOG = """\
example:
  dv365 import kuairand KuaiRand-Pure/data/log_standard_4_08_to_4_21_pure.csv \\
      KuaiRand-Pure/data/log_standard_4_22_to_5_08_pure.csv --out data/kuairand-pure
"""

GENERIC_HELP = """\
Import one CSV/TSV/Parquet file (type from the extension; .csv.gz etc. are fine) of explicit or implicit
events, mapping its columns to UniTi fields with --map FIELD=COLUMN and filling fields it lacks with
--const FIELD=VALUE. Explicit fields: user_id ts media_id author_id topic_ids media_type action surface
value (required: user_id ts media_id action). Implicit fields: user_id ts media_id author_id topic_ids
media_type surface video_duration dwell_time (required: user_id ts media_id dwell_time).
Timestamps: numbers in --time-unit, or ISO-8601 strings / typed timestamps (read as UTC when no offset).
topic_ids: a list column, one number, or a string split on --list-sep.
A --mapping-file (YAML) holds the same settings: either a flat {field: column} mapping, or the keys
kind, map, const, time_unit, duration_unit, list_sep; flags given on the command line win.
"""

GENERIC_EPILOG = """\
examples:
  dv365 import generic likes.csv --out data/likes --kind explicit \\
      --map user_id=uid --map ts=time --map media_id=item --const action=like --const surface=feed --time-unit ms
  dv365 import generic views.parquet --out data/views --kind implicit --mapping-file views.yaml
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``dv365 import`` and its sub-commands ``movielens``, ``kuairand``, ``generic``."""
    p = sub.add_parser(
        "import",
        help="import MovieLens, KuaiRand logs or any CSV/Parquet table as UniTi timelines",
        description=IMPORT_HELP,
        formatter_class=_RAW,
    )
    isub = p.add_subparsers(dest="import_format", metavar="<format>")
    p.set_defaults(func=_usage(p))
    _add_movielens(isub)
    _add_kuairand(isub)
    _add_generic(isub)


def _usage(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def show(_: argparse.Namespace) -> int:
        p.print_help()
        return 2

    return show


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse names the flag in its error)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {n}")
    return n


def _value_range(text: str) -> tuple[float, float]:
    """An argparse type: ``LO,HI`` with finite LO <= HI."""
    lo, sep, hi = text.partition(",")
    try:
        pair = (float(lo), float(hi)) if sep else None
    except ValueError:
        pair = None
    if pair is None or not all(math.isfinite(v) for v in pair) or pair[0] > pair[1]:
        raise argparse.ArgumentTypeError(f"expected LO,HI with LO <= HI, e.g. 1,5; got {text!r}")
    return pair


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        required=True,
        metavar="URL",
        help="where to write the UniTi dataset: a folder or fsspec URL that holds no dataset yet",
    )
    p.add_argument(
        "--buckets",
        type=_positive_int,
        default=16,
        metavar="N",
        help="number of user hash buckets (Parquet partitions) of the dataset (default: 16)",
    )
    p.add_argument(
        "--on-error",
        choices=("raise", "drop"),
        default="raise",
        help="bad record: stop with an error naming it (raise, default) or drop and count it (drop)",
    )
    p.add_argument(
        "--earliest",
        type=_date_ts,
        default=None,
        metavar="YYYY-MM-DD",
        help="the earliest event time accepted (UTC; default 1990-01-01: an older time is refused as implausible, "
        "e.g. a line cut inside its timestamp); for logs that really start earlier",
    )
    p.add_argument(
        "--source",
        default=None,
        metavar="TAG",
        help="source tag stored in the dataset (default: derived from the input names)",
    )
    p.add_argument(
        "--simulated",
        action="store_true",
        help="the input was written by a simulator: mark the dataset SIMULATED (every report on it says so)",
    )
    p.add_argument(
        "--dense-ids",
        action="store_true",
        help="store media, author and topic ids as dense table rows 0..N-1 (in order of first appearance), so "
        "tables sized by the catalog have no hash collisions; the raw ids are kept in the dataset (ids/, "
        "TimelineDataset.id_map) and appends extend the same maps (Python: dense_ids=[types] picks some)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dv365 dataset already at --out once the new one is complete (a failed import leaves it "
        "as it was; never deletes other files)",
    )


def _add_movielens(isub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = isub.add_parser(
        "movielens",
        help="a MovieLens folder (modern CSV layout, ml-100k or ml-1m)",
        description=MOVIELENS_HELP,
        epilog=MOVIELENS_EPILOG,
        formatter_class=_RAW,
    )
    p.add_argument("dir", help="the MovieLens folder (local path or fsspec URL)")
    p.add_argument(
        "--layout",
        choices=("auto", "latest", "100k", "1m"),
        default="auto",
        help="file layout; auto (default) detects it from the files present",
    )
    _add_common(p)
    p.set_defaults(func=_run_movielens)


def _add_kuairand(isub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = isub.add_parser(
        "kuairand",
        help="KuaiRand interaction logs joined with the KuaiRand video catalog",
        description=KUAIRAND_HELP,
        epilog=KUAIRAND_EPILOG,
        formatter_class=_RAW,
    )
    p.add_argument("logs", nargs="+", metavar="LOG_CSV", help="one or more KuaiRand log_*.csv files, read in order")
    p.add_argument(
        "--catalog",
        default=None,
        metavar="DIR",
        help="folder (or file) with video_features_basic*.csv; default: the shipped KuaiRand-Pure catalog",
    )
    p.add_argument(
        "--tab-map",
        action="append",
        default=[],
        metavar="TAB=SURFACE",
        help="override the surface of a tab, e.g. --tab-map 1=feed (repeatable; surfaces: other feed "
        "explore reels profile search stories web)",
    )
    _add_common(p)
    p.set_defaults(func=_run_kuairand)


def _add_generic(isub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = isub.add_parser(
        "generic",
        help="any CSV/TSV/Parquet file of events, columns mapped to UniTi fields",
        description=GENERIC_HELP,
        epilog=GENERIC_EPILOG,
        formatter_class=_RAW,
    )
    p.add_argument("file", help="the input file (local path or fsspec URL); .csv, .tsv, .parquet, .pq")
    p.add_argument(
        "--kind",
        choices=("explicit", "implicit"),
        default=None,
        help="event kind of every row (required here or in the mapping file)",
    )
    p.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="FIELD=COLUMN",
        help="take UniTi FIELD from source COLUMN (repeatable)",
    )
    p.add_argument(
        "--const",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="set UniTi FIELD to VALUE on every row, e.g. --const action=like (repeatable)",
    )
    p.add_argument("--mapping-file", default=None, metavar="YAML", help="YAML file with the mapping (see above)")
    p.add_argument(
        "--time-unit", choices=("s", "ms", "us", "ns"), default=None, help="unit of numeric timestamps (default: s)"
    )
    p.add_argument(
        "--duration-unit", choices=("s", "ms"), default=None, help="unit of dwell_time / video_duration (default: s)"
    )
    p.add_argument(
        "--list-sep",
        default=None,
        metavar="SEP",
        help="separator of topic ids given as one string, e.g. '|' (default: ',')",
    )
    p.add_argument(
        "--value-range",
        type=_value_range,
        default=None,
        metavar="LO,HI",
        help="explicit events: the value (e.g. a rating) is required and must lie in [LO, HI], e.g. 1,5; a value "
        "outside is a bad record (default: any number, or none)",
    )
    _add_common(p)
    p.set_defaults(func=_run_generic)


# ------------------------------------------------------------------------------------------------------
# handlers
# ------------------------------------------------------------------------------------------------------
def _show_progress() -> None:
    """The importers' per-file lines (they log them) on stdout, as ``[import] ...``."""
    from dv365.core.logs import log_to

    log_to(sys.stdout, prefix="[import] ")


def _policy(args: argparse.Namespace) -> Any:
    """The validation policy of the run."""
    from dv365.core.validation import ValidationPolicy, plausible_ts_range

    earliest = getattr(args, "earliest", None)
    ts_range = plausible_ts_range(earliest=earliest) if earliest is not None else None
    return ValidationPolicy(on_error=args.on_error, ts_range=ts_range)


def _date_ts(text: str) -> int:
    """``YYYY-MM-DD`` (UTC) -> unix seconds, for ``--earliest``."""
    from datetime import datetime, timezone

    try:
        d = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=timezone.utc)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--earliest {text!r}: not a date YYYY-MM-DD") from e
    return int(d.timestamp())


def _pairs(items: Sequence[str], flag: str) -> dict[str, str]:
    """``["a=b", ...]`` -> ``{"a": "b"}``; a malformed item raises :class:`MappingError`."""
    from dv365.core.importers.common import MappingError

    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MappingError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _finish(summary: Any) -> int:
    print(summary.line(), flush=True)
    sys.stdout.flush()
    return 0


def _run_movielens(args: argparse.Namespace) -> int:
    from dv365.core.importers.movielens import import_movielens

    _show_progress()

    return _finish(
        import_movielens(
            args.dir,
            args.out,
            layout=args.layout,
            num_buckets=args.buckets,
            policy=_policy(args),
            source=args.source,
            simulated=args.simulated,
            overwrite=args.overwrite,
            dense_ids=args.dense_ids,
        )
    )


def _run_kuairand(args: argparse.Namespace) -> int:
    from dv365.core.importers.common import MappingError
    from dv365.core.importers.kuairand import DEFAULT_TAB_SURFACES, import_kuairand

    _show_progress()

    tabs: dict[int, str] = dict(DEFAULT_TAB_SURFACES)
    for tab, surface in _pairs(args.tab_map, "--tab-map").items():
        if not tab.isdigit():
            raise MappingError(f"--tab-map {tab}={surface}: the tab must be a non-negative integer")
        tabs[int(tab)] = surface
    return _finish(
        import_kuairand(
            args.logs,
            args.out,
            catalog=args.catalog,
            tab_surfaces=tabs,
            num_buckets=args.buckets,
            policy=_policy(args),
            source=args.source,
            simulated=args.simulated,
            overwrite=args.overwrite,
            dense_ids=args.dense_ids,
        )
    )


def _run_generic(args: argparse.Namespace) -> int:
    from dv365.core.importers.common import MappingError
    from dv365.core.importers.generic import import_generic, read_mapping_file

    _show_progress()

    conf: dict[str, Any] = read_mapping_file(args.mapping_file) if args.mapping_file else {}
    mapping = {**conf.get("map", {}), **_pairs(args.map, "--map")}
    constants = {**conf.get("const", {}), **_pairs(args.const, "--const")}
    kind = args.kind or conf.get("kind")
    if kind is None:
        raise MappingError("the event kind is not given: pass --kind explicit|implicit (or kind: in the mapping file)")

    def pick(flag: str, default: str) -> str:
        return str(getattr(args, flag) or conf.get(flag) or default)

    summary = import_generic(
        args.file,
        args.out,
        kind=str(kind),
        mapping=mapping,
        constants=constants,
        time_unit=pick("time_unit", "s"),
        duration_unit=pick("duration_unit", "s"),
        list_sep=pick("list_sep", ","),
        value_range=args.value_range,
        num_buckets=args.buckets,
        policy=_policy(args),
        source=args.source,
        simulated=args.simulated,
        overwrite=args.overwrite,
        dense_ids=args.dense_ids,
    )
    return _finish(summary)
