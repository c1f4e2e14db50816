"""dv365.benchmarks: ``dv365 bench <name> [--json]`` for every dv365 package (docs/*.md quote their figures).

An application of the dv365 packages, kept out of them: :mod:`~.slicing` (dv365-core), :mod:`~.train`
(``fsa``, ``dedup``, ``tower``), :mod:`~.export`, :mod:`~.store` (``store``, ``store-kv``); :mod:`~.cli`
holds the registry.
"""
