"""``dv365 train``: train the DV365 user tower inside the multi-task DLRM backbone (registered through the
``dv365.commands`` entry-point group of this package). The handler parses the command line and calls
:func:`dv365.train.launch.train`."""

from __future__ import annotations

import argparse
from typing import Any

import yaml

DESCRIPTION = """\
Train a DV365 model on a UniTi dataset with requests (dv365 synth / dv365 import): every request is one
example, its user's timelines are sliced at the request time minus the 24 h gap, the user tower (FSA or a
Table-1 variant, or none for the baseline) summarises the pooled slices, and the multi-task DLRM backbone
predicts the request's labels (loss: sum of BCE + a * MSE, paper Eq. 8).

The run resumes from the latest checkpoint in checkpoint.dir (bit-exact); checkpoint.warm_start loads the
user tower of a previous model version into a fresh run. Outputs in checkpoint.dir: step_*.pt checkpoints,
train_log.jsonl (running loss / NE), metrics.json (evaluation NE per task on the latest requests).
See docs/train.md for the config keys."""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "train",
        help="train the DV365 user tower inside the multi-task DLRM backbone",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        required=True,
        help="YAML training config, or the name of a shipped one (synth-quick, movielens-quick)",
    )
    p.add_argument("--steps", type=int, help="override run.steps (total steps; a resumed run continues to it)")
    p.add_argument("--checkpoint-dir", help="override checkpoint.dir")
    p.add_argument("--warm-start", help="override checkpoint.warm_start (a checkpoint file or folder)")
    p.add_argument("--device", help="override run.device: auto, cpu, cuda, cuda:N")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set model.kind=lce --set run.batch_size=64 (repeatable)",
    )
    p.add_argument("--eval-only", action="store_true", help="only evaluate the latest checkpoint of checkpoint.dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_main)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from dv365.train.errors import TrainConfigError

    out: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TrainConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. run.steps=100")
        out[key.strip()] = yaml.safe_load(value)
    for key, value in (
        ("run.steps", args.steps),
        ("checkpoint.dir", args.checkpoint_dir),
        ("checkpoint.warm_start", args.warm_start),
        ("run.device", args.device),
    ):
        if value is not None:
            out[key] = value
    if args.no_progress:
        out["run.progress"] = False
    return out


def _quiet_known_noise() -> None:
    """torchrec's KJT code trips a one-time torch.fx log line and Adagrad's sparse path a UserWarning on
    every run; neither is actionable for a user of this command."""
    import logging
    import warnings

    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


def _main(args: argparse.Namespace) -> int:
    _quiet_known_noise()
    from dv365.train.launch import train

    line = train(args.config, _overrides(args), eval_only=args.eval_only)
    if line is not None:  # None: a rank other than 0 under torchrun (--no-python dv365 train)
        print(line)
    return 0
