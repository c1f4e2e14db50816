"""dv365.adapters: what downstream model teams pip-install to use DV365 user embeddings (paper §2.4).

* :class:`DV365Input` — stored int4 rows ``[B, 58, 132]`` -> float tokens ``[B, 58, 256]`` (bit-exact with
  fbgemm), a learned default for users the store lacks, a missing indicator and an age (staleness) feature.
* :class:`LinearProjection` — DLRM rankers: 58 tokens -> K tokens of the model's embedding dim.
* :class:`HSTUPrefix` / :func:`prepend_jagged` — HSTU: K tokens in front of every user's jagged sequence, and
  the same tokens in generative-recommenders' contextual-feature layout (``dv365.adapters.gr`` plugs them into
  GR's ``HSTUTransducer`` and ``dv365.adapters.gr_dlrm`` into its dlrm_v3 ranker when GR is installed; neither is
  imported here).
* :class:`GateNet` (:class:`EmbeddingGate`, :class:`HiddenGate`) — retrieval user towers.
* :func:`fetch_dv365` / :func:`batch_from_lookup` — a batch's tensors from any dv365-store reader.

Only torch and dv365-core's format modules are imported (no torchrec, fbgemm or pyarrow).
"""

from dv365.adapters.__about__ import __version__
from dv365.adapters.dv365_input import DV365Features, DV365Input, DV365InputConfig
from dv365.adapters.errors import AdapterError
from dv365.adapters.fetch import DV365Batch, batch_from_lookup, fetch_dv365
from dv365.adapters.gatenet import EmbeddingGate, GateNet, GateNetConfig, HiddenGate
from dv365.adapters.hstu_prefix import (
    HSTUPrefix,
    JaggedPrefixOutput,
    first_event_timestamps,
    offsets_from_lengths,
    prepend_jagged,
    prepend_jagged_reference,
)
from dv365.adapters.projection import Affine, LinearProjection

__all__ = [
    "__version__",
    "AdapterError",
    "Affine",
    "DV365Batch",
    "DV365Features",
    "DV365Input",
    "DV365InputConfig",
    "EmbeddingGate",
    "GateNet",
    "GateNetConfig",
    "HSTUPrefix",
    "HiddenGate",
    "JaggedPrefixOutput",
    "LinearProjection",
    "batch_from_lookup",
    "fetch_dv365",
    "first_event_timestamps",
    "offsets_from_lengths",
    "prepend_jagged",
    "prepend_jagged_reference",
]
