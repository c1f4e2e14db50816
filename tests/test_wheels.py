"""What users install: a wheel of each package, built and installed into a fresh virtual environment.

The wheels hold the library and its package data (slice specs, training configs) and none of the applications
(experiments, benchmarks, the demo). The fresh environment borrows the third-party libraries (torch, torchrec,
...) of the development environment through a folder of links, but sees no dv365 code other than the wheels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "train", "export", "store", "adapters")

CHECK = r"""
import importlib, importlib.util, json, subprocess, sys
out = {}
for name in ("core", "train", "export", "store", "adapters"):
    mod = importlib.import_module(f"dv365.{name}")
    out[name] = mod.__path__[0]
out["apps"] = [a for a in ("experiments", "benchmarks", "examples") if importlib.util.find_spec(f"dv365.{a}")]
from dv365.core.slicing import SliceSpec
out["spec_features"] = len(SliceSpec.load("kuairand").features)
from dv365.train.config import TrainConfig
out["train_steps"] = TrainConfig.load("synth-quick").run.steps
from dv365.core.plugins import load_plugin
out["store_opener"] = load_plugin("dv365.stores", "open_store", "missing").__module__
help_text = subprocess.run([sys.executable, "-m", "dv365.core.cli", "--help"], capture_output=True, text=True)
out["help_rc"], out["help_err"] = help_text.returncode, help_text.stderr
out["commands"] = sorted(c for c in ("import", "train", "export", "pipeline", "serve", "bench", "eval", "demo")
                         if f"    {c} " in help_text.stdout)
print(json.dumps(out))
"""


def _borrowed_site_packages(dest: Path) -> Path:
    """Links to every third-party entry of this environment's site-packages, leaving out dv365's own."""
    import site

    src = Path(next(p for p in site.getsitepackages() if p.endswith("site-packages")))
    dest.mkdir()
    for entry in src.iterdir():
        low = entry.name.lower()
        if low.startswith(("dv365", "_dv365", "_editable_impl_dv365")) or low.endswith(".pth"):
            continue
        (dest / entry.name).symlink_to(entry)
    return dest


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("wheels")
    dist = tmp / "dist"
    for name in PACKAGES:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "-q",
                "-w",
                str(dist),
                str(ROOT / "packages" / f"dv365-{name}"),
            ],
            check=True,
            capture_output=True,
        )
    wheels = {name: next(dist.glob(f"dv365_{name}-*.whl")) for name in PACKAGES}
    venv = tmp / "venv"
    subprocess.run(
        [getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)], check=True
    )
    py = venv / "bin" / "python"
    site_dir = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site_dir / "_borrowed.pth").write_text(str(_borrowed_site_packages(tmp / "borrowed")) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", *map(str, wheels.values())],
        check=True,
        capture_output=True,
    )
    return py, wheels


@pytest.mark.parametrize("name", PACKAGES)
def test_wheel_holds_the_library_not_the_applications(wheel_env: tuple[Path, dict[str, Path]], name: str) -> None:
    files = zipfile.ZipFile(wheel_env[1][name]).namelist()
    ours = [f for f in files if f.startswith(f"dv365/{name}/")]
    assert ours, files
    for f in ours:
        base = f.rsplit("/", 1)[-1]
        assert "/experiments/" not in f and not base.startswith(("bench", "demo", "eval_")), f
    if name == "core":
        assert {"dv365/core/specs/kuairand.yaml", "dv365/core/specs/movielens.yaml"} <= set(files)
    if name == "train":
        assert {"dv365/train/configs/synth-quick.yaml", "dv365/train/configs/movielens-quick.yaml"} <= set(files)


def test_installed_wheels_work_without_the_checkout(wheel_env: tuple[Path, dict[str, Path]]) -> None:
    py, _ = wheel_env
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(py), "-c", CHECK], capture_output=True, text=True, cwd="/", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for name in PACKAGES:
        assert str(ROOT) not in out[name], f"dv365.{name} was imported from the checkout: {out[name]}"
    assert out["apps"] == []
    assert out["spec_features"] > 100 and out["train_steps"] > 0
    assert out["store_opener"] == "dv365.store.factory"
    assert out["help_rc"] == 0 and "could not be loaded" not in out["help_err"], out["help_err"]
    assert out["commands"] == ["export", "import", "pipeline", "serve", "train"]
