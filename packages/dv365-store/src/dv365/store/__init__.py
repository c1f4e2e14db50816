"""dv365.store: NOT IMPLEMENTED YET.

This package is a placeholder so the workspace installs; its issue is open. Nothing here works yet.
"""
from dv365.store.__about__ import __version__

__all__ = ["__version__"]
