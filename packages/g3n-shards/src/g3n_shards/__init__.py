"""g3n-shards: the contract every BrainG3N stage reads and writes. No torch, by design.

A shard set is a folder of WebDataset ``*.tar`` shards, an ``index.jsonl`` and a
``manifest.json`` (written last) that records the kind and schema version, the producer, the
parent sets by digest, the geometry, label vocabularies and every shard's SHA-256.

    >>> import g3n_shards as gs
    >>> with gs.ShardWriter(out, kind="volumes", producer=gs.Producer(package="g3n-data")) as w:
    ...     w.write(gs.sample_key(meta), meta, {"volume": vol})
    >>> ss = gs.ShardSet.open(out, kind="volumes")
    >>> for sample in ss.iter_split(rank, world, worker, workers, seed=0, epoch=0): ...
"""

from .errors import ChecksumError, MetadataError, ShardError, ShardFormatError
from .manifest import (
    FORMAT,
    INDEX_NAME,
    KINDS,
    MANIFEST_NAME,
    REJECTS_NAME,
    ArrayInfo,
    FileInfo,
    Geometry,
    KindSpec,
    Manifest,
    ModelRef,
    ParentRef,
    Producer,
    ShardInfo,
    config_digest,
)
from .merge import merge_shard_sets, subset_shard_set
from .meta import CDR_VALUES, DIAGNOSES, MODALITIES, SampleMeta, sample_key, sanitize_key
from .reader import Sample, ShardSet
from .rejects import RejectLog
from .writer import VOCAB_FIELDS, ShardWriter, atomic_path, atomic_write_bytes, atomic_write_text, file_sha256

__all__ = [
    "ArrayInfo", "CDR_VALUES", "ChecksumError", "DIAGNOSES", "FORMAT", "FileInfo", "Geometry", "INDEX_NAME",
    "KINDS", "KindSpec", "MANIFEST_NAME", "MODALITIES", "Manifest", "MetadataError", "ModelRef", "ParentRef",
    "Producer", "REJECTS_NAME", "RejectLog", "Sample", "SampleMeta", "ShardError", "ShardFormatError", "atomic_write_text",
    "ShardInfo", "ShardSet", "ShardWriter", "VOCAB_FIELDS", "atomic_path", "atomic_write_bytes", "config_digest",
    "file_sha256", "merge_shard_sets", "sample_key", "sanitize_key", "subset_shard_set",
]  # fmt: skip
