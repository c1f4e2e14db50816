"""``dv365 synth``: a long-history generator on the REAL KuaiRand-Pure catalog. Its output is SIMULATED.

Users get explicit + implicit timelines of the paper's sizes (mean 40K events, max 70K, over 400 days)
and labelled training requests, drawn from the generative model documented in ``docs/synth.md``:
stable long-term interests (Dirichlet mixture over the catalog's topics + favourite authors), drifting
short-term interests (a random walk of topic mixtures, new epoch every few days), daily sessions, a
watch-ratio model for dwell time and affinity-driven explicit actions. Deterministic by seed, and a user's
data is independent of the other users generated.

Example::

    from dv365.core.synth import SynthConfig, generate, generate_timelines, write_synth_dataset

    cfg = SynthConfig(users=10)                       # defaults: paper sizes
    tl = generate_timelines(cfg)                      # Timelines, ~40K events per user
    tl, requests = generate(cfg)                      # + requests (pa.Table with label_* columns)
    meta = write_synth_dataset(cfg, "data/synth-10")  # UniTi dataset on disk, labelled simulated

Heavy modules load on first use (PEP 562), so importing this package for its CLI ``register`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dv365.core.synth.cli import register

if TYPE_CHECKING:
    from dv365.core.synth.assemble import (
        generate,
        generate_requests,
        generate_timelines,
        generate_user,
        histories_to_timelines,
        iter_users,
        requests_table,
        universe_for,
        write_synth_dataset,
    )
    from dv365.core.synth.config import (
        DEFAULT_END_TS,
        LABELS,
        SIMULATED_NOTE,
        SOURCE,
        ActionSpec,
        SynthConfig,
    )
    from dv365.core.synth.universe import ItemUniverse, prepare_universe
    from dv365.core.synth.user import UserHistory, UserProfile, affinity, label_names

_EXPORTS = {
    "dv365.core.synth.assemble": (
        "generate",
        "generate_requests",
        "generate_timelines",
        "generate_user",
        "histories_to_timelines",
        "iter_users",
        "requests_table",
        "universe_for",
        "write_synth_dataset",
    ),
    "dv365.core.synth.config": ("DEFAULT_END_TS", "LABELS", "SIMULATED_NOTE", "SOURCE", "ActionSpec", "SynthConfig"),
    "dv365.core.synth.universe": ("ItemUniverse", "prepare_universe"),
    "dv365.core.synth.user": ("UserHistory", "UserProfile", "affinity", "label_names"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = ["register", *sorted(_WHERE)]


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'dv365.core.synth' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value
