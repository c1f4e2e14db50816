"""dv365.export: versioned int4 snapshots of every user's DV365 embedding (paper §2.3.2, §2.5, App. A.2.2, App. B).

* :mod:`dv365.export.job`: the export job (``dv365 export run``): checkpoint -> timelines cut at the snapshot
  time minus the 24 h gap -> user tower -> fbgemm 4-bit rows -> shards + manifest. Resumable (SIGKILL-safe),
  incremental (``previous`` + refresh policy), sharded across workers (hash ranges, one merged manifest).
* :mod:`dv365.export.encode`: the fbgemm quantization path and the batched tower encoder.
* :mod:`dv365.export.plan`: who is exported, in which shard, re-encoded or carried forward.
* :mod:`dv365.export.verify` / :mod:`dv365.export.compare`: snapshot integrity and stability reports.

The row and snapshot formats are core's (:mod:`dv365.core.quantize`, :mod:`dv365.core.snapshot`): readers
need neither this package nor fbgemm.
"""

from dv365.export.__about__ import __version__

__all__ = ["__version__"]
