"""Exceptions shared by the whole package.

Every error that a user can cause with bad input (a broken checkpoint, an artifact from another version, a
config that does not make sense) derives from :class:`GlobeError`, so a command-line front end can catch one
type and print the message without a traceback. Messages name the file, key or setting at fault and what was
expected.
"""

from __future__ import annotations

__all__ = ["GlobeError", "CheckpointError", "ArtifactError", "ConfigError"]


class GlobeError(Exception):
    """Base class of the errors this package raises on bad input."""


class CheckpointError(GlobeError):
    """A model checkpoint is missing, malformed, or not a Mixture-of-Experts model this package can read."""


class ArtifactError(GlobeError):
    """A compressed artifact on disk is missing, malformed, or written by an incompatible version."""


class ConfigError(GlobeError):
    """A configuration value is missing, of the wrong type, or out of range."""
