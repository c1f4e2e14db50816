"""The committed gRPC stubs are what the pinned grpcio-tools generates from store.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_up_to_date() -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (tools/requirements-store.txt) generates the stubs")
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_store_stubs.py"), "--check"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr + out.stdout
