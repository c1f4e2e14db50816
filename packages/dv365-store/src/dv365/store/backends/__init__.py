"""Backend clients; each module is imported only when its URL scheme is opened (see :mod:`dv365.store.factory`)."""
