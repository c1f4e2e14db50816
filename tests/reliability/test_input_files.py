"""Input files that once gave tracebacks or silently empty datasets: a folder given as a file, a truncated
``.csv.gz``, a header-only file, and a line that does not parse (named by its line number)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from dv365.core.catalog import default_data_dir
from dv365.core.errors import DatasetError
from dv365.core.importers import import_generic, import_kuairand, import_movielens

MAP = {"user_id": "uid", "ts": "time", "media_id": "item"}
CONST = {"action": "like"}
CATALOG = default_data_dir() / "kuairand-pure-catalog"


def _ml(d: Path, ratings: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "movies.csv").write_text("movieId,title,genres\n1,A (1990),Drama\n")
    (d / "ratings.csv").write_text(ratings)
    return d


def test_folder_given_as_log_file(tmp_path: Path) -> None:
    (tmp_path / "log.csv").mkdir()
    with pytest.raises(DatasetError, match=r"log\.csv: is a folder, expected a file"):
        import_kuairand([str(tmp_path / "log.csv")], str(tmp_path / "out"), catalog=CATALOG)
    with pytest.raises(DatasetError, match=r"log\.csv: is a folder, expected a file"):
        import_generic(tmp_path / "log.csv", str(tmp_path / "out"), kind="explicit", mapping=MAP, constants=CONST)
    assert not (tmp_path / "out").exists()


def test_truncated_gzip_is_named(tmp_path: Path) -> None:
    rows = "".join(f"{i},{1_600_000_000 + i},1\n" for i in range(20_000))
    gz = gzip.compress(("uid,time,item\n" + rows).encode())
    f = tmp_path / "ev.csv.gz"
    f.write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DatasetError, match=r"ev\.csv\.gz: cannot read the file to its end \(truncated or corrupt\?\)"):
        import_generic(f, str(tmp_path / "out"), kind="explicit", mapping=MAP, constants=CONST)
    assert not (tmp_path / "out" / "_dataset.json").exists()


def test_header_only_file_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "ev.csv"
    f.write_text("uid,time,item\n")
    with pytest.raises(DatasetError, match=r"ev\.csv: no rows \(the file has only a header\)"):
        import_generic(f, str(tmp_path / "out"), kind="explicit", mapping=MAP, constants=CONST)
    d = _ml(tmp_path / "ml", "userId,movieId,rating,timestamp\n")
    with pytest.raises(DatasetError, match=r"ratings\.csv: no rows"):
        import_movielens(d, str(tmp_path / "ml-out"))
    assert not (tmp_path / "out" / "_dataset.json").exists() and not (tmp_path / "ml-out" / "_dataset.json").exists()


def test_empty_classic_file_is_an_error(tmp_path: Path) -> None:
    d = tmp_path / "ml1m"
    d.mkdir()
    (d / "movies.dat").write_text("")
    (d / "ratings.dat").write_text("1::1::4::978300760\n")
    with pytest.raises(DatasetError, match=r"movies\.dat: no rows"):
        import_movielens(d, str(tmp_path / "out"))


@pytest.mark.parametrize(
    "ratings, line",
    [
        ("userId,movieId,rating,timestamp\n1,1,4.0,1000\n1,1,4.0,1001\nx,1,4.0,1002\n", 4),
        ("userId,movieId,rating,timestamp\n1,1,4.0,1000\n1,1,4.0,1001,9\n", 3),
    ],
)
def test_parse_error_names_the_line(tmp_path: Path, ratings: str, line: int) -> None:
    d = _ml(tmp_path / "ml", ratings)
    with pytest.raises(DatasetError, match=rf"ratings\.csv: cannot parse line {line}: "):
        import_movielens(d, str(tmp_path / "out"))
