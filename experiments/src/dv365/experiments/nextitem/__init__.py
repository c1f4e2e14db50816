"""``dv365 eval nextitem``: next-item retrieval on real data where a SHORT-history sequence model gets the DV365
embedding of the user's OLDER history (the paper's §2.4 HSTU adoption style, measured on a public protocol).

Modules: :mod:`.data` (sequences, leave-one-out split, the arms' windows), :mod:`.encoders` (SASRec, HSTU),
:mod:`.arms` (the provider contract, the model and its fusion modes), :mod:`.train` (sampled softmax, early
stopping, exhaustive evaluation, serving cost), :mod:`.settings`, :mod:`.run`, :mod:`.report`. The DV365 side
(``nextitem.distant.build_distant_provider``) is imported only when the run needs it.
"""
