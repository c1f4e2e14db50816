"""dv365.examples: ``dv365 demo``, the README's main job run end to end on the shipped data.

:mod:`~.cli` registers the command (and runs the dv365-core part alone when the rest is missing);
:mod:`~.demo` runs the whole stack: import -> pipeline (train, export, publish) -> serve -> fetch -> report.
``examples/configs/pipeline-movielens.yaml`` is an example pipeline config for ``dv365 pipeline``.
"""
