"""The shipped data folder is found from ``DV365_DATA_DIR`` or the installed location (not only from the
current directory), and an error says how to pass the data: ``DV365_DATA_DIR`` and ``--catalog``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dv365.core.catalog import (
    KUAIRAND_VIDEO_FILE,
    default_data_dir,
    find_data_dir,
    installed_location,
    load_kuairand_catalog,
)
from dv365.core.cli import main
from dv365.core.errors import DatasetError

LOG = Path(__file__).resolve().parents[1] / "fixtures" / "kuairand-log" / "log_fixture.csv"


def test_env_var_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = default_data_dir()
    data = tmp_path / "data"
    (data / "kuairand-pure-catalog").mkdir(parents=True)
    shutil.copy(real / "kuairand-pure-catalog" / KUAIRAND_VIDEO_FILE, data / "kuairand-pure-catalog")
    monkeypatch.setenv("DV365_DATA_DIR", str(data))
    assert default_data_dir() == data
    assert len(load_kuairand_catalog()) == len(load_kuairand_catalog(real / "kuairand-pure-catalog"))


def test_found_from_the_installed_location_in_any_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DV365_DATA_DIR", raising=False)
    monkeypatch.chdir("/")  # no shared/data there (a tmp folder may have one above it)
    found = default_data_dir()
    assert (found / "README.md").is_file()
    assert found == find_data_dir(None, [installed_location().resolve()])


def test_env_var_that_is_not_a_folder_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DV365_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match=r"DV365_DATA_DIR=.*nowhere: not a folder; .*--catalog DIR"):
        default_data_dir()


def test_not_found_names_the_env_var_and_catalog_flag() -> None:
    with pytest.raises(DatasetError) as e:
        find_data_dir(None, [Path("/")])
    msg = str(e.value)
    assert msg.startswith("shipped data folder not found (DV365_DATA_DIR is not set; no shared/data next to or above /")
    assert "--catalog DIR" in msg and "set DV365_DATA_DIR" in msg


def test_cli_error_names_catalog_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DV365_DATA_DIR", str(tmp_path / "nowhere"))
    out = tmp_path / "out"
    assert main(["import", "kuairand", str(LOG), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dv365 import: error: DV365_DATA_DIR=") and "--catalog DIR" in err
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["import", "kuairand", str(LOG), "--out", str(out), "--catalog", str(empty)]) == 1
    err = capsys.readouterr().err
    assert f"KuaiRand catalog not found: {empty / KUAIRAND_VIDEO_FILE} (pass --catalog DIR" in err
    assert not out.exists()
