"""Exceptions. A misbehaving client is data, not an exception: these are for drivers' mistakes."""

from __future__ import annotations


class RoombusError(Exception):
    """Base class of every exception roombus raises."""


class LocalProtocolError(RoombusError):
    """
    The driver asked for something the core cannot do in its current state.

    For example, handling an event for a connection id that is already in use.
    """


class ConfigError(RoombusError, ValueError):
    """
    A configuration value is out of range.

    Attributes:
        setting: The name of the offending setting, as the command line spells it
            without the leading dashes (``ping-interval``).
    """

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
