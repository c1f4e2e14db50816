"""Downstream experiments of the paper on public data: ``dv365 eval ranking | retrieval | staleness | encoders |
all`` (paper §3.5, Tables 3-4, App. B, App. C). See docs/experiments.md.

Modules: :mod:`~.settings` (the YAML), :mod:`~.context` (data, splits, upstream DV365 model, snapshots),
:mod:`~.hstu` (HSTU encoder from arXiv 2402.17152), :mod:`~.models` (ranker, two-tower, slice encoders),
:mod:`~.ranking`, :mod:`~.retrieval`, :mod:`~.staleness`, :mod:`~.encoders`, :mod:`~.summary`, :mod:`~.cli`.
"""
