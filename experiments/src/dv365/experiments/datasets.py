"""Which data an experiment runs on: a built-in name, or the folder of any UniTi dataset.

``--dataset synth`` and ``--dataset movielens`` are made under ``--data-dir`` on first use (``dv365 synth``,
the shipped MovieLens ml-latest-small). ``--dataset PATH`` is any folder written by ``dv365 import movielens |
kuairand | generic`` or ``dv365 synth``: the experiment reads it as it is. Its metadata says whether it is
SIMULATED (``dv365 import ... --simulated``, ``dv365 synth``) or real, and its ``source`` picks the shipped
config that fits (:data:`KINDS`); ``--config`` names another.

Example::

    choice = resolve_dataset("out/kuairand-1k", EvalError)
    choice.kind, choice.simulated       # ("kuairand", False)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dv365.core.config import ErrorType

BUILTIN = ("synth", "movielens")
#: the dataset families with shipped configs: the generator's, MovieLens imports, KuaiRand imports
KINDS = ("synth", "movielens", "kuairand")


@dataclass(frozen=True)
class DataChoice:
    """An experiment's data set.

    Args:
        name: the name reports carry: the built-in name, or the folder's name.
        url: the folder of an imported dataset; ``None`` for a built-in one (made under ``--data-dir``).
        kind: the family that picks the shipped config (:data:`KINDS`), ``other`` when none fits.
        simulated: from the dataset's metadata (a built-in ``synth`` is SIMULATED, ``movielens`` real).
        source: the dataset's ``source`` tag (what made it).
    """

    name: str
    url: str | None
    kind: str
    simulated: bool
    source: str


def kind_of_source(source: str) -> str:
    """The family of a dataset from its ``source`` tag (``synth:kuairand-pure``, ``movielens:ml-1m``,
    ``kuairand:log_standard_4_08_to_4_21_1k.csv``, ``pipeline x <- synth:...``)."""
    origin = source.rsplit("<-", 1)[-1].strip().lower()
    for kind in KINDS:
        if origin.startswith(kind):
            return kind
    return "other"


def resolve_dataset(arg: str, error: ErrorType) -> DataChoice:
    """``--dataset`` -> :class:`DataChoice`; anything else than a built-in name or a dataset folder is ``error``."""
    if arg in BUILTIN:
        source = "synth:kuairand-pure" if arg == "synth" else "movielens:movielens-latest-small"
        return DataChoice(arg, None, arg, arg == "synth", source)
    path = Path(arg)
    if not (path / "_dataset.json").is_file():
        raise error(
            f"--dataset {arg!r}: neither {' nor '.join(BUILTIN)} nor a dataset folder (no _dataset.json there; "
            "make one with `dv365 import movielens|kuairand|generic ... --out DIR` or `dv365 synth --out DIR`)"
        )
    from dv365.core.timeline import TimelineDataset

    meta = TimelineDataset(str(path)).meta
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.resolve().name) or "dataset"
    return DataChoice(name, str(path), kind_of_source(meta.source), bool(meta.simulated), meta.source)


def data_banner(choice: DataChoice) -> str:
    """The report's first word on the data: SIMULATED or real, and where it came from."""
    if choice.simulated:
        made_by = (
            "`dv365 synth` (docs/synth.md), whose generator puts stable long-term interests into the histories "
            "*by construction*"
            if choice.kind == "synth"
            else f"a simulator (dataset source `{choice.source}`, marked SIMULATED when it was imported)"
        )
        return (
            f"> **SIMULATED.** The users, requests and labels come from {made_by}. **This run checks the "
            "implementation, not the method:** a gain here shows that the models can read a signal the "
            "simulator put there; it says nothing about real users.\n"
        )
    what = (
        "MovieLens ml-latest-small (real users' ratings)"
        if choice.url is None
        else f"the dataset at `{choice.url}` (source `{choice.source}`)"
    )
    return f"> Real data: {what}. Everything that does not improve is reported as it came out.\n"
