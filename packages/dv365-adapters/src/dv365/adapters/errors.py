"""The exception dv365-adapters raises for bad input (a shape, a dtype, a stored row format)."""

from __future__ import annotations

from dv365.core.errors import Dv365Error


class AdapterError(Dv365Error, ValueError):
    """An input to a dv365 adapter breaks its contract; the message names the argument, the value and the rule.

    It is a :class:`ValueError`, so callers that already catch those keep working.
    """
