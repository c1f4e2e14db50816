"""Every ```python block of the package README (and of docs/adapters.md) runs as written.

A block whose first line is ``# requires: <module>`` is skipped where that module is not importable (the
generative-recommenders example).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "packages" / "dv365-adapters" / "README.md", ROOT / "docs" / "adapters.md"]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        for n, code in enumerate(_BLOCK.findall(doc.read_text())):
            out.append((f"{doc.name}#{n + 1}", code))
    return out


def test_readme_has_an_example_per_adoption_style() -> None:
    text = DOCS[0].read_text()
    for name in ("LinearProjection", "HSTUPrefix", "GateNet", "fetch_dv365", "DV365ContextualPreprocessor"):
        assert any(name in code for _, code in _blocks() if _.startswith("README")), name
    assert "6135bc3" in text and "set_hammer_kernel" in text


def test_docs_run_the_three_gr_paths() -> None:
    """docs/adapters.md shows GR's HSTUTransducer, its DlrmHSTU ranker and the raw jagged prefix as code that
    :func:`test_code_block_runs` executes."""
    docs = [code for name, code in _blocks() if name.startswith("adapters.md")]
    for call in ("HSTUTransducer(", "DV365DlrmHSTU(", "DLRMv3KuaiRandDataset(", "HSTUPrefix(", "contextual_payloads("):
        assert any(call in code for code in docs), call


@pytest.mark.parametrize(("name", "code"), _blocks(), ids=[n for n, _ in _blocks()])
def test_code_block_runs(name: str, code: str) -> None:
    first = code.splitlines()[0] if code else ""
    if first.startswith("# requires:"):
        for module in first.split(":", 1)[1].split(","):
            if importlib.util.find_spec(module.strip()) is None:
                pytest.skip(f"{name} needs {module.strip()}, which is not installed")
    exec(compile(code, name, "exec"), {"__name__": f"readme_{name}"})
