"""Checks the set-up: torch/torchrec/fbgemm load, every workspace package imports, and every declared
dependency of the workspace packages is installed (torchrec/fbgemm-gpu -> satisfied by fbgemm-gpu-cpu on CPU)."""

from __future__ import annotations

import importlib
import re
import sys
from importlib.metadata import PackageNotFoundError, distribution, version

PACKAGES = ["dv365-core", "dv365-train", "dv365-export", "dv365-adapters", "dv365-store"]
# the workspace's applications (unpublished members): experiments, benchmarks, the demo
APPLICATIONS = ["dv365-experiments", "dv365-benchmarks", "dv365-examples"]
# On a CPU machine fbgemm-gpu is provided by fbgemm-gpu-cpu (same `fbgemm_gpu` module).
EQUIVALENT = {"fbgemm-gpu": "fbgemm-gpu-cpu"}


def main() -> int:
    problems = []
    import fbgemm_gpu  # noqa: F401
    import torch
    import torchrec

    for pkg in PACKAGES + APPLICATIONS:
        dist = distribution(pkg)
        for req in dist.requires or []:
            if "extra ==" in req and "torchrec" not in req:
                continue
            name = re.split(r"[ <>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")
            for cand in (name, EQUIVALENT.get(name, name)):
                try:
                    version(cand)
                    break
                except PackageNotFoundError:
                    continue
            else:
                problems.append(f"{pkg} requires {req!r}: not installed")
        importlib.import_module("dv365." + pkg.split("-", 1)[1])
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    print(
        f"[setup] torch {torch.__version__}, torchrec {torchrec.__version__}, fbgemm-gpu-cpu {version('fbgemm-gpu-cpu')}; "
        f"{len(PACKAGES)} workspace packages and {len(APPLICATIONS)} applications installed"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
