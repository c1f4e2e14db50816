"""``python tests/pipeline/kill_at.py POINT <dv365 arguments>``: runs the ``dv365`` command in this process and
SIGKILLs it at POINT (no clean-up, like a machine loss). The kill-and-rerun tests of ``test_pipeline.py`` use it.

Points (each patches the real code to die right after the named call returns, the first time)::

    ingest.mid            DatasetWriter.flush: the ingest flushed bucket 0's rows, the append is unfinished
    train.checkpoint      Trainer.save: the training step saved its first checkpoint
    publish.chunk         the store's publish progress callback: the first chunk of users is in the store
    <step>.before_marker  Pipeline._step_<step>: the step finished, its marker <step>.json is not written
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from dv365.core.cli import main as dv365_main


def die(*_: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def die_after(owner: type, name: str) -> None:
    """Replaces ``owner.name`` by a wrapper that calls it, then kills the process."""
    real = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        die()
        return out

    setattr(owner, name, wrapper)


def arm(point: str) -> None:
    """Patches the code that reaches ``point`` (imported here, as the command would import it later)."""
    step, _, where = point.partition(".")
    if point == "ingest.mid":
        from dv365.core.timeline import DatasetWriter

        die_after(DatasetWriter, "flush")
    elif point == "train.checkpoint":
        from dv365.train.trainer import Trainer

        die_after(Trainer, "save")
    elif point == "publish.chunk":
        from dv365.store.api import EmbeddingStore

        real = EmbeddingStore.publish

        def publish(self: Any, snapshot_url: str, **kwargs: Any) -> Any:
            return real(self, snapshot_url, **{**kwargs, "progress": die})

        EmbeddingStore.publish = publish  # type: ignore[method-assign]
    elif where == "before_marker":
        from dv365.export.pipeline import STEPS, Pipeline

        if step not in STEPS:
            raise SystemExit(f"kill_at.py: unknown step in kill point {point!r}; steps: {STEPS}")
        die_after(Pipeline, f"_step_{step}")
    else:
        raise SystemExit(f"kill_at.py: unknown kill point {point!r}")


if __name__ == "__main__":
    arm(sys.argv[1])
    sys.exit(dv365_main(sys.argv[2:]))
