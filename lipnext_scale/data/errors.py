"""The data package's error class. Every I/O goes through `lipnext_scale.storage` with `error=DataError`,
so a bad URL, shard, source layout or manifest surfaces as a DataError naming the thing and the fix."""

from __future__ import annotations

from lipnext_scale.errors import LipnextError


class DataError(LipnextError, ValueError):
    """A data URL, shard, source layout or manifest is wrong; the message names it and the fix."""
