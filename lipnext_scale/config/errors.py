"""The config's one error class (its own module so that sections, batch arithmetic and loading share it)."""

from __future__ import annotations

from lipnext_scale.errors import LipnextError


class ConfigError(LipnextError, ValueError):
    """A config file, key or value is wrong; the message names it and the fix."""
