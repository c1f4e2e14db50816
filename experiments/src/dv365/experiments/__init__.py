"""dv365.experiments: the paper's experiments on public data, as ``dv365 eval <experiment>``.

An application of the dv365 packages (it imports all of them; none imports it):

* :mod:`~.upstream`: Table 2, every Table-1 user tower vs the baseline (``dv365 eval upstream``);
* :mod:`~.downstream`: Tables 3-4, App. B-C (``dv365 eval ranking|retrieval|staleness|encoders|all``);
* :mod:`~.cli`: the ``eval`` command and the flags every experiment shares;
* ``configs/upstream/*.yaml``, ``configs/downstream/*.yaml``: the shipped settings per data set.
"""
