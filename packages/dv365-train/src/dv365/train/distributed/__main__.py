"""The torchrun worker: ``torchrun --nproc_per_node N -m dv365.train.distributed --config run.yaml [...]``.

Every rank runs ``dv365 train`` with the same arguments (the parser is :func:`dv365.train.cli.register`'s);
the :class:`~dv365.train.trainer.Trainer` joins the process group. Rank 0 prints; the other ranks run without
progress bars and with stdout discarded. An error is reported on stderr with the rank and the exit status is 1,
so torchrun sees the failure; the process group is destroyed on the way out, and a rank run as the worker
ends without interpreter teardown (see :func:`dv365.core.process.exit_without_teardown`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys

import torch.distributed as dist

from dv365.core.process import exit_without_teardown
from dv365.train.cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="torchrun ... -m dv365.train.distributed", description="dv365 train under torchrun (see docs/train.md)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        args.no_progress = True
    try:
        with contextlib.redirect_stdout(io.StringIO()) if rank != 0 else contextlib.nullcontext():
            rc = int(args.func(args))
    except Exception as e:  # noqa: BLE001 - report, then let torchrun see the failure
        print(f"dv365 train (rank {rank}): error: {type(e).__name__}: {e}", file=sys.stderr)
        rc = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return rc


if __name__ == "__main__":
    # gloo's threads and the process group outlive destroy_process_group() while torchrec still holds it; a
    # finished rank tearing them down at interpreter exit has aborted (exit -6) and torchrun then killed rank 0
    exit_without_teardown(main())
