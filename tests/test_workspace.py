"""The monorepo's contract: five separately versioned packages, dependencies pointing only downward,
core light, store/adapters free of torchrec and fbgemm, every package installed and importable."""

from __future__ import annotations

import re
from importlib.metadata import distribution
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["core", "train", "export", "adapters", "store"]
# allowed dv365 sibling dependencies ("downward" only)
ALLOWED = {"core": set(), "train": {"core"}, "export": {"core", "train"}, "store": {"core"}, "adapters": {"core"}}


def _pyproject(name: str) -> dict:
    return tomllib.loads((ROOT / "packages" / f"dv365-{name}" / "pyproject.toml").read_text())


def _dep_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[ <>=!~;\[]", r, maxsplit=1)[0].lower() for r in reqs}


def test_root_is_a_private_hatch_workspace() -> None:
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "Private :: Do Not Upload" in root["project"]["classifiers"]
    assert root["tool"]["hatch"]["envs"]["default"]["workspace"]["members"] == [
        "packages/*",
        "experiments",
        "benchmarks",
        "examples",
    ]


@pytest.mark.parametrize("name", PACKAGES)
def test_package_is_hatchling_versioned_and_installed(name: str) -> None:
    pp = _pyproject(name)
    assert pp["build-system"]["build-backend"] == "hatchling.build"
    assert pp["tool"]["hatch"]["version"]["path"] == f"src/dv365/{name}/__about__.py"
    about = (ROOT / "packages" / f"dv365-{name}" / pp["tool"]["hatch"]["version"]["path"]).read_text()
    version = re.search(r'__version__ = "([^"]+)"', about).group(1)  # type: ignore[union-attr]
    assert distribution(f"dv365-{name}").version == version
    assert (ROOT / "packages" / f"dv365-{name}" / "README.md").exists()


@pytest.mark.parametrize("name", PACKAGES)
def test_dependencies_point_downward(name: str) -> None:
    deps = _dep_names(_pyproject(name)["project"].get("dependencies", []))
    siblings = {d.removeprefix("dv365-") for d in deps if d.startswith("dv365-")}
    assert siblings <= ALLOWED[name], f"dv365-{name} depends on {siblings - ALLOWED[name]}"
    for req in _pyproject(name)["project"].get("dependencies", []):
        assert "file:" not in req and "@" not in req, f"dv365-{name}: direct reference {req!r}"


def test_core_is_light_and_store_adapters_never_pull_torchrec() -> None:
    core = _dep_names(_pyproject("core")["project"]["dependencies"])
    assert core <= {"numpy", "pyarrow", "fsspec", "torch", "pyyaml", "tqdm"}
    assert _dep_names(_pyproject("core")["project"]["optional-dependencies"]["torchrec"]) == {"torchrec"}
    for name in ("store", "adapters"):
        deps = _dep_names(_pyproject(name)["project"].get("dependencies", []))
        assert not deps & {"torchrec", "fbgemm-gpu", "fbgemm-gpu-cpu", "dv365-train", "dv365-export"}
