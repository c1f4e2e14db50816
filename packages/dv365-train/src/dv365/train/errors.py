"""Exceptions of dv365.train (subclasses of :class:`dv365.core.errors.Dv365Error`, so ``dv365`` prints them)."""

from __future__ import annotations

from dv365.core.errors import Dv365Error


class TrainConfigError(Dv365Error, ValueError):
    """A training / model configuration is malformed; the message names the key and the value."""


class CheckpointError(Dv365Error, IOError):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""
