"""Errors raised by the Propulsion method. All are ``ValueError`` subclasses except file ones."""

from __future__ import annotations

__all__ = [
    "AdapterFileError",
    "AdapterMismatchError",
    "PropulsionConfigError",
    "PropulsionError",
    "TargetError",
]


class PropulsionError(ValueError):
    """Base class: the model or the request does not fit what Propulsion can do."""


class PropulsionConfigError(PropulsionError):
    """A configuration value is invalid (degree, targets, init value, ...)."""


class TargetError(PropulsionError):
    """Target patterns match nothing, match unsupported modules, or the model is already wrapped."""


class AdapterMismatchError(PropulsionError):
    """A saved adapter does not fit the model it is loaded into (names, shapes, config)."""


class AdapterFileError(OSError):
    """An adapter folder is missing a file, or a file is corrupt or unreadable."""
