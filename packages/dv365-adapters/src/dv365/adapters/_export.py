"""Makes the adapters' NamedTuple outputs serialisable in ``torch.export.save`` programs."""

from __future__ import annotations

from typing import Any

import torch.utils._pytree as pytree


def register_output_type(cls: Any, name: str) -> None:
    """Registers a NamedTuple with a stable name for torch.export serialization (no-op where unsupported)."""
    register = getattr(pytree, "_register_namedtuple", None)  # private in torch 2.x; absent: stay in-memory only
    if register is None:  # pragma: no cover
        return
    try:
        register(cls, serialized_type_name=name)
    except ValueError:  # already registered (e.g. a module re-import)
        pass
