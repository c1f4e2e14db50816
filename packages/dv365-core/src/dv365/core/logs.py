"""How a command shows what the libraries log.

Library modules log through module loggers (``logging.getLogger(__name__)``) and never print; a command
handler calls :func:`log_to` once to choose where those lines go (stdout or stderr, with a prefix).
"""

from __future__ import annotations

import logging
from typing import IO


def log_to(stream: IO[str], prefix: str = "", level: int = logging.INFO) -> None:
    """Prints what the ``dv365.*`` loggers report (INFO and up) on ``stream``: how a command shows its progress.

    The libraries only log; each command handler decides where its messages go (``stream`` as it is when
    called). Calling it again replaces the handler a previous call installed.
    """
    root = logging.getLogger("dv365")
    for h in [h for h in root.handlers if getattr(h, "dv365_cli", False)]:
        root.removeHandler(h)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(prefix.replace("%", "%%") + "%(message)s"))
    handler.dv365_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False  # printed once, here (not again by a handler on the root logger)
