#!/usr/bin/env python
"""Generates dv365-store's gRPC stubs from store.proto with the pinned grpcio-tools.

    python tools/gen_store_stubs.py           # (re)write store_pb2.py, store_pb2.pyi, store_pb2_grpc.py
    python tools/gen_store_stubs.py --check   # exit 1 if the committed stubs differ from a fresh generation

The stubs import as ``dv365.store.proto.store_pb2``: the proto is compiled with the package's ``src`` as the
include root. tests/store/test_stubs.py runs ``--check``.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "packages" / "dv365-store" / "src"
PROTO = "dv365/store/proto/store.proto"
OUTPUTS = ("store_pb2.py", "store_pb2.pyi", "store_pb2_grpc.py")
PINNED = "1.85.1"  # keep equal to grpcio-tools in tools/requirements-store.txt


def generate(out_root: Path) -> None:
    from grpc_tools import protoc

    have = version("grpcio-tools")
    if have != PINNED:
        raise SystemExit(
            f"gen_store_stubs: grpcio-tools {have} is installed, the stubs are pinned to {PINNED} "
            "(pip install -r tools/requirements-store.txt)"
        )
    include = Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{SRC}",
            f"-I{include}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            str(SRC / PROTO),
        ]
    )
    if rc != 0:
        raise SystemExit(f"gen_store_stubs: protoc failed with exit code {rc}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the committed stubs instead of writing")
    args = ap.parse_args(argv)
    target = SRC / Path(PROTO).parent
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / Path(PROTO).parent
        if args.check:
            stale = [
                n for n in OUTPUTS if not (target / n).exists() or not filecmp.cmp(fresh / n, target / n, shallow=False)
            ]
            if stale:
                print(
                    f"gen_store_stubs: out of date: {', '.join(stale)}; run python tools/gen_store_stubs.py",
                    file=sys.stderr,
                )
                return 1
            print("gen_store_stubs: stubs are up to date")
            return 0
        for n in OUTPUTS:
            shutil.copyfile(fresh / n, target / n)
            print(f"wrote {(target / n).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
