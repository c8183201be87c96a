"""Errors of the shard contract. Each message names the file (set, shard or field) and the reason."""

from __future__ import annotations


class ShardError(Exception):
    """A shard set or one of its shards cannot be read as the contract requires."""


class ShardFormatError(ShardError):
    """Unknown kind, unsupported schema version, or a manifest that fails validation."""


class ChecksumError(ShardError):
    """A shard's bytes differ from the SHA-256 (or size, or sample count) its manifest records."""


class MetadataError(ValueError):
    """Sample metadata failed validation; the message names the field and the offending value."""
